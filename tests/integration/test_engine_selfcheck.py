"""A real worker checks its static engine before serving, and says which engine serves.

Two real worker processes (threads pool, model preloaded): one whose engine is sound and one
whose engine steps all raise (fault injection). Each preload runs the canary; `health` shows
what each worker's heartbeat recorded, the Prometheus gauge says the same, and a job sent to
the broken worker still succeeds, on the hf path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Worker, WorkerFactory, base_env, run_caller, wait_for
from .test_stats_health import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def health_engines(workdir: Path, redis_url: str) -> dict[str, dict[str, str]]:
    """Worker name -> model -> engine, as `musicgen-pipeline health --json` reports them."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "health", "--json"],
                          cwd=workdir, env=base_env(workdir, redis_url), capture_output=True,
                          text=True, timeout=120, check=False)
    report: dict[str, Any] = json.loads(proc.stdout)
    return {w["worker"]: w["engines"] for w in report["checks"]["engines"] or []}


def gauge(port: int) -> dict[str, float]:
    """``musicgen_engine`` samples of the worker's metrics: engine -> value, for model tiny."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {s.labels["engine"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "musicgen_engine" and s.labels.get("model") == "tiny"}


def test_health_and_the_gauge_show_the_engine_each_worker_serves_with(
        workdir: Path, redis_url: str, workers: WorkerFactory) -> None:
    ports = free_port(), free_port()
    env = {"MUSICGEN_MODEL__ENGINE": "static", "MUSICGEN_MODEL__PRELOAD": "true",
           "MUSICGEN_RECOVERY__HEARTBEAT_INTERVAL": "1"}
    sound: Worker = workers.start(pool="threads", queues="musicgen.tiny", faults=True, **env,
                                  MUSICGEN_MONITORING__METRICS_PORT=str(ports[0]))
    broken: Worker = workers.start(pool="threads", queues="musicgen.tiny", faults=True, **env,
                                   MUSICGEN_MONITORING__METRICS_PORT=str(ports[1]),
                                   FAULTS_ENGINE_BROKEN="1")
    want = {sound.name: {"tiny": "static"}, broken.name: {"tiny": "hf"}}
    seen: list[dict[str, dict[str, str]]] = []
    wait_for(lambda: seen.append(health_engines(workdir, redis_url)) or seen[-1] == want, 60,
             f"health to show {want} (last {seen[-1:]})")
    assert gauge(ports[0]) == {"static": 1.0, "hf": 0.0}
    assert gauge(ports[1]) == {"static": 0.0, "hf": 1.0}
    [line] = [ln for ln in broken.log_text().splitlines() if "served by the hf path" in ln]
    assert "self-check failed: the engine raised IndexError" in line
    assert "Traceback" not in broken.log_text()
    assert "passed its self-check" in sound.log_text()
    # The broken worker serves: its jobs take HF generate (the sound one is stopped first).
    sound.stop()
    out = run_caller(workdir, redis_url, {"prompt": "calm piano", "duration": 1.0,
                                          "format": "wav"})
    assert out["result"]["worker"] == broken.name, out
