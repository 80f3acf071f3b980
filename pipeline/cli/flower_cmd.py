"""`musicgen-pipeline flower`: Flower on the pipeline's broker, with basic auth from settings.

The command execs ``celery -A pipeline.ops.monitor_app flower`` (the light app: Flower needs no
task code and so never imports torch). The credentials go to Flower in the environment
variable it reads, ``FLOWER_BASIC_AUTH``, never on the command line, where ``ps`` shows them.
"""

from __future__ import annotations

import inspect
import ipaddress
import os
import sys

import typer

from pipeline.cli.common import EnvOption, SetsOption
from pipeline.config import Settings

AUTH_ENVVAR = "FLOWER_BASIC_AUTH"


class FlowerConfigError(ValueError):
    """Raised when the settings do not allow Flower to start safely."""


def _loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name: assume it is reachable from elsewhere
        return False


def flower_auth(settings: Settings) -> str | None:
    """``user:password`` for ``FLOWER_BASIC_AUTH``, or None where development runs without it.

    Raises ``FlowerConfigError`` for half-set credentials, for running without them outside
    development or on a non-loopback address, and for values Flower would misread.
    """
    m = settings.monitoring
    password = m.flower_password.get_secret_value() if m.flower_password is not None else ""
    if not m.flower_user and not password:
        env = settings.app.environment.value
        if env != "development":
            raise FlowerConfigError(
                f"Flower needs basic auth in {env}: set monitoring.flower_user and "
                "monitoring.flower_password (MUSICGEN_MONITORING__FLOWER_USER / __FLOWER_PASSWORD)")
        if not _loopback(m.flower_address):
            raise FlowerConfigError(
                f"Flower without auth binds loopback only, not {m.flower_address}: set "
                "monitoring.flower_user and monitoring.flower_password, or flower_address = 127.0.0.1")
        return None
    if not m.flower_user or not password:
        raise FlowerConfigError("set both monitoring.flower_user and monitoring.flower_password, "
                                "or neither")
    if ":" in m.flower_user:
        raise FlowerConfigError("monitoring.flower_user must not contain ':' "
                                "(HTTP basic auth splits on it)")
    if "," in m.flower_user or "," in password:
        # Flower splits FLOWER_BASIC_AUTH on commas into several user:password pairs.
        raise FlowerConfigError("monitoring.flower_user and monitoring.flower_password "
                                "must not contain ','")
    return f"{m.flower_user}:{password}"


def flower_argv(settings: Settings) -> list[str]:
    """The ``celery flower`` command line (no secret in it)."""
    m = settings.monitoring
    return [sys.executable, "-m", "celery", "-A", "pipeline.ops.monitor_app", "flower",
            f"--address={m.flower_address}", f"--port={m.flower_port}"]


def flower(
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """Start Flower, the Celery dashboard, on monitoring.flower_address:flower_port.

Basic auth comes from monitoring.flower_user and monitoring.flower_password (passed to Flower
in its environment, never on its command line). Outside development Flower does not start
without them, and without them it only ever binds a loopback address.

Not behind the password in Flower 2: /healthcheck and /metrics. /metrics is Prometheus text:
worker names, online status, task names, event counts and runtimes, and the Flower process's
own memory and CPU; no task arguments, results or settings. Keep the port off public networks
(the default address is 127.0.0.1) or filter /metrics at the proxy.
"""
    from pipeline.cli.common import EXIT_FAILED, load_or_exit, parse_sets
    from pipeline.cli.worker_cmd import override_env

    overrides = parse_sets(sets)
    settings = load_or_exit(env, overrides)
    if settings.broker.url is None:
        typer.echo("error: Flower needs a Redis broker (broker.url): workers on the embedded "
                   "file-system broker send no heartbeats, so Flower cannot follow them", err=True)
        raise typer.Exit(EXIT_FAILED)
    try:
        auth = flower_auth(settings)
    except FlowerConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    child_env = {**os.environ, **override_env(overrides)}
    if env:
        child_env["MUSICGEN_ENV"] = env
    # The settings are the one source of the credentials: an inherited value is dropped.
    child_env.pop(AUTH_ENVVAR, None)
    if auth is None:
        typer.echo("warning: Flower runs without authentication (development, loopback only)", err=True)
    else:
        child_env[AUTH_ENVVAR] = auth
    argv = flower_argv(settings)
    os.execve(argv[0], argv, child_env)



# Typer's rich help keeps a docstring's line breaks after the first paragraph: unwrap each one.
flower.__doc__ = "\n\n".join(" ".join(p.split())
                           for p in inspect.cleandoc(flower.__doc__ or "").split("\n\n"))
