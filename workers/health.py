"""Health a kubelet can probe: ``/livez`` and ``/readyz`` beside ``/metrics`` on the metrics port.

The generation loops and the model live in whichever process runs the jobs (a prefork child,
or the main process of the threads and solo pools), while only the main process serves HTTP.
So the processes report through the same multiprocess files as the metrics: each loop writes
the time of its last step or idle tick into a ``liveall`` gauge (one series per live process,
dropped when a pool child exits), each process says whether its model is ready in another, and
the server reads them back on each probe.

- ``/livez`` fails when a loop's last tick is older than ``monitoring.liveness_timeout_s``: the
  loop thread died, or it is stuck in one step (a hung kernel, a deadlock). A process whose loop
  has not started yet (no job so far) has nothing to be stuck in and counts as alive.
- ``/readyz`` fails until every job process has loaded its model and passed its self-check,
  and while the broker does not answer.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

log = logging.getLogger(__name__)

__all__ = ["HealthServer", "liveness", "loop_tick", "mark_ready", "readiness", "serve"]

HEARTBEAT = "musicgen_loop_heartbeat_timestamp_seconds"
READY = "musicgen_worker_ready"
# A tick is a gauge write into a memory-mapped file: cheap, but a step every few milliseconds
# need not write each time. Far below any sane liveness timeout.
TICK_EVERY_S = 0.5
# How long an idle loop sleeps between ticks (the loops wait on a condition with this timeout).
IDLE_TICK_S = 2.0
BROKER_TIMEOUT_S = 3.0

_lock = threading.Lock()
_gauges: dict[str, Any] = {}
_last_tick: dict[str, float] = {}


def _gauge(name: str, doc: str) -> Any:
    """Built on first use, once ``PROMETHEUS_MULTIPROC_DIR`` is set (workers.metrics)."""
    with _lock:
        if name not in _gauges:
            from prometheus_client import Gauge

            labels = ["loop"] if name == HEARTBEAT else ["model"]
            _gauges[name] = Gauge(name, doc, labels, multiprocess_mode="liveall")
        return _gauges[name]


def loop_tick(loop: str) -> None:
    """Record that ``loop`` (a loop thread's name) went round: called every step and idle tick."""
    now = time.time()
    if now - _last_tick.get(loop, 0.0) < TICK_EVERY_S:
        return
    _last_tick[loop] = now
    try:
        _gauge(HEARTBEAT, "Unix time of the generation loop's last step or idle tick"
               ).labels(loop).set(now)
    except Exception:  # liveness must never stop the loop it watches
        log.warning("could not record a loop tick", exc_info=True)
    from workers import gpu_metrics

    gpu_metrics.sample()  # the loop's process holds the device: sample it on the same beat


def mark_ready(model: str, ready: bool) -> None:
    """Say whether this process's ``model`` is loaded and passed its self-check."""
    try:
        _gauge(READY, "1 once the process's model is loaded and passed its self-check"
               ).labels(model).set(1 if ready else 0)
    except Exception:
        log.warning("could not record readiness", exc_info=True)


def _samples(families: Iterable[Any], name: str) -> list[Any]:
    return [s for f in families if f.name == name for s in f.samples if s.name == name]


def liveness(families: Iterable[Any], timeout_s: float, now: float | None = None) -> list[str]:
    """What is wrong with the loops (empty: alive), from the collected metric families."""
    now = time.time() if now is None else now
    return [f"loop {s.labels.get('loop')} of pid {s.labels.get('pid')} last ticked "
            f"{now - s.value:.1f} s ago (limit {timeout_s:g} s)"
            for s in _samples(families, HEARTBEAT) if now - s.value > timeout_s]


def readiness(families: Iterable[Any]) -> list[str]:
    """What keeps the worker from being ready (empty: ready), from the collected families."""
    samples = _samples(families, READY)
    if not samples:
        return ["no job process has loaded its model yet"]
    return [f"model {s.labels.get('model')} of pid {s.labels.get('pid')} is not ready"
            for s in samples if s.value != 1]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up the worker's exit


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # a probe every few seconds would flood the worker's log


class HealthServer:
    """``/metrics`` of ``registry``, ``/livez`` and ``/readyz`` on one port.

    ``broker_ok`` returns None when the broker answers, else why not.
    """

    def __init__(self, registry: Any, liveness_timeout_s: float,
                 broker_ok: Callable[[], str | None]) -> None:
        from prometheus_client import make_wsgi_app

        self.registry = registry
        self.liveness_timeout_s = liveness_timeout_s
        self.broker_ok = broker_ok
        self._metrics = make_wsgi_app(registry)

    def problems(self, path: str) -> list[str]:
        families = list(self.registry.collect())
        if path == "/livez":
            return liveness(families, self.liveness_timeout_s)
        problems = readiness(families)
        broker = self.broker_ok()
        return problems + ([f"broker: {broker}"] if broker else [])

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = environ.get("PATH_INFO", "")
        if path not in ("/livez", "/readyz"):
            return self._metrics(environ, start_response)
        try:
            problems = self.problems(path)
        except Exception as exc:  # a probe that cannot look says so instead of a stack trace
            problems = [f"health check failed: {exc}"]
        body = json.dumps({"ok": not problems, "problems": problems}).encode()
        start_response("200 OK" if not problems else "503 Service Unavailable",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]


def serve(port: int, address: str, app: HealthServer, *, tries: int = 1) -> tuple[WSGIServer, int]:
    """Serve ``app`` from a daemon thread on the first free port of ``port`` and the
    ``tries - 1`` after it (two workers on one host: the second takes the next port); the server
    and its port. Raises the last OSError if none is free."""
    error: OSError | None = None
    for candidate in range(port, port + max(1, tries)):
        try:
            server = make_server(address, candidate, app, _Server, handler_class=_Quiet)
        except OSError as exc:
            error = exc
            continue
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        return server, candidate
    assert error is not None
    raise error


def broker_check(app: Any) -> Callable[[], str | None]:
    """A check that the Celery ``app``'s broker answers (a fresh connection, bounded wait)."""
    def check() -> str | None:
        try:
            with app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    return check
