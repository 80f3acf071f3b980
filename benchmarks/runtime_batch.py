"""Audio seconds generated per wall second by the runtime at batch 1, 4 and 8 (no queue).

    .venv/bin/python benchmarks/runtime_batch.py [--items 32] [--duration 2.0] [--threads 1]
        [--batches 1 4 8] [--smoke]

The tiny random-weight MusicGen on the CPU, ``--items`` items with mixed prompts, seeds and
sampling parameters and durations jittered by up to 3% (one bucket at the default 2 s), handed to ``generate`` in chunks of
the batch size (each chunk is one ``model.generate`` call now that seeds no longer split a batch).
Prints audio s/s, the speed-up over batch 1 and the padding waste side by side. ``--smoke`` (CI):
4 items of 0.5 s at batch 1 and 2, to prove the script runs.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from workers.runtime import GenerationItem, generate, load_model
from workers.runtime.frames import padding_waste_for
from workers.runtime.tiny import make_tiny

PROMPTS = ["calm piano", "loud rock drums with distorted guitars", "jazz trio", "ambient pads",
           "lo-fi beat with vinyl crackle", "orchestral strings swelling"]


def make_items(count: int, duration: float, rng: random.Random) -> list[GenerationItem]:
    return [GenerationItem(prompt=rng.choice(PROMPTS), seed=rng.randrange(2**31),
                           duration_s=duration * rng.uniform(0.97, 1.0),
                           temperature=rng.choice([1.0, 0.8, 1.2]), top_k=rng.choice([250, 50, 0]),
                           top_p=rng.choice([0.0, 0.9])) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--smoke", action="store_true", help="4 items of 0.5 s, batch 1 and 2 (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.items, args.duration, args.batches = 4, 0.5, [1, 2]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        make_tiny(Path(folder) / "tiny")
        loaded = load_model(str(Path(folder) / "tiny"), device="cpu", dtype="float32",
                            offline=True)
    items = make_items(args.items, args.duration, random.Random(0))
    audio_s = sum(item.duration_s for item in items)
    generate(loaded, items[:2])  # warm-up: first-call allocations are not the runtime's cost
    rows = []
    for batch in args.batches:
        started = time.perf_counter()
        sizes: list[int] = []
        for first in range(0, len(items), batch):
            sizes += [r.batch_size for r in generate(loaded, items[first:first + batch])]
        elapsed = time.perf_counter() - started
        rows.append((batch, elapsed, audio_s / elapsed, sum(sizes) / len(sizes)))
    waste = padding_waste_for(loaded, items)  # each item's bucket is fixed: same at any batch
    print(f"{args.items} items of ~{args.duration:g}s, tiny model, CPU, {args.threads} thread(s),"
          f" padding waste {waste:.1%}")
    print(f"{'batch':>5} {'mean rows':>9} {'wall s':>8} {'audio s/s':>10} {'x batch 1':>9}")
    for batch, elapsed, rate, rows_per_call in rows:
        print(f"{batch:>5} {rows_per_call:>9.1f} {elapsed:>8.2f} {rate:>10.1f}"
              f" {rate / rows[0][2]:>9.2f}")


if __name__ == "__main__":
    main()
