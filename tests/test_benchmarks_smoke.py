"""Each benchmark script without a test of its own runs from a fresh clone: ``--smoke`` in a
child process, with none of the caller's MUSICGEN_* settings, must exit 0 and print its figures.

The scripts that need them build their own fresh state: job_overhead.py a private redis-server
and a temp SQLite ledger (``db upgrade`` included: it once stopped at once on a fresh clone for
want of the quota schema), recovery.py the same plus its own RabbitMQ vhost when asked. Only the
shape of the output is checked: the figures are timings. (api.py, flags.py, gpu.py,
long_form.py, step_profile.py and throughput.py have tests of their own.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NUMBER = r"-?\d+(?:\.\d+)?"


def smoke(script: str, *args: str, timeout: float) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSICGEN_")}
    env["PYTHONPATH"] = str(REPO)  # as an editable install of a fresh clone has it
    proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--smoke", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_render_smoke_prints_both_paths_for_every_case() -> None:
    out = smoke("render.py", timeout=240)
    for case in ("wav", "flac+lufs", "opus+lufs", "mp3+lufs", "ogg+lufs"):
        # old/new median and p95 (ms), the speed-up, and each file's loudness
        assert re.search(rf"^{re.escape(case)}\s+(?:{NUMBER}\s+){{4}}{NUMBER}x\s+{NUMBER}\s+{NUMBER}$",
                         out, flags=re.M), out


def test_runtime_batch_smoke_prints_a_row_per_batch_size() -> None:
    out = smoke("runtime_batch.py", timeout=240)
    assert "4 items of ~0.5s, tiny model" in out
    rows = re.findall(rf"^\s+(\d+)\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+({NUMBER})$", out, flags=re.M)
    assert [batch for batch, _ in rows] == ["1", "2"] and rows[0][1] == "1.00", out


def test_settings_load_smoke_prints_layered_and_baseline_times() -> None:
    out = smoke("settings_load.py", timeout=240)
    for row in ("cold: process, median of 1", "warm: one load, median of 5"):
        assert re.search(rf"^{re.escape(row)}\s+{NUMBER} ms\s+{NUMBER} ms\s+{NUMBER} ms$", out,
                         flags=re.M), out
    assert re.search(rf"warm load\+validate {NUMBER} ms vs budget 100 ms: (OK|OVER BUDGET)", out)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)  # two worker start-ups with model preload on a shared 2-core host
def test_job_overhead_smoke_runs_from_a_fresh_clone() -> None:
    out = smoke("job_overhead.py", timeout=540)
    assert "3 jobs of 0.5 s tiny audio" in out
    for name in ("bare Celery task (enqueue->get)", "pipeline job (enqueue->wait)",
                 "pipeline overhead (minus work)", "job generate"):
        assert re.search(rf"{re.escape(name)}\s+{NUMBER}\s+{NUMBER}$", out, flags=re.M), out
    assert re.search(rf"pipeline overhead is {NUMBER}x a bare Celery round trip", out)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(600)  # two worker start-ups and a heartbeat recovery on a shared host
def test_recovery_smoke_prints_the_redis_row() -> None:
    out = smoke("recovery.py", timeout=540)
    assert re.search(rf"^redis: (?:{NUMBER} s|lost)$", out, flags=re.M), out
    assert re.search(rf"^redis\s+(?:{NUMBER}|-)\s+(?:{NUMBER}|-)\s+[01]/1$", out, flags=re.M), out
