"""``observe_batch``: the batching engine's Prometheus metrics, as the worker's server reads them.

The metrics run in multiprocess mode in a worker (see ``workers.metrics``), so each scenario
runs ``observe_batch`` in a fresh Python process that inherits ``PROMETHEUS_MULTIPROC_DIR``, as a
pool child does, and the test reads the files back with ``MultiProcessCollector``, as the
worker's HTTP server does on each scrape. That also keeps this test process's own
prometheus_client registry untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, multiprocess
from prometheus_client.multiprocess import MultiProcessCollector

from workers import metrics

REPO_ROOT = Path(__file__).resolve().parents[2]

# Calls observe_batch with each BatchStats given as JSON fields, then prints its pid.
_OBSERVE = """
import json, os, sys
from workers.generation import BatchStats
from workers.metrics import observe_batch
for fields in json.loads(sys.argv[1]):
    observe_batch(BatchStats(**fields))
print(os.getpid())
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _stats(model: str = "tiny", *, size: Any, wait_s: float = 0.0, generate_s: float = 1.0,
           busy_fraction: float = 0.5) -> dict[str, Any]:
    return {"model": model, "size": size, "wait_s": wait_s, "generate_s": generate_s,
            "busy_fraction": busy_fraction}


def _start(folder: Path, batches: list[dict[str, Any]]) -> subprocess.Popen[str]:
    env = {**os.environ, metrics.MULTIPROC_ENV: str(folder)}
    return subprocess.Popen([sys.executable, "-c", _OBSERVE, json.dumps(batches)], cwd=REPO_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Wait for a process started by ``_start``; return its pid and stderr."""
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return int(out.strip()), err


def _scrape(folder: Path) -> Samples:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))  # type: ignore[no-untyped-call]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect() for s in family.samples}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "metrics"
    path.mkdir()
    return path


def test_observe_batch_records_size_wait_and_busy_time_per_model(folder: Path) -> None:
    pid, _ = _finish(_start(folder, [
        _stats(size=4, wait_s=0.02, generate_s=1.5, busy_fraction=0.5),
        _stats(size=2, wait_s=0.3, generate_s=0.5, busy_fraction=0.75),
        _stats("small", size=1, wait_s=7.0, generate_s=3.0, busy_fraction=0.8),
    ]))
    samples = _scrape(folder)
    tiny = (("model", "tiny"),)
    # Batch size: one observation per call, in the buckets the brief set.
    assert samples[("musicgen_batch_size_count", tiny)] == 2.0
    assert samples[("musicgen_batch_size_sum", tiny)] == 6.0
    assert [samples[("musicgen_batch_size_bucket", (("le", le), ("model", "tiny")))]
            for le in ("1.0", "2.0", "3.0", "4.0", "32.0", "+Inf")] == [0.0, 1.0, 1.0, 2.0,
                                                                        2.0, 2.0]
    assert samples[("musicgen_batch_size_count", (("model", "small"),))] == 1.0
    # Batch wait: 0.02 s falls in the 25 ms bucket, 0.3 s in the 0.5 s one.
    assert samples[("musicgen_batch_wait_seconds_sum", tiny)] == pytest.approx(0.32)
    assert [samples[("musicgen_batch_wait_seconds_bucket", (("le", le), ("model", "tiny")))]
            for le in ("0.01", "0.025", "0.25", "0.5", "30.0")] == [0.0, 1.0, 1.0, 2.0, 2.0]
    assert samples[("musicgen_batch_wait_seconds_sum", (("model", "small"),))] == 7.0
    # Busy seconds add up; the busy fraction is the loop's latest figure, per process.
    assert samples[("musicgen_generation_busy_seconds_total", tiny)] == pytest.approx(2.0)
    assert samples[("musicgen_generation_busy_seconds_total", (("model", "small"),))] == 3.0
    assert samples[("musicgen_generation_busy_fraction",
                    (("model", "tiny"), ("pid", str(pid))))] == 0.75
    assert samples[("musicgen_generation_busy_fraction",
                    (("model", "small"), ("pid", str(pid))))] == 0.8


def test_observe_batch_never_raises_and_says_why_it_recorded_nothing(folder: Path) -> None:
    # A size that is not a number makes prometheus_client raise inside observe_batch.
    _, err = _finish(_start(folder, [_stats(size="four", generate_s=9.0),
                                     _stats(size=3, generate_s=1.0)]))
    assert "could not record metrics of a batch of tiny" in err
    samples = _scrape(folder)
    # The bad call stopped at its first metric; the next call was recorded in full.
    assert samples[("musicgen_batch_size_count", (("model", "tiny"),))] == 1.0
    assert samples[("musicgen_generation_busy_seconds_total", (("model", "tiny"),))] == 1.0


def test_busy_fraction_is_one_series_per_live_process(folder: Path) -> None:
    # Two pool children, each with its own generation loop; then one exits, and the worker's
    # worker_process_shutdown hook marks it dead (what setup_metrics does in the child).
    first = _start(folder, [_stats(size=2, generate_s=1.0, busy_fraction=0.9)])
    second = _start(folder, [_stats(size=1, generate_s=2.0, busy_fraction=0.2)])
    (gone, _), (alive, _) = _finish(first), _finish(second)

    def busy(samples: Samples, pid: int) -> float | None:
        return samples.get(("musicgen_generation_busy_fraction",
                            (("model", "tiny"), ("pid", str(pid)))))

    before = _scrape(folder)
    assert (busy(before, gone), busy(before, alive)) == (0.9, 0.2)
    multiprocess.mark_process_dead(gone, path=str(folder))  # type: ignore[no-untyped-call]
    samples = _scrape(folder)
    # The exited loop's figure goes (a "max" gauge would have kept its 0.9 until a restart);
    # counters and histograms keep its calls.
    assert (busy(samples, gone), busy(samples, alive)) == (None, 0.2)
    assert samples[("musicgen_generation_busy_seconds_total", (("model", "tiny"),))] == 3.0
    assert samples[("musicgen_batch_size_sum", (("model", "tiny"),))] == 3.0


_SUCCESS = """
import json, sys
from workers.metrics import observe_success
for result in json.loads(sys.argv[1]):
    observe_success("tiny", result)
"""


def test_a_batched_jobs_real_time_factor_counts_its_share_of_the_call(folder: Path) -> None:
    results = [{"duration": 2.0, "batch_size": 4, "timings": {"generate": 1.0}},
               {"duration": 2.0, "timings": {"generate": 1.0}}]  # an older result: a batch of one
    env = {**os.environ, metrics.MULTIPROC_ENV: str(folder)}
    proc = subprocess.run([sys.executable, "-c", _SUCCESS, json.dumps(results)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    samples = _scrape(folder)
    tiny = (("model", "tiny"),)
    # 2 s of audio from a quarter of a 1 s call is 8x real time; alone, 2x.
    assert samples[("musicgen_realtime_factor_sum", tiny)] == pytest.approx(8.0 + 2.0)
    assert samples[("musicgen_generation_seconds_sum", tiny)] == pytest.approx(2.0)  # whole calls
