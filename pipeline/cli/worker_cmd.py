"""`musicgen-pipeline worker`: a thin wrapper over `celery worker` with the policies from settings.

The command execs Celery itself (so a Procfile or systemd signal reaches the worker directly);
settings given on the command line travel to it as MUSICGEN_* environment variables.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import typer

from pipeline.cli.common import EnvOption, SetsOption
from pipeline.config import Settings
from pipeline.contract.jobs import queue_for


def override_env(overrides: Mapping[str, str]) -> dict[str, str]:
    """``{"model.preset": "tiny"}`` -> ``{"MUSICGEN_MODEL__PRESET": "tiny"}``."""
    return {"MUSICGEN_" + k.upper().replace(".", "__"): v for k, v in overrides.items()}


def default_concurrency(pool: str, max_batch_size: int) -> int:
    """Task slots when none are set: one batch generating plus one batch waiting or rendering.

    With the threads pool each slot is a thread holding one job (and, with late acks, its
    unacked message): ``max_batch_size`` of them feed the generation loop while as many more
    render the previous batch or queue for the next, and the prefetch multiplier of 1 keeps the
    node from holding more, so other nodes are not starved. Prefork and solo run one job per
    process: one slot.
    """
    return 2 * max_batch_size if pool == "threads" else 1


def worker_argv(settings: Settings, *, queues: Sequence[str] = (), pool: str | None = None,
                concurrency: int | None = None, name: str | None = None,
                loglevel: str | None = None, include: Sequence[str] = ()) -> list[str]:
    """The `celery worker` command line these settings call for."""
    w = settings.worker
    chosen_pool = pool or w.pool
    # --quiet: no banner on stdout, so a JSON log is JSON on every line.
    quiet = ["--quiet"] if settings.logging.format == "json" else []
    argv = [sys.executable, "-m", "celery", *quiet, "-A", "workers", "worker",
            "-Q", ",".join(queues or [queue_for(settings.model.preset)]),
            "--pool", chosen_pool,
            "--concurrency", str(concurrency or w.concurrency or default_concurrency(chosen_pool, settings.generation.max_batch_size)),
            "--prefetch-multiplier", str(w.prefetch_multiplier),
            "--loglevel", (loglevel or settings.app.log_level).upper(), "-E"]
    if name:
        argv += ["-n", name]
    if include:
        argv += ["--include", ",".join(include)]
    if settings.broker.url is None:
        # The file-system transport has no fanout: no gossip, mingle or heartbeats to exchange.
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    return argv


def spawn_worker(settings: Settings, env: Mapping[str, str], *, queues: Sequence[str] = (),
                 pool: str | None = None, concurrency: int | None = None,
                 log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a worker subprocess (the embedded default and the tests use this)."""
    argv = worker_argv(settings, queues=queues, pool=pool, concurrency=concurrency)
    child_env = {**os.environ, **env, **({"MUSICGEN_WORKER__POOL": pool} if pool else {})}
    if log_path is None:
        return subprocess.Popen(argv, env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    with open(log_path, "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, env=child_env, stdout=out, stderr=subprocess.STDOUT)


def worker(
    queues: list[str] = typer.Option([], "--queue", "-Q", help="queues to serve (default: the preset's)"),
    pool: str = typer.Option(None, help="threads (default: the batching engine) | prefork | solo"),
    concurrency: int = typer.Option(None, "--concurrency", "-c"),
    name: str = typer.Option(None, "--name", "-n", help="worker node name, e.g. gpu0@%h"),
    env: EnvOption = None,
    sets: SetsOption = None,
    loglevel: str = typer.Option(None, "--loglevel", "-l"),
    include: list[str] = typer.Option([], "--include", "-I",
                                      help="extra modules the worker imports (signal handlers, plugins)"),
) -> None:
    """Start a Celery worker for this node's GPU with the settings' pool, limits and queues."""
    from pipeline.cli.common import load_or_exit, parse_sets

    overrides = parse_sets(sets)
    settings = load_or_exit(env, overrides)
    child_env = {**os.environ, **override_env(overrides)}
    # SIGTERM becomes Celery's cold shutdown, which with worker_soft_shutdown_timeout set first
    # lets the running job finish for worker.shutdown_grace seconds, then requeues it.
    child_env.setdefault("REMAP_SIGTERM", "SIGQUIT")
    if env:
        child_env["MUSICGEN_ENV"] = env
    if pool:  # the worker's own settings say which pool runs it (the engine batches only in threads)
        child_env["MUSICGEN_WORKER__POOL"] = pool
    argv = worker_argv(settings, queues=queues, pool=pool, concurrency=concurrency, name=name,
                       loglevel=loglevel, include=include)
    os.execve(argv[0], argv, child_env)
