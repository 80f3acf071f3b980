"""benchmarks/throughput.py runs end to end (real Redis, real worker processes, the tiny model)
and prints a well-formed table. Only its shape is checked: its figures are timings."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.integration, pytest.mark.slow]

COLUMNS = ["batch", "calls", "rows/call", "wall s", "jobs/s", "audio s/s", "p50 s", "p95 s",
           "loop audio s/s", "loop busy"]


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of each row under the header, up to the blank line that ends the table."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["batch", "calls"])
    for name in COLUMNS:
        assert name in lines[header]
    rows = []
    for line in lines[header + 1:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


@pytest.mark.timeout(900)  # two worker start-ups with model preload on a shared 2-core host
def test_the_smallest_run_prints_one_numeric_row_per_batch_size_and_cleans_its_database() -> None:
    # The static engine (the workers' default), whose overlapping rows once read "loop busy"
    # above 100%.
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", "--smoke",
                           "--engine", "static"],
                          cwd=REPO, capture_output=True, text=True, timeout=840, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = table_rows(proc.stdout)
    assert [row[0] for row in rows] == ["1", "2"]
    for row in rows:
        assert len(row) == len(COLUMNS), row
        figures = [float(cell.rstrip("%")) for cell in row[1:]]  # ValueError if not numeric
        assert all(value > 0 for value in figures), row
        assert float(row[-1].rstrip("%")) <= 100.0, row  # loop busy: a share of the wall time
    # Not timings: at batch 1 every call holds one job; at batch 2 no call holds more than two.
    assert rows[0][1:3] == ["4", "1.00"]
    assert 2 <= float(rows[1][1]) <= 4 and 1.0 <= float(rows[1][2]) <= 2.0
    assert re.search(r"batch 2: jobs/s x[\d.]+, loop audio s/s x[\d.]+", proc.stdout)
    assert re.search(r"loop busy >= 90% .*batch 1 [\d.]+% (PASS|MISS), batch 2 [\d.]+% (PASS|MISS)",
                     proc.stdout)
    assert "batch 8 not run" in proc.stdout
    # It let go of the database it claimed (its keys are deleted with the owner key; other
    # sessions may claim the emptied database at once, so only our own key is checked).
    claimed = re.search(r"using Redis database (redis://\S+)", proc.stderr)
    assert claimed is not None, proc.stderr[-3000:]
    client = redis.Redis.from_url(claimed.group(1))
    try:
        assert client.exists("musicgen-bench:owner") == 0
    finally:
        client.close()
