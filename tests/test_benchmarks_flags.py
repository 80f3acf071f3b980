"""benchmarks/flags.py runs and prints its table: four numeric rows and the verdict on the 10 µs
target. Only the shape and the shares are checked: the ns figures are timings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_smallest_run_prints_four_numeric_rows_and_a_verdict() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/flags.py", "--smoke"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["case", "ns/check", "x", "dict", "on"])
    rows = {}
    for line in lines[header + 1:]:
        if not line.strip():
            break
        *name, ns, ratio, on = line.split()
        rows[" ".join(name)] = (float(ns), float(ratio), float(on.rstrip("%")))
    assert list(rows) == ["dict", "bool flag", "percentage", "tiers+allow+deny"]
    assert all(ns > 0 for ns, _, _ in rows.values())
    # Not timings: what share of 1,024 users each case lets through.
    assert rows["dict"][2] == rows["bool flag"][2] == 100.0
    assert 20.0 <= rows["percentage"][2] <= 30.0
    assert 44.0 <= rows["tiers+allow+deny"][2] <= 56.0
    assert re.search(r"slowest flag check \d+ ns vs target 10 µs: (OK|OVER BUDGET)$", proc.stdout.strip())
