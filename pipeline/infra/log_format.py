"""JSON logs (``logging.format = "json"``): one JSON object a line, for the worker, beat and the
gateway, written by python-json-logger.

A record logged while a job runs carries the job's ``job_id``, ``user`` (a hash of its user id:
a log is read by more people than the ledger), ``queue`` and ``attempt``: the worker sets them
per task thread (``job_context``, from Celery's task_prerun/postrun in workers/signals.py) and
a filter on each handler copies them onto every record, whichever logger wrote it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from contextvars import ContextVar, Token
from typing import Any

__all__ = ["JobFields", "end_job", "json_formatter", "start_job", "use_json", "user_hash"]

JOB_FIELDS = ("job_id", "user", "queue", "attempt")
_job: ContextVar[dict[str, Any] | None] = ContextVar("musicgen_log_job", default=None)


def user_hash(user_id: str) -> str:
    """A stable pseudonym of ``user_id`` for logs: joinable across lines, not readable."""
    return hashlib.sha256(user_id.encode()).hexdigest()[:16]


def start_job(job_id: str, user_id: str | None, queue: str | None,
              attempt: int) -> Token[dict[str, Any] | None]:
    """From here on, this thread's records carry the job's fields (until ``end_job``)."""
    return _job.set({"job_id": job_id, "user": user_hash(user_id) if user_id else None,
                     "queue": queue, "attempt": attempt})


def end_job(token: Token[dict[str, Any] | None]) -> None:
    _job.reset(token)


class JobFields(logging.Filter):
    """Adds the running job's fields to each record (nothing outside a job)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _job.get()
        if fields:
            for key, value in fields.items():
                setattr(record, key, value)
        return True


def json_formatter() -> logging.Formatter:
    from pythonjsonlogger.core import RESERVED_ATTRS
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter("{asctime}{levelname}{name}{message}", style="{",
                         rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
                         # uvicorn's copy of the message with terminal colours: noise in JSON
                         reserved_attrs=[*RESERVED_ATTRS, "color_message"])


def use_json(loggers: Iterable[logging.Logger]) -> None:
    """Make every handler of ``loggers`` write JSON lines with the job's fields."""
    for logger in loggers:
        for handler in logger.handlers:
            handler.setFormatter(json_formatter())
            if not any(isinstance(f, JobFields) for f in handler.filters):
                handler.addFilter(JobFields())


def connect_celery(app: Any) -> None:
    """With ``logging.format = "json"``, make the worker's or beat's log JSON from its first line.

    The root logger gets its JSON handler now, so what comes before Celery sets logging up (a
    warning at start) is JSON too, and Celery, finding the root configured, keeps it. The
    handlers Celery adds itself (the task logger's) are switched when it has made them. Celery's
    banner is not a log record: the commands drop it (--quiet).
    """
    if app.settings.logging.format != "json":
        return
    from celery.signals import after_setup_logger, after_setup_task_logger

    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    use_json([root])
    logging.captureWarnings(True)  # warnings.warn goes through the JSON handler, not raw stderr

    def _json(logger: logging.Logger | None = None, **_: Any) -> None:
        use_json([logger] if logger is not None else [logging.getLogger()])

    after_setup_logger.connect(_json, weak=False)
    after_setup_task_logger.connect(_json, weak=False)
