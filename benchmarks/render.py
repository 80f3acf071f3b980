"""Time the in-process render beside the multi-pass reference render, in one run.

A deterministic 10 s mono clip at MusicGen's 32 kHz (noise plus two tones) is rendered N
times per case by each path; the table shows the median and p95 wall time and the finished
file's loudness measured by ffmpeg's ebur128 filter (independent of both paths' meters).

    .venv/bin/python benchmarks/render.py [--runs 10] [--seconds 10] [--smoke]

``--smoke`` (CI): one run of a 1 s clip per path and case, to prove the script runs.

Not a test: figures depend on the host and its load. Issue 9's targets for a 10 s clip are
<= 40 ms for wav and <= 80 ms for mp3+lufs.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.reference_render import render as reference_render
from workers.audio import OutputSpec, RenderResult, render

SOURCE_RATE = 32000
CASES: dict[str, OutputSpec] = {
    "wav": OutputSpec(format="wav", sample_rate=32000),
    "flac+lufs": OutputSpec(format="flac", sample_rate=44100, normalization="lufs"),
    "opus+lufs": OutputSpec(format="opus", sample_rate=48000, normalization="lufs"),
    "mp3+lufs": OutputSpec(format="mp3", sample_rate=44100, normalization="lufs"),
    "ogg+lufs": OutputSpec(format="ogg", sample_rate=44100, normalization="lufs"),
}
Renderer = Callable[..., RenderResult]


def clip(seconds: float) -> np.ndarray:
    """Mono noise and two tones: deterministic, full of content up to 16 kHz."""
    t = np.arange(int(seconds * SOURCE_RATE)) / SOURCE_RATE
    rng = np.random.default_rng(2026)
    wave = 0.05 * rng.standard_normal(t.size) + 0.2 * np.sin(2 * np.pi * 220 * t) \
        + 0.1 * np.sin(2 * np.pi * 3300 * t)
    return wave.astype(np.float32)[np.newaxis, :]


def ebur128_lufs(path: Path) -> float:
    """The finished file's integrated loudness by ffmpeg's ebur128 filter."""
    out = subprocess.run(["ffmpeg", "-nostats", "-hide_banner", "-i", str(path), "-af", "ebur128",
                          "-f", "null", "-"], capture_output=True, text=True, check=True)
    lines = [line for line in out.stderr.splitlines() if line.strip().startswith("I:")]
    return float(lines[-1].split()[1])


def time_path(fn: Renderer, samples: np.ndarray, spec: OutputSpec, dest: Path, temp: Path,
              runs: int) -> tuple[float, float, float]:
    """(median ms, p95 ms, file LUFS) of ``runs`` renders after one warm-up."""
    fn(samples, SOURCE_RATE, spec, dest, temp_dir=temp)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn(samples, SOURCE_RATE, spec, dest, temp_dir=temp)
        times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times)), float(np.percentile(times, 95)), ebur128_lufs(dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--smoke", action="store_true", help="one run of a 1 s clip (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.runs, args.seconds = 1, 1.0
    samples = clip(args.seconds)
    print(f"{args.seconds:g} s mono clip at {SOURCE_RATE} Hz, {args.runs} runs per path; "
          "LUFS = the finished file by ffmpeg ebur128 (lufs target -14)")
    header = (f"{'case':<10} {'old med':>8} {'old p95':>8} {'new med':>8} {'new p95':>8} "
              f"{'speed-up':>8} {'old LUFS':>9} {'new LUFS':>9}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for name, spec in CASES.items():
            dest = work / f"take{spec.info.extension}"
            old = time_path(reference_render, samples, spec, dest, work / "t", args.runs)
            new = time_path(render, samples, spec, dest, work / "t", args.runs)
            print(f"{name:<10} {old[0]:>8.0f} {old[1]:>8.0f} {new[0]:>8.0f} {new[1]:>8.0f} "
                  f"{old[0] / new[0]:>7.1f}x {old[2]:>9.1f} {new[2]:>9.1f}")
    print("(ms, wall time per render)")


if __name__ == "__main__":
    main()
