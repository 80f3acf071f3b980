"""benchmarks/replica_wait.py --smoke runs on a real Sentinel topology and prints both settings
side by side. Only the shape is checked: the milliseconds are timings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_smoke_run_prints_both_settings_and_the_cost() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/replica_wait.py", "--smoke"], cwd=REPO,
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {m.group(1): [float(x) for x in m.group(2, 3, 4)] for m in re.finditer(
        r"^(wait_replicas = [01])\s+20\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", proc.stdout, re.M)}
    assert list(rows) == ["wait_replicas = 0", "wait_replicas = 1"]
    assert all(ms > 0 for values in rows.values() for ms in values)
    assert re.search(r"^cost of waiting for one replica: [+-][\d.]+ ms at p50$", proc.stdout, re.M)
    # A refused enqueue was asked again with its job_id until confirmed (none is left unconfirmed).
    assert re.search(r"^refused .*: \d+$", proc.stdout, re.M)
