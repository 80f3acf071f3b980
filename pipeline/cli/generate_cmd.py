"""`musicgen-pipeline generate "PROMPT"`: enqueue, follow the progress bar, print the file.

In development with no broker configured it runs on the embedded default: the file-system
broker under ``app.data_dir`` and a worker started for this command and stopped after it.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.cli.common import fail, load_or_exit, parse_sets
from pipeline.cli.worker_cmd import override_env, spawn_worker
from pipeline.errors import PipelineError, ServiceUnavailable
from pipeline.handle import Progress as JobProgress
from pipeline.jobs import GenerationRequest, queue_for


def _stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def generate(
    prompt: str = typer.Argument(..., help="what to generate"),
    duration: float = typer.Option(None, "--duration", "-d", help="seconds of audio"),
    fmt: str = typer.Option(None, "--format", "-f", help="wav | mp3 | flac | ogg | opus"),
    model: str = typer.Option(None, "--model", "-m", help="model preset (see `settings list`)"),
    melody: Path = typer.Option(None, "--melody", help="audio file to condition on (melody presets)"),
    seed: int = typer.Option(None, "--seed", help="same seed + model + hardware = same audio"),
    output_dir: Path = typer.Option(None, "--output-dir", "-o", help="where the file goes"),
    timeout: float = typer.Option(600.0, help="seconds to wait for the job"),
    env: str = typer.Option(None, "--env", "-e"),
    sets: list[str] = typer.Option([], "--set", help="section.key=value (repeatable)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Enqueue a job, show its progress, and print where the finished file is."""
    from pipeline.producer import Producer

    overrides = parse_sets(sets)
    if output_dir:
        overrides["storage.output_dir"] = str(output_dir.resolve())
    settings = load_or_exit(env, overrides)
    console = Console(stderr=True)
    worker = None
    try:
        request = GenerationRequest(prompt=prompt, duration=duration, format=fmt, model=model,
                                    melody=melody, seed=seed)
        if settings.broker.url is None:
            # The embedded default has nothing to install: setting it up is this command's
            # explicit step, the ledger's schema included. With a real broker the database is
            # the operator's (`db upgrade`), and a missing one is reported, never created.
            from sqlalchemy.exc import SQLAlchemyError

            from pipeline.quota.configured import prepare_database
            try:
                prepare_database(settings)
            except (SQLAlchemyError, OSError) as exc:
                raise ServiceUnavailable(f"could not set up the embedded quota database: "
                                         f"{type(exc).__name__}: {exc}", "database.url") from exc
        handle = Producer(settings).enqueue(request)  # validated and queued (or refused) first
        if settings.broker.url is None:
            log_path = Path(settings.app.data_dir).expanduser().resolve() / "embedded-worker.log"
            console.print(f"[dim]embedded broker: starting a worker for this command (log: {log_path})[/]")
            # The worker's own preset is the job's, so it preloads the model this job needs.
            child_env = override_env({**overrides, **({"model.preset": model} if model else {})})
            if env:
                child_env["MUSICGEN_ENV"] = env
            worker = spawn_worker(settings, child_env, queues=[queue_for(model or settings.model.preset)],
                                  pool="solo", log_path=log_path)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task("queued", total=1.0)

            def show(p: JobProgress) -> None:
                bar.update(task, completed=p.fraction, description=p.message or "queued")
                if worker is not None and worker.poll() is not None:
                    raise PipelineError(f"the embedded worker exited with code {worker.returncode}; "
                                        f"see {settings.app.data_dir}/embedded-worker.log")

            result = handle.wait(timeout, on_progress=show)
    except PipelineError as exc:
        fail(exc)
    finally:
        if worker is not None:
            _stop(worker)
    if as_json:
        typer.echo(json.dumps(result.model_dump(mode="json"), indent=2))
    else:
        typer.echo(result.output_path)
        console.print(f"[green]{result.duration:.2f} s {result.format} {result.sample_rate} Hz "
                      f"{result.channels} ch, {result.loudness_lufs} LUFS, seed {result.seed}[/] "
                      f"(queue {result.timings.queue_wait:.2f} s, load {result.timings.model_load:.2f} s, "
                      f"generate {result.timings.generate:.2f} s, post {result.timings.postprocess:.2f} s)")
