"""``musicgen-pipeline settings check``: is the environment the settings describe healthy?

Each check is a small function returning CheckResults (ok | warn | fail). They touch the real
things: the directories (created if missing: a check may, ``validate`` may not), Redis, the
database, ffmpeg, the model files, the device. torch and transformers are never imported in
this process: the model check looks at files, the device check asks a subprocess.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from pipeline.config.schema import Settings


class Status(str, Enum):
    ok = "ok"
    warn = "warn"
    fail = "fail"


@dataclass(frozen=True)
class CheckResult:
    """One line of the check: what was checked, how it went, and the detail an operator needs."""

    name: str
    status: Status
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status.value}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_dirs(settings: Settings) -> list[CheckResult]:
    """The local state, output and temp directories exist (created here if missing) and are writable."""
    wanted = {"app.data_dir": settings.app.data_dir, "storage.output_dir": settings.storage.output_dir,
              "storage.temp_dir": settings.storage.temp_dir}
    if settings.model.cache_dir:
        wanted["model.cache_dir"] = settings.model.cache_dir
    out = []
    for key, value in wanted.items():
        path = Path(value).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            out.append(CheckResult(key, Status.fail, f"{path} is not writable: {exc.strerror or exc}"))
        else:
            out.append(CheckResult(key, Status.ok, f"{path.resolve()} is writable"))
    return out


def _ping_redis(name: str, url: str, settings: Settings,
                password: SecretStr | None = None) -> CheckResult:
    import redis

    from pipeline.infra.brokers import redis_client, shown_url, url_with_password

    client = redis_client(url_with_password(url, password), settings)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:  # refused, timeout, auth: all say "unreachable"
        return CheckResult(name, Status.fail, f"{shown_url(url)} unreachable: {type(exc).__name__}: {exc}")
    finally:
        client.close()
    return CheckResult(name, Status.ok, f"{shown_url(url)} answers PING")


def check_broker(settings: Settings, queues: Sequence[str] | None = None) -> list[CheckResult]:
    """The broker answers (its kind, server version and queue depths); the result backend's
    Redis answers when it is another server; on RabbitMQ, whether its consumer timeout
    covers the longest job."""
    from pipeline.infra.brokers import (
        REDIS_SCHEMES,
        BrokerKind,
        broker_state,
        kind_of,
        results_password,
    )

    url = settings.broker.url
    if url is None:
        # The rules refuse a missing URL outside development; say which broker will be used.
        if settings.features.embedded_broker:
            return [CheckResult("broker", Status.ok, "embedded file-system broker (development)")]
        return [CheckResult("broker", Status.fail,
                            "broker.url is unset and features.embedded_broker is off")]
    if queues is None:
        from pipeline.cli.stats_cmd import queue_names

        queues = queue_names(settings)
    state = broker_state(settings, queues)
    if state.reachable:
        waiting = ", ".join(f"{q} {n}" for q, n in state.depths.items())
        out = [CheckResult("broker", Status.ok, f"{state.where} answers ({state.kind.value}: "
                                               f"{state.version}); waiting: {waiting or 'no queues'}")]
    else:
        out = [CheckResult("broker", Status.fail, f"{state.kind.value}: {state.where} unreachable: "
                                                 f"{state.error}")]
    backend = settings.broker.result_backend
    if backend and backend != url and backend.startswith(tuple(f"{s}://" for s in REDIS_SCHEMES)):
        out.append(_ping_redis("result backend", backend, settings, results_password(settings.broker)))
    if kind_of(url) is BrokerKind.amqp:
        out.append(_consumer_timeout(settings))
    return out


def _consumer_timeout(settings: Settings) -> CheckResult:
    # RabbitMQ closes the channel of a consumer that holds a delivery unacked for longer than
    # its consumer_timeout, and requeues what it held: a job running past it would start again
    # elsewhere. RabbitMQ 3.x does not tell a client its value, so broker.consumer_timeout says
    # what rabbitmq.conf was given and this compares it with the longest job's hard limit.
    from pipeline.contract.time_limits import job_time_limits

    declared = settings.broker.consumer_timeout
    longest = job_time_limits(settings.worker, settings.generation.max_duration).hard
    conf_line = f"consumer_timeout = {int(max(declared, longest + 300)) * 1000}"
    if longest >= declared:
        return CheckResult("broker.consumer_timeout", Status.warn,
                           f"the longest job's hard limit ({longest:g} s) is not below "
                           f"broker.consumer_timeout ({declared} s): RabbitMQ would requeue a job "
                           f"still running; put `{conf_line}` in rabbitmq.conf and set "
                           f"broker.consumer_timeout to match (in seconds)")
    return CheckResult("broker.consumer_timeout", Status.ok,
                       f"jobs end within {longest:g} s, under the {declared} s that "
                       f"broker.consumer_timeout says RabbitMQ allows (it cannot be read over "
                       f"AMQP: rabbitmq.conf must hold consumer_timeout = {declared * 1000} or more)")


def check_database(settings: Settings, *, timeout: float | None = None) -> list[CheckResult]:
    """``select 1`` answers on database.url (timeout: broker.connect_timeout unless given)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    timeout = settings.broker.connect_timeout if timeout is None else timeout
    try:
        url = make_url(settings.database.url)
    except ArgumentError as exc:
        return [CheckResult("database", Status.fail, f"not a database URL: {exc}")]
    if settings.database.password:
        url = url.set(password=settings.database.password.get_secret_value())
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite":
        connect_args: dict[str, Any] = {"timeout": timeout}
        if url.database and url.database != ":memory:" and not Path(url.database).parent.is_dir():
            return [CheckResult("database", Status.fail,
                                f"{shown}: directory {Path(url.database).parent} does not exist")]
    else:
        connect_args = {"connect_timeout": max(1, int(timeout))}
    try:
        engine = create_engine(url, connect_args=connect_args)
    except ImportError as exc:
        return [CheckResult("database", Status.fail,
                            f"{shown}: driver not installed ({exc.name}); for PostgreSQL install the "
                            "`postgres` extra and use postgresql+psycopg://")]
    except ArgumentError as exc:  # an unknown dialect or driver name
        return [CheckResult("database", Status.fail, f"{shown}: {exc}")]
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return [CheckResult("database", Status.fail, f"{shown} unreachable: {reason}")]
    finally:
        engine.dispose()
    return [CheckResult("database", Status.ok, f"{shown} answers select 1")]


def check_ffmpeg() -> list[CheckResult]:
    """ffmpeg and ffprobe are on PATH and run."""
    out = []
    for tool in ("ffmpeg", "ffprobe"):
        path = shutil.which(tool)
        if path is None:
            out.append(CheckResult(tool, Status.fail, f"{tool} not found on PATH; install ffmpeg"))
            continue
        try:
            done = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=20,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            out.append(CheckResult(tool, Status.fail, f"{path} -version failed: {exc}"))
            continue
        first = (done.stdout.splitlines() or [""])[0]
        status = Status.ok if done.returncode == 0 else Status.fail
        out.append(CheckResult(tool, status, f"{path}: {first}" if first else f"{path}: exit {done.returncode}"))
    return out


def hf_cache_dir(settings: Settings, environ: Mapping[str, str]) -> Path:
    """Where transformers will look: model.cache_dir, else HF_HUB_CACHE, HF_HOME/hub, ~/.cache."""
    if settings.model.cache_dir:
        return Path(settings.model.cache_dir).expanduser()
    if environ.get("HF_HUB_CACHE"):
        return Path(environ["HF_HUB_CACHE"]).expanduser()
    home = environ.get("HF_HOME") or str(Path(environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface")
    return Path(home).expanduser() / "hub"


def check_model(settings: Settings, environ: Mapping[str, str]) -> list[CheckResult]:
    """The checkpoint is on disk (a local path, or the HF cache) or may be downloaded."""
    source = settings.model.source
    local = Path(source).expanduser()
    if local.exists() or not _HUB_ID.match(source):
        if (local / "config.json").is_file():
            return [CheckResult("model", Status.ok, f"{source}: local checkpoint")]
        hint = " (build it: musicgen-pipeline models make-tiny)" if "tiny" in settings.model.preset else ""
        return [CheckResult("model", Status.fail, f"{local.resolve()}: no config.json there{hint}")]
    cache = hf_cache_dir(settings, environ)
    snapshots = cache / f"models--{source.replace('/', '--')}" / "snapshots"
    if any(snapshots.glob("*/config.json")):
        return [CheckResult("model", Status.ok, f"{source}: in the cache at {cache}")]
    if settings.model.offline:
        return [CheckResult("model", Status.fail,
                            f"{source}: not in the cache at {cache} and model.offline is true; "
                            f"run `musicgen-pipeline models download {settings.model.preset}` "
                            "(or `models import` a folder) with the same settings")]
    return [CheckResult("model", Status.warn, f"{source}: not cached at {cache}; will download on first use")]


_DEVICE_PROBE = {
    "cuda": "import torch; print(torch.cuda.is_available())",
    "mps": "import torch; print(torch.backends.mps.is_available())",
}


def check_device(settings: Settings, *,
                 find_spec: Callable[[str], object | None] = importlib.util.find_spec) -> list[CheckResult]:
    """The configured device exists; asked of a subprocess so torch stays out of this one."""
    device = settings.model.device
    if device in ("auto", "cpu"):
        return [CheckResult("device", Status.ok, f"{device}: always available"
                            + (" (cuda or mps when present, else cpu)" if device == "auto" else ""))]
    if find_spec("torch") is None:
        return [CheckResult("device", Status.warn, f"{device}: torch not importable here "
                            "(worker extra not installed); cannot check")]
    try:
        done = subprocess.run([sys.executable, "-c", _DEVICE_PROBE[device]], capture_output=True,
                              text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [CheckResult("device", Status.fail, f"{device}: probe failed: {exc}")]
    if done.returncode == 0 and done.stdout.strip() == "True":
        return [CheckResult("device", Status.ok, f"{device}: available")]
    reason = (done.stderr.strip().splitlines() or [done.stdout.strip()])[-1]
    return [CheckResult("device", Status.fail, f"{device}: not available ({reason})")]


def check_experiments(settings: Settings, *, timeout: float = 1.0) -> list[CheckResult]:
    """Each variant of a running or coming model experiment has a live worker on its queue.

    The workers are asked over the broker (Celery's ``inspect().active_queues()``, waiting
    ``timeout`` s for replies). A variant nobody serves is a warning naming the experiment, the
    variant and the queue: its jobs would wait for a worker that never comes. No experiments: no
    line, and no broadcast.
    """
    if not settings.experiments:
        return []
    from datetime import UTC, datetime

    from pipeline.ops.experiments import unserved_variants

    if settings.broker.url is None:
        return [CheckResult("experiments", Status.warn, "the embedded broker cannot ask workers "
                            "which queues they serve; variants not checked")]
    from kombu.exceptions import OperationalError
    from redis import RedisError

    from pipeline.infra.celery_app import make_celery

    app = make_celery(settings)
    try:
        replies = app.control.inspect(timeout=timeout).active_queues() or {}
    except (OperationalError, RedisError, OSError) as exc:  # the broker check names the cause
        return [CheckResult("experiments", Status.warn,
                            f"could not ask the workers for their queues: {type(exc).__name__}")]
    finally:
        app.close()
    served = {q.get("name") for queues in replies.values() for q in queues or []
              if isinstance(q, dict)}
    missing = unserved_variants(settings, {q for q in served if isinstance(q, str)},
                                datetime.now(UTC))
    if not missing:
        return [CheckResult("experiments", Status.ok, f"every variant has a live worker "
                            f"({len(replies)} worker(s) answered)")]
    return [CheckResult(f"experiments.{m.experiment}", Status.warn,
                        f"variant {m.variant}: no live worker consumes its queue {m.queue}")
            for m in missing]


def run_checks(settings: Settings, environ: Mapping[str, str] | None = None) -> list[CheckResult]:
    """Every check, in an order where each one's prerequisites come first (dirs before SQLite)."""
    environ = os.environ if environ is None else environ
    return [*check_dirs(settings), *check_broker(settings), *check_database(settings),
            *check_ffmpeg(), *check_model(settings, environ), *check_device(settings),
            *check_experiments(settings)]
