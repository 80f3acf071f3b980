"""`musicgen-pipeline queue-exporter`: serve the queues' depth and in-flight jobs to Prometheus.

Run exactly one per broker (deploy/kubernetes runs it beside beat): KEDA scales each worker
Deployment on these series, from zero, through its Prometheus trigger (pipeline/ops/queue_metrics.py
says why a list length alone would undercount).
"""

from __future__ import annotations

import threading

import typer

from pipeline.cli.common import EnvOption, SetsOption, load_or_exit, parse_sets
from pipeline.cli.stats_cmd import queue_names


def queue_exporter(
    port: int = typer.Option(9810, "--port", min=1, max=65535, help="port of /metrics"),
    address: str = typer.Option("0.0.0.0", "--address", help="address to listen on"),
    queues: list[str] = typer.Option([], "--queue", "-Q",
                                     help="queue to export (repeatable); default: every preset's"),
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """Serve musicgen_queue_depth{queue}, musicgen_jobs_in_flight{queue} and
    musicgen_breaker_state{model,state} on /metrics."""
    from prometheus_client import CollectorRegistry, start_http_server

    from pipeline.contract.jobs import QUEUE_PREFIX
    from pipeline.ops.queue_metrics import QueueCollector, breaker_reader

    settings = load_or_exit(env, parse_sets(sets))
    names = queues or queue_names(settings)
    registry = CollectorRegistry()
    presets = [q.removeprefix(QUEUE_PREFIX) for q in names if q.startswith(QUEUE_PREFIX)]
    registry.register(QueueCollector(settings, names, breaker_reader(settings, presets)))
    start_http_server(port, addr=address, registry=registry)
    typer.echo(f"exporting the depth of {', '.join(names)} on {address}:{port}/metrics")
    threading.Event().wait()  # the server thread is a daemon: serve until a signal ends us
