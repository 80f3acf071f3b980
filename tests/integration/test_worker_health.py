"""The worker as a kubelet, Prometheus and a log shipper see it: its health endpoints, the metric
names deploy/ relies on, and its JSON log.

One real worker (prefork, fault injection loaded, its own metrics port, JSON logs) serves the
module. Its
last test wedges the generation loop (``FAULT:ignore-soft``: a step that never returns), so it
runs last and kills the worker; the tests before it leave the worker as they found it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import Settings
from pipeline.ops.queue_metrics import QueueCollector, breaker_reader

from .conftest import (
    Worker,
    WorkerFactory,
    base_env,
    caller_output,
    run_caller,
    start_caller,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
LIVENESS_TIMEOUT_S = 4.0
HEARTBEAT = "musicgen_loop_heartbeat_timestamp_seconds"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Fleet:
    workdir: Path
    redis_url: str
    worker: Worker
    port: int
    job_id: str = ""  # the job test_an_idle_loop_keeps_ticking ran

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as resp:
                return int(resp.status), resp.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    def heartbeats(self) -> list[float]:
        _, text = self.get("/metrics")
        return [s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == HEARTBEAT]


@pytest.fixture(scope="module")
def fleet(workdir: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    port = free_port()
    env = {"MUSICGEN_MONITORING__METRICS_PORT": str(port),
           "MUSICGEN_MONITORING__LIVENESS_TIMEOUT_S": str(LIVENESS_TIMEOUT_S),
           "MUSICGEN_LOGGING__FORMAT": "json",
           # The hang test's job fails at its soft limit (so its message is acked and nothing is
           # redelivered to another module's worker) well after liveness has failed, and long
           # before the hard limit would end the process.
           "MUSICGEN_WORKER__SOFT_TIME_LIMIT": "12", "MUSICGEN_WORKER__HARD_TIME_LIMIT": "120",
           "MUSICGEN_WORKER__TIME_LIMIT_PER_SECOND": "0", "MUSICGEN_WORKER__MAX_RETRIES": "0"}
    factory = WorkerFactory(workdir, redis_url, tmp_path_factory.mktemp("health"))
    worker = factory.start(faults=True, **env)
    try:
        yield Fleet(workdir, redis_url, worker, port)
    finally:
        if worker.proc.poll() is None:
            worker.kill9()


@dataclass
class Prometheus:
    port: int

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": expr}))
        with urllib.request.urlopen(url, timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]["result"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def prometheus(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A real Prometheus (Debian's) scraping the worker and a queue exporter every second, with
    deploy/'s rules loaded."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus (Debian's package) is installed by .ci/install"
    tmp = tmp_path_factory.mktemp("prometheus")
    exporter_port, port = free_port(), free_port()
    exporter = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "queue-exporter", "--port",
                                 str(exporter_port), "--address", "127.0.0.1", "-Q", "musicgen.tiny"],
                                cwd=fleet.workdir, env=base_env(fleet.workdir, fleet.redis_url),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(REPO / "deploy/prometheus/rules.yaml")],
              "scrape_configs": [
                  {"job_name": "worker", "static_configs": [{"targets": [f"127.0.0.1:{fleet.port}"]}]},
                  {"job_name": "queue-exporter",
                   "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}]}
    (tmp / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    with (tmp / "log").open("w") as log:  # the child keeps its own copy of the descriptor
        server = subprocess.Popen([binary, f"--config.file={tmp / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp / 'data'}",
                                   f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=log)
    prom = Prometheus(port)

    def both_up() -> bool:
        try:
            return len([r for r in prom.query("up == 1")]) == 2
        except OSError:
            return False

    try:
        wait_for(both_up, 60, "Prometheus to scrape the worker and the exporter")
        yield prom
    finally:
        for proc in (server, exporter):
            proc.terminate()
            proc.wait(10)


def test_ready_and_live_once_the_model_is_loaded(fleet: Fleet) -> None:
    # The pool child preloads after the parent logs "ready": wait for that state.
    wait_for(lambda: fleet.get("/readyz")[0] == 200, 60, "/readyz to pass")
    status, body = fleet.get("/readyz")
    assert json.loads(body) == {"ok": True, "problems": []}
    assert fleet.get("/livez")[0] == 200


def test_an_idle_loop_keeps_ticking(fleet: Fleet, prometheus: Prometheus) -> None:
    # Prometheus scrapes from before the jobs, so their counters rise inside its windows.
    out = run_caller(fleet.workdir, fleet.redis_url,
                     {"prompt": "warm up", "duration": 0.5, "format": "wav"})
    assert "result" in out, out
    # A counter series starts at its first sample: once Prometheus holds the succeeded one, a
    # second success makes every rate of the dashboard rise (and a failure adds an error code).
    wait_for(lambda: bool(prometheus.query('musicgen_jobs_total{outcome="succeeded"}')), 30,
             "Prometheus to scrape the first success")
    again = start_caller(fleet.workdir, fleet.redis_url,
                         {"prompt": "second", "duration": 0.5, "format": "wav"})
    failed = caller_output(start_caller(fleet.workdir, fleet.redis_url,
                                        {"prompt": "FAULT:permanent no such sound", "duration": 0.5}))
    assert failed["error"]["details"]["error_code"] == "invalid_request", failed
    assert "result" in caller_output(again)
    done = time.time()
    # The job started the loop; idle after it, the loop still ticks past the liveness window.
    wait_for(lambda: any(b > done + LIVENESS_TIMEOUT_S + 1 for b in fleet.heartbeats()), 30,
             "an idle tick after the liveness window")
    assert fleet.get("/livez")[0] == 200
    fleet.job_id = out["job_id"]


# Exported only by a process that has CUDA up (workers/gpu_metrics.py): none on this CPU node.
GPU_ONLY = re.compile(r"\bmusicgen_gpu_")


def named_metrics() -> set[str]:
    """The metric names deploy/'s rules and dashboard query (recording rules excluded)."""
    text = (REPO / "deploy/prometheus/rules.yaml").read_text()
    text += (REPO / "deploy/grafana/musicgen-pipeline.json").read_text()
    return {n for n in re.findall(r"\b(musicgen_[a-z_]+)", text) if not GPU_ONLY.match(n)}


def test_every_metric_deploy_names_is_exported(fleet: Fleet, redis_url: str) -> None:
    assert fleet.job_id, "runs after a job went through the worker"
    _, text = fleet.get("/metrics")
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    exporter = CollectorRegistry()
    settings = Settings.model_validate({"broker": {"url": redis_url}})
    exporter.register(QueueCollector(settings, ["musicgen.tiny"],
                                     breaker_reader(settings, ["tiny"])))
    exported |= {s.name for f in exporter.collect() for s in f.samples}
    named = named_metrics()
    assert len(named) >= 10
    assert named <= exported, sorted(named - exported)


def test_prometheus_answers_the_dashboards_expressions(fleet: Fleet,
                                                       prometheus: Prometheus) -> None:
    assert fleet.job_id, "runs after the jobs went through the worker"
    dashboard = json.loads((REPO / "deploy/grafana/musicgen-pipeline.json").read_text())
    exprs = {p["title"]: p["targets"][0]["expr"] for p in dashboard["panels"]}
    results: dict[str, list[dict[str, Any]]] = {}

    def all_answer() -> bool:  # every query is valid PromQL; all but the GPU's have data
        results.update({title: prometheus.query(expr) for title, expr in exprs.items()})
        return all(r for t, r in results.items() if not GPU_ONLY.search(exprs[t]))

    wait_for(all_answer, 60, "every dashboard panel to have data")
    values = {t: [float(r["value"][1]) for r in rs] for t, rs in results.items()}
    assert all(math.isfinite(v) and v >= 0 for vs in values.values() for v in vs), values
    assert max(values["Jobs per second by outcome"]) > 0
    assert {r["metric"]["error_code"] for r in results["Errors per second by code"]} == \
        {"invalid_request"}
    assert all(0 <= v <= 1 for v in values["Generation loop busy fraction"])
    assert values["Queue depth (waiting, all priorities)"] == [0]
    assert values["Workers wanted vs live"] == [0]  # nothing waits, nothing runs: back to zero
    assert max(values["Seconds since each loop stepped"]) < LIVENESS_TIMEOUT_S + 2


def test_the_log_is_json_line_by_line_with_the_job_fields(fleet: Fleet) -> None:
    records = [json.loads(line) for line in fleet.worker.log_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    mine = [r for r in records if r.get("job_id") == fleet.job_id]
    assert any("started" in r["message"] for r in mine) and any("ended" in r["message"] for r in mine)
    for record in mine:
        assert record["queue"] == "musicgen.tiny" and record["attempt"] == 1
        assert re.fullmatch(r"[0-9a-f]{16}", record["user"])  # a hash, never the user id


def test_a_wedged_loop_fails_liveness(fleet: Fleet) -> None:
    wait_for(lambda: fleet.get("/livez")[0] == 200, 30, "/livez to pass before the hang")
    caller = start_caller(fleet.workdir, fleet.redis_url,
                          {"prompt": "FAULT:ignore-soft", "duration": 0.5}, timeout=60)
    try:
        wait_for(lambda: fleet.get("/livez")[0] == 503, 60, "/livez to fail on the wedged loop")
        body = json.loads(fleet.get("/livez")[1])
        assert not body["ok"] and "loop continuous" in body["problems"][0], body
        # The job fails at its soft limit; the loop stays wedged and liveness stays failed.
        out = caller_output(caller, 90)
        assert out["error"]["details"]["error_code"] == "timeout", out
        assert fleet.get("/livez")[0] == 503
    finally:
        if caller.poll() is None:
            caller.kill()
        fleet.worker.kill9()
