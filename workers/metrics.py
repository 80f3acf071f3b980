"""Prometheus metrics of one worker node, served on ``monitoring.metrics_port``.

The prefork pool's children run the jobs, but only the parent lives long enough to serve HTTP,
so prometheus_client runs in multiprocess mode: every process writes its samples to memory-mapped
files in ``PROMETHEUS_MULTIPROC_DIR`` and the parent's ``MultiProcessCollector`` adds them up on
each scrape. That variable must be set before the first metric is created in any process, and
inherited by the children, hence ``worker_init`` (in the parent, before the pool forks). The
directory is per worker node (``<app.data_dir>/metrics/<node name>``) and emptied at start:
files left by a previous run would otherwise be added to this run's counters.

The outcome settler (``workers/outcome.py``) and the task call the ``observe_*`` functions;
they never raise (a metrics bug must not fail a job that has made its file) and do nothing
useful outside a worker (no server reads them).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery.signals import worker_init, worker_process_init, worker_process_shutdown, worker_ready

from pipeline.contract.outcome import FinalStatus
from workers.typed_celery import receiver

if TYPE_CHECKING:
    # Only for the annotation: importing workers.generation loads workers.runtime, hence torch,
    # which this module (imported by every task module) must not pay for.
    from workers.generation import BatchStats

log = logging.getLogger(__name__)

__all__ = ["model_of", "observe_batch", "observe_engine", "observe_failure",
           "observe_model_load", "observe_recovered", "observe_success", "setup_metrics"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Scraped from the monitoring host, so not loopback only; the metrics hold no secret.
METRICS_ADDRESS = "0.0.0.0"
# Ports tried from monitoring.metrics_port on: one worker per GPU, up to 8 GPUs on a host.
PORT_TRIES = 8
# A cache hit costs a dict lookup under a lock (microseconds); any real load reads a checkpoint
# from disk (tens of milliseconds at least). Below this, a job's model_load timing was a hit.
MODEL_LOAD_MIN_S = 0.001
ENGINES = ("static", "hf")  # the values of the musicgen_engine gauge's engine label

_GENERATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_RTF_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 4, 8, 16, 32)
_WAIT_BUCKETS = (0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_LOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
_BATCH_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _Metrics:
    """The metric objects, built on first use: after ``PROMETHEUS_MULTIPROC_DIR`` is set."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.jobs = Counter("musicgen_jobs", "Jobs that reached a final outcome",
                            ["model", "outcome", "error_code"])
        self.audio = Counter("musicgen_audio_seconds", "Seconds of audio produced", ["model"])
        self.generation = Histogram("musicgen_generation_seconds",
                                    "Time in the model's generate call per succeeded job (the "
                                    "whole call, shared with the job's batch)",
                                    ["model"], buckets=_GENERATION_BUCKETS)
        self.realtime_factor = Histogram("musicgen_realtime_factor",
                                         "Audio seconds per second of the job's share of its "
                                         "generate call (>1: faster than real time)", ["model"], buckets=_RTF_BUCKETS)
        self.queue_wait = Histogram("musicgen_queue_wait_seconds",
                                    "Enqueue to start of the succeeded job's last attempt",
                                    ["model"], buckets=_WAIT_BUCKETS)
        self.model_load = Histogram("musicgen_model_load_seconds", "Time to load a model",
                                    ["model"], buckets=_LOAD_BUCKETS)
        # One observation per generate call (not per job): the mean is jobs per call. The static
        # engine observes once per decode step: the mean is rows per step.
        self.batch_size = Histogram("musicgen_batch_size",
                                    "Jobs in one generate call (static engine: rows in one step)",
                                    ["model"], buckets=_BATCH_SIZE_BUCKETS)
        self.batch_wait = Histogram("musicgen_batch_wait_seconds",
                                    "Submission of a batch's oldest job to its generate call "
                                    "(static engine: to its row)",
                                    ["model"], buckets=_BATCH_WAIT_BUCKETS)
        # The fraction belongs to one process's generation loop: summing it over processes is
        # meaningless, so "liveall" keeps one series per live process (label pid) and drops a
        # pool child's series when it exits (mark_process_dead in setup_metrics). "max" would
        # instead keep a dead child's last value in the maximum until the node restarts. Take
        # max or avg by (model) in the query.
        self.busy_fraction = Gauge("musicgen_generation_busy_fraction",
                                   "Share of its wall time the generation loop spent generating",
                                   ["model"], multiprocess_mode="liveall")
        # A counter as well, so rate() gives the busy share over any window, not since start.
        self.busy_seconds = Counter("musicgen_generation_busy_seconds",
                                    "Seconds the generation loop spent in generate calls",
                                    ["model"])
        self.settings_reloads = Counter("musicgen_settings_reloads",
                                        "Settings reloads by outcome (applied, unchanged, invalid, "
                                        "restart_required, failed)", ["outcome"])
        # 1 for the engine serving the model in a live process, 0 for the other one
        # (workers/runtime/engine/serving.py): "liveall" keeps one series per process, so a
        # node whose processes disagree shows it; take max by (model, engine) in the query.
        self.engine = Gauge("musicgen_engine",
                            "Which engine serves the model: static (our decode engine, checked "
                            "against HF at start) or hf", ["model", "engine"],
                            multiprocess_mode="liveall")
        # Counted by the live worker that re-published them (workers/recovery.py).
        self.recovered = Counter("musicgen_recovered_jobs",
                                 "Jobs of dead workers put back on their queues by the heartbeat "
                                 "recovery, before the broker's visibility timeout")


_metrics: _Metrics | None = None
_server: Any = None  # the parent's HTTP server, once started


def _get() -> _Metrics:
    global _metrics
    if _metrics is None:
        _metrics = _Metrics()
    return _metrics


def model_of(args: Any) -> str:
    """The model label of a task's ``args`` (its JSON payload first); ``unknown`` if unreadable.

    A failure hook may see a message no producer of ours sent, so nothing is assumed of it.
    """
    payload = args[0] if isinstance(args, (list, tuple)) and args else None
    model = payload.get("model") if isinstance(payload, Mapping) else None
    return str(model) if model else "unknown"


def observe_success(model: str, result: Mapping[str, Any]) -> None:
    """Count a succeeded job from its ``JobResult`` dict: timings, real-time factor, audio."""
    try:
        m = _get()
        timings = result.get("timings") or {}
        generate = float(timings.get("generate") or 0.0)
        audio = float(result.get("duration") or 0.0)
        m.jobs.labels(model, FinalStatus.SUCCEEDED.value, "").inc()
        m.queue_wait.labels(model).observe(max(0.0, float(timings.get("queue_wait") or 0.0)))
        if audio > 0:
            m.audio.labels(model).inc(audio)
        if generate > 0:
            m.generation.labels(model).observe(generate)
            if audio > 0:
                # The call made batch_size clips at once: the job's own share of it is what its
                # audio cost, so a full batch reads as the speed-up it is.
                share = generate / max(1, int(result.get("batch_size") or 1))
                m.realtime_factor.labels(model).observe(audio / share)
        load = float(timings.get("model_load") or 0.0)
        if load >= MODEL_LOAD_MIN_S:  # the job itself loaded the model (cache miss)
            observe_model_load(model, load)
    except Exception:
        log.warning("could not record metrics of a succeeded %s job", model, exc_info=True)


def observe_failure(model: str, code: str) -> None:
    """Count a job that ended in error ``code`` (``timeout`` counts as outcome ``timeout``)."""
    try:
        _get().jobs.labels(model, FinalStatus.of_error(code).value, code).inc()
    except Exception:
        log.warning("could not record metrics of a failed %s job", model, exc_info=True)


def observe_model_load(model: str, seconds: float) -> None:
    """Record one model load that took ``seconds``."""
    try:
        _get().model_load.labels(model).observe(seconds)
    except Exception:
        log.warning("could not record the load time of %s", model, exc_info=True)


def observe_batch(stats: BatchStats) -> None:
    """Record one generate call of the batching engine (``HfLoop``'s ``on_batch``), or one
    decode step of the continuous loop (``EngineLoop``'s): its size is the rows active in
    that step, its wait the admission wait of the oldest job that joined just before it."""
    try:
        m = _get()
        m.batch_size.labels(stats.model).observe(stats.size)
        if stats.wait_s is not None:  # a step that admitted nobody has no wait to report
            m.batch_wait.labels(stats.model).observe(max(0.0, stats.wait_s))
        m.busy_fraction.labels(stats.model).set(stats.busy_fraction)
        if stats.generate_s > 0:  # a Counter refuses a negative increment
            m.busy_seconds.labels(stats.model).inc(stats.generate_s)
    except Exception:
        log.warning("could not record metrics of a batch of %s", getattr(stats, "model", "?"),
                    exc_info=True)


def observe_engine(model: str, engine: str) -> None:
    """Record that ``engine`` (``static`` or ``hf``) serves ``model`` in this process."""
    try:
        m = _get()
        for name in ENGINES:
            m.engine.labels(model, name).set(1 if name == engine else 0)
    except Exception:
        log.warning("could not record which engine serves %s", model, exc_info=True)


def observe_settings_reload(outcome: str) -> None:
    """Count one settings reload of this process by its outcome."""
    try:
        _get().settings_reloads.labels(outcome).inc()
    except Exception:
        log.warning("could not record a settings reload", exc_info=True)


def observe_recovered(count: int) -> None:
    """Count ``count`` jobs of a dead worker that this process put back on their queues."""
    try:
        _get().recovered.inc(count)
    except Exception:
        log.warning("could not count %d recovered jobs", count, exc_info=True)


def metrics_dir(data_dir: str, node: str) -> Path:
    """``<data_dir>/metrics/<node>``, the node name made safe as one folder name."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", node) or "worker"
    return Path(data_dir).expanduser().resolve() / "metrics" / safe


def _enable_multiprocess(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)  # inherited by the pool children forked after this
    from prometheus_client import values

    # prometheus_client picks its value class when first imported; if anything imported it
    # before this point, pick again now that the directory is set (no metric exists yet).
    if values.ValueClass is values.MutexValue:
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def _serve(app: Any, port: int) -> None:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from workers import health

    global _server
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=os.environ[MULTIPROC_ENV])  # type: ignore[no-untyped-call]
    # /livez and /readyz on the same port (workers/health.py): what the kubelet probes.
    checks = health.HealthServer(registry, app.settings.monitoring.liveness_timeout_s,
                                 health.broker_check(app))
    try:
        # Several workers on one host (one per GPU) share monitoring.metrics_port: each takes the
        # next free port, so every one exports (scrape port .. port + PORT_TRIES - 1).
        _server, taken = health.serve(port, METRICS_ADDRESS, checks, tries=PORT_TRIES)
    except OSError as exc:
        log.error("metrics not served: ports %s-%s (monitoring.metrics_port on) are all taken: %s",
                  port, port + PORT_TRIES - 1, exc)
        return
    log.info("serving Prometheus metrics on %s:%s/metrics, health on /livez and /readyz",
             METRICS_ADDRESS, taken)


def setup_metrics(app: Any) -> None:
    """Connect the worker signals that set up, serve and tidy the metrics of ``app``'s worker.

    Nothing happens until a worker starts: building the app for ``celery inspect`` or a test
    opens no port.
    """
    settings = app.settings

    @receiver(worker_init)
    def _prepare(sender: Any = None, **_: Any) -> None:  # parent, before the pool forks
        try:
            node = str(getattr(sender, "hostname", None) or f"pid{os.getpid()}")
            _enable_multiprocess(metrics_dir(settings.app.data_dir, node))
        except Exception:
            log.exception("metrics disabled: could not prepare their directory")

    @receiver(worker_ready)
    def _start(**_: Any) -> None:  # parent, once the pool runs
        if MULTIPROC_ENV in os.environ and settings.monitoring.metrics_port:  # 0 = off
            _serve(app, settings.monitoring.metrics_port)

    @receiver(worker_process_init)
    def _forget_server(**_: Any) -> None:  # a pool child forked after the server started
        # The child inherited the listening socket; holding it would keep the port bound after
        # the parent dies, so a restarted worker could not serve its metrics.
        if _server is not None:
            _server.socket.close()

    @receiver(worker_process_shutdown)
    def _dead(pid: int | None = None, **_: Any) -> None:  # in the exiting pool child
        if MULTIPROC_ENV not in os.environ:
            return
        from prometheus_client import multiprocess

        # Drops the child's live-gauge files; its counters and histograms stay and keep counting.
        multiprocess.mark_process_dead(pid or os.getpid())  # type: ignore[no-untyped-call]
