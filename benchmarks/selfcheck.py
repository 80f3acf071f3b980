"""What the static engine's self-check costs at a worker's start (issue 22).

    .venv/bin/python benchmarks/selfcheck.py [--shapes tiny small@2] [--repeats 3] [--device cpu]

For each model it builds a 2-row engine (eager) and runs ``self_check`` (the canary: two greedy
rows of 32 and 16 frames through the engine, then each through HF generate, on the same device
and dtype) ``--repeats`` times, printing whether it passed and the seconds of each run. ``tiny``
is the tiny checkpoint (built in a temporary folder); ``NAME@LAYERS`` a random model with
``workers.runtime.shapes`` NAME's shapes at LAYERS decoder layers (``small`` for all of them).
One torch thread on the CPU, as the worker's tests run.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from workers.runtime.engine import StaticEngine
from workers.runtime.engine.selfcheck import self_check
from workers.runtime.loaded import LoadedModel
from workers.runtime.loading import load_model
from workers.runtime.shapes import random_loaded
from workers.runtime.tiny import make_tiny


def _model(shape: str, device: str, dtype: str, folder: Path) -> LoadedModel:
    if shape == "tiny":
        return load_model(str(make_tiny(folder / "tiny")), device=device, dtype=dtype,
                          offline=True)
    name, _, layers = shape.partition("@")
    return random_loaded(name, layers=int(layers) if layers else None, device=device,
                         dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny", "small@2"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)
    print(f"{'model':<12} {'passed':<7} seconds per check")
    with tempfile.TemporaryDirectory() as folder:
        for shape in args.shapes:
            engine = StaticEngine(_model(shape, args.device, args.dtype, Path(folder)), max_rows=2)
            runs = [self_check(engine) for _ in range(args.repeats)]
            passed = all(run.passed for run in runs)
            print(f"{shape:<12} {str(passed):<7} "
                  + " ".join(f"{run.seconds:.3f}" for run in runs)
                  + ("" if passed else f"  ({runs[0].reason})"))


if __name__ == "__main__":
    main()
