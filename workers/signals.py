"""Per-process set-up: the model is loaded after the fork, never in the parent or at import.

CUDA cannot be re-initialised in a forked child, and the producer must never import torch, so
the only place a model is loaded is here (or lazily by the first job).
"""

from __future__ import annotations

import logging
from typing import Any

from celery.signals import (
    task_postrun,
    task_prerun,
    task_received,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from workers.health import mark_ready
from workers.metrics import observe_model_load, setup_metrics
from workers.tasks import STATE, runner_for
from workers.typed_celery import receiver

log = logging.getLogger(__name__)


_BEATS: list[Any] = []  # this process's running Recovery, once the worker is ready


def self_check_passed(runner: Any) -> bool:
    """Whether the preloaded engine passed its start-up self-check (True where it has none).

    The one place ``/readyz`` reads the self-check from: the runner exposes it as
    ``self_check_passed`` (a bool, or a function returning one) once that check exists.
    The static engine's self-check (``workers.runtime.engine.serving``) does not: an engine
    that fails it steps aside and the model is served by the hf path, so the process is ready
    (``health`` and the ``musicgen_engine`` gauge say which engine serves).
    """
    check = getattr(runner, "self_check_passed", None)
    if check is None:
        return True
    return bool(check() if callable(check) else check)


def _setup(app: Any) -> None:
    if app.settings.logging.format == "json":
        # transformers writes through a stderr handler of its own ("[transformers] ..."): hand
        # its records to the root's JSON handler instead. Here, after the fork: it imports torch.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
    runner = runner_for(app)
    preset = app.settings.model.preset
    try:
        seconds = runner.preload()
        if seconds is not None:
            observe_model_load(preset, seconds)
        # Without a preload the first job loads the model: nothing to wait for here.
        mark_ready(preset, self_check_passed(runner))
    except Exception:
        # A worker that cannot load its model still serves: each job reports the error itself
        # (model_not_found is permanent) instead of the process crash-looping. /readyz fails,
        # so Kubernetes sends it no traffic and an operator sees why.
        mark_ready(preset, False)
        log.exception("preloading the model failed")
    for beat in _BEATS:  # which engine serves the preloaded model: in the record now
        beat.heartbeat.poke()


def _serving_engines() -> dict[str, str]:
    """The heartbeat's ``engines``: this process's runner's, where jobs run in this process
    (solo and threads pools; a prefork child's runner is not the beating parent's)."""
    runner = STATE.runner
    return {} if runner is None else runner.serving_engines()


def _connect_recovery(app: Any) -> None:
    """The heartbeat and the look for dead workers (workers/recovery.py), in the main process:
    it receives and acks every message, whatever the pool."""
    from workers import recovery

    if not recovery.enabled_for(app.settings):
        return
    running = _BEATS

    @receiver(worker_ready)
    def _beat(sender: Any = None, **_: Any) -> None:
        try:
            started = recovery.Recovery(app, getattr(sender, "hostname", None),
                                        engines=_serving_engines)
            started.start()
        except Exception:  # Redis away at start: the broker's visibility timeout still holds
            log.exception("heartbeat not started: this worker's jobs are recovered only after "
                          "broker.visibility_timeout if it dies")
            return
        running.append(started)

    @receiver(task_received)
    def _received(**_: Any) -> None:  # record the new message now, not at the next beat
        for beat in running:
            beat.heartbeat.poke()

    @receiver(worker_shutdown)
    def _stop(**_: Any) -> None:  # after the pool stopped: what it held is given back
        while running:
            running.pop().stop()


def _connect_job_logs(app: Any) -> None:
    """Each record a job's thread logs carries its fields (pipeline/infra/log_format.py)."""
    from pipeline.infra import log_format

    log_format.connect_celery(app)
    tokens: dict[str, Any] = {}

    @receiver(task_prerun)
    def _start(task_id: str = "", task: Any = None, args: Any = None, **_: Any) -> None:
        payload = args[0] if isinstance(args, (list, tuple)) and args else None
        user = payload.get("user_id") if isinstance(payload, dict) else None
        request = getattr(task, "request", None)
        queue = ((getattr(request, "delivery_info", None) or {}).get("routing_key"))
        attempt = int(getattr(request, "retries", 0) or 0) + 1
        tokens[task_id] = log_format.start_job(task_id, user, queue, attempt)
        log.info("job %s started (attempt %d)", task_id, attempt)  # a line per job, with its fields

    @receiver(task_postrun)
    def _end(task_id: str = "", state: str | None = None, **_: Any) -> None:
        token = tokens.pop(task_id, None)
        if token is not None:
            log.info("job %s ended: %s", task_id, state)
            log_format.end_job(token)


def connect(app: Any) -> None:
    pool = app.settings.worker.pool
    setup_metrics(app)
    _connect_job_logs(app)
    _connect_recovery(app)  # before the model preload below: beating from the start

    @receiver(worker_process_init)
    def _in_child(**_: Any) -> None:  # prefork children
        STATE.runner = None
        _setup(app)

    @receiver(worker_process_shutdown)
    @receiver(worker_shutdown)
    def _release(**_: Any) -> None:  # drop the models and give GPU memory back before exit
        if STATE.runner is not None:
            STATE.runner.cache.clear()

    @receiver(worker_ready)
    def _in_main(**_: Any) -> None:  # solo and threads pools run jobs in the main process
        if pool in ("solo", "threads"):
            _setup(app)
