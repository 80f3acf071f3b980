"""benchmarks/selfcheck.py runs and prints one row per model: the canary passed on the tiny
model, with one positive timing per repeat (the figures themselves are timings, not checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_tiny_run_prints_a_passing_row() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/selfcheck.py", "--shapes", "tiny",
                           "--repeats", "2"], cwd=REPO, capture_output=True, text=True,
                          timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["model", "passed", "seconds", "per", "check"]
    name, passed, *seconds = lines[1].split()
    assert (name, passed) == ("tiny", "True")
    assert len(seconds) == 2 and all(float(s) > 0 for s in seconds)
