"""benchmarks/api.py runs end to end (the gateway under uvicorn in its own process, a claimed
Redis database, a SQLite ledger) and prints its two-row table. Only the shape is checked: the
figures are timings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_the_smallest_run_prints_both_endpoints_and_cleans_its_database() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/api.py", "--smoke"],
                          cwd=REPO, capture_output=True, text=True, timeout=150, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["endpoint", "requests"])
    rows = [line.split() for line in lines[header + 1:header + 3]]
    assert [" ".join(row[:2]) for row in rows] == ["GET /bench/bare", "POST /v1/jobs"]
    for row in rows:
        assert row[2:4] == ["12", "2"]
        assert all(float(cell) > 0 for cell in row[4:])  # req/s, p50, p99, mean: numbers
    assert re.search(r"POST /v1/jobs adds -?[\d.]+ ms at p50 .* serves \d+% ", proc.stdout)
    claimed = re.search(r"using Redis database (redis://\S+)", proc.stderr)
    assert claimed is not None, proc.stderr[-3000:]
    client = redis.Redis.from_url(claimed.group(1))
    try:
        assert client.exists("musicgen-bench:owner") == 0  # let go, its queued jobs deleted
    finally:
        client.close()
