"""Long-form generation against the same audio as independent window-sized jobs (no queue).

    .venv/bin/python benchmarks/long_form.py [--smoke] [--jobs 4] [--duration 75] [--stride 18]
        [--model PATH] [--device cpu] [--window S] [--threads 1]

Case 1, long-form: --jobs jobs of --duration seconds in one ``generate`` call; their windows run
in lockstep (window i of every job in one ``model.generate`` call, workers/runtime/longform.py).
Case 2, independent: the same audio cut into window-sized jobs (75 s -> 30 + 30 + 15 s per job),
generated --jobs at a time. Both print audio s/s (audio over wall time) and their
``model.generate`` calls. Long-form does more work for the same audio (each next window re-reads
a ``window - stride`` prompt) and in exchange continues the music; the independent jobs are
unrelated clips.

Then the cost per extra window: one job of ``window + k * stride`` seconds for k = 0..3, timed,
and the least-squares slope of wall time over the windows: what each extra window adds (``stride`` s of
new audio, a ``window - stride`` s prompt). The tiny random-weight model on the CPU by default
(--model for a real checkpoint on a GPU); --window shrinks the model's window for a quick run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.runtime import GenerationItem, generate, load_model
from workers.runtime.frames import windows_of
from workers.runtime.loaded import LoadedModel
from workers.runtime.tiny import make_tiny

PROMPTS = ["calm piano", "loud rock drums with distorted guitars", "jazz trio", "ambient pads",
           "lo-fi beat with vinyl crackle", "orchestral strings swelling"]


@dataclass(frozen=True)
class Case:
    name: str
    audio_s: float
    wall_s: float
    calls: float

    @property
    def rate(self) -> float:
        return self.audio_s / self.wall_s


def split(duration: float, window: float) -> list[float]:
    """``duration`` cut into window-sized pieces, the last one shorter: 75, 30 -> 30, 30, 15."""
    pieces = [window] * int(duration // window)
    rest = duration - sum(pieces)
    return pieces + ([rest] if rest > 1e-9 else [])


def _items(durations: Sequence[float], stride: float, rng: random.Random) -> list[GenerationItem]:
    return [GenerationItem(prompt=rng.choice(PROMPTS), duration_s=d, seed=rng.randrange(2**31),
                           window_stride_s=stride) for d in durations]


def _timed(loaded: LoadedModel, items: list[GenerationItem], batch: int) -> Case:
    started = time.perf_counter()
    sizes: list[int] = []
    for first in range(0, len(items), batch):
        sizes += [r.batch_size for r in generate(loaded, items[first:first + batch])]
    wall = time.perf_counter() - started
    # Each long group makes one model.generate call per window.
    calls = sum(len(windows_of(item, loaded)) / size for item, size in zip(items, sizes, strict=True))
    return Case("", sum(i.duration_s for i in items), wall, calls)


def compare(loaded: LoadedModel, jobs: int, duration: float, stride: float) -> list[Case]:
    """The long-form case and the independent window-sized jobs, same audio, same batch size."""
    rng = random.Random(0)
    window = loaded.max_duration_s
    long_form = _timed(loaded, _items([duration] * jobs, stride, rng), jobs)
    # Like lengths together, as the batching worker's keys would put them: the fairest batches.
    pieces = sorted(p for _ in range(jobs) for p in split(duration, window))
    independent = _timed(loaded, _items(pieces, stride, rng), jobs)
    count = len(windows_of(_items([duration], stride, rng)[0], loaded))
    return [dataclasses.replace(long_form, name=f"long-form ({count} windows)"),
            dataclasses.replace(independent, name=f"independent {window:g} s jobs")]


def window_costs(loaded: LoadedModel, stride: float, extra: int = 3) -> tuple[list[tuple[int, float, float]], float]:
    """(windows, duration, wall s) for one job of window + k * stride seconds, k = 0..extra, and
    the least-squares slope of wall time over the window count (seconds per extra window)."""
    rng = random.Random(1)
    rows = []
    for k in range(extra + 1):
        duration = loaded.max_duration_s + k * stride
        item = _items([duration], stride, rng)[0]
        started = time.perf_counter()
        generate(loaded, [item])
        rows.append((len(windows_of(item, loaded)), duration, time.perf_counter() - started))
    ks = [r[0] for r in rows]  # the windows each took (k + 1: rounding never adds one)
    mean_k, mean_t = sum(ks) / len(ks), sum(r[2] for r in rows) / len(rows)
    slope = (sum((k - mean_k) * (r[2] - mean_t) for k, r in zip(ks, rows, strict=True))
             / sum((k - mean_k) ** 2 for k in ks))
    return rows, slope


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--duration", type=float, default=75.0)
    parser.add_argument("--stride", type=float, default=18.0)
    parser.add_argument("--model", help="a checkpoint (hub id or folder); default: the tiny model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--window", type=float, help="shrink the model's window (seconds)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true",
                        help="2 jobs of 5 s in 2 s windows 1.2 s apart (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.jobs, args.duration, args.stride, args.window = 2, 5.0, 1.2, 2.0
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        source = args.model or str(make_tiny(Path(folder) / "tiny"))
        loaded = load_model(source, device=args.device, dtype="auto" if args.model else "float32",
                            offline=args.model is None)
    if args.window:
        loaded = dataclasses.replace(loaded, max_duration_s=args.window)
    generate(loaded, _items([1.0], args.stride, random.Random(2)))  # warm-up
    cases = compare(loaded, args.jobs, args.duration, args.stride)
    rows, slope = window_costs(loaded, args.stride)
    print(f"{args.jobs} jobs of {args.duration:g} s, window {loaded.max_duration_s:g} s, stride "
          f"{args.stride:g} s, {args.model or 'tiny model'} on {args.device}")
    print(f"{'case':<28} {'calls':>6} {'wall s':>8} {'audio s/s':>10}")
    for case in cases:
        print(f"{case.name:<28} {case.calls:>6.0f} {case.wall_s:>8.2f} {case.rate:>10.2f}")
    print(f"long-form / independent: x{cases[0].rate / cases[1].rate:.2f} audio s/s")
    print()
    print(f"{'windows':>7} {'duration s':>10} {'wall s':>8}")
    for windows, duration, wall in rows:
        print(f"{windows:>7} {duration:>10g} {wall:>8.2f}")
    per_second = args.stride / slope if slope > 0 else math.inf
    print(f"cost per extra window: {slope:.2f} s ({args.stride:g} s of new audio, "
          f"{per_second:.2f} audio s/s)")


if __name__ == "__main__":
    main()
