"""`musicgen-pipeline generate "PROMPT"`: enqueue, follow the progress bar, print the file.

``--count N`` queues N variations of the prompt (seeds ``--seed``, ``--seed``+1, ... or drawn at
random); a batching worker generates them together. In development with no broker configured it
runs on the embedded default: the file-system broker under ``app.data_dir`` and a worker (the
same batching engine, threads pool) started for this command and stopped after it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from pipeline.cli.common import EnvOption, JsonOption, SetsOption, fail, load_or_exit, parse_sets
from pipeline.cli.worker_cmd import default_concurrency, override_env, spawn_worker
from pipeline.client.handle import Progress as JobProgress
from pipeline.contract.jobs import MAX_SEED, GenerationRequest, queue_for
from pipeline.errors import InvalidRequest, PipelineError, ServiceUnavailable

MAX_COUNT = 32  # the largest batch a worker takes (generation.max_batch_size's upper bound)


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _stop(worker: subprocess.Popen[bytes]) -> None:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def generate(
    prompt: str = typer.Argument(None, help="what to generate (optional with --continuation)"),
    duration: float = typer.Option(None, "--duration", "-d", help="seconds of audio"),
    fmt: str = typer.Option(None, "--format", "-f", help="wav | mp3 | flac | ogg | opus"),
    model: str = typer.Option(None, "--model", "-m", help="model preset (see `settings list`)"),
    melody: str = typer.Option(None, "--melody", help="audio file, or an s3:// or https:// URI, "
                                                     "to condition on (melody presets)"),
    continuation: str = typer.Option(None, "--continuation",
                                     help="audio file, or an s3:// or https:// URI, to continue"),
    continuation_start: float = typer.Option(None, "--continuation-start",
                                             help="seconds into the clip where the part used "
                                                  "starts"),
    continuation_end: float = typer.Option(None, "--continuation-end",
                                           help="seconds into the clip where the part used ends"),
    new_audio_only: bool = typer.Option(False, "--new-audio-only",
                                        help="the output leaves the clip out: --duration is the "
                                             "new audio's length, not the whole output's"),
    webhook_url: str = typer.Option(None, "--webhook-url",
                                    help="POST the job's end here (host in webhooks.allowed_hosts)"),
    seed: int = typer.Option(None, "--seed", help="same seed + model + hardware = same audio"),
    count: int = typer.Option(1, "--count", "-n", min=1, max=MAX_COUNT,
                              help="variations of the prompt to make, each with its own seed "
                                   "(--seed, --seed+1, ... or random)"),
    output_dir: Path = typer.Option(None, "--output-dir", "-o",
                                    help="download the finished file(s) into this folder on "
                                         "this machine, wherever the storage is"),
    timeout: float = typer.Option(600.0, help="seconds to wait for the job"),
    env: EnvOption = None,
    sets: SetsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Enqueue a job, show its progress, and print where the finished file is."""
    from pipeline.client.producer import Producer

    overrides = parse_sets(sets)
    settings = load_or_exit(env, overrides)
    console = Console(stderr=True)
    worker = None
    try:
        if seed is not None and seed + count - 1 > MAX_SEED:
            raise InvalidRequest(f"--seed {seed} with --count {count} runs past the largest seed "
                                 f"{MAX_SEED}", "seed")
        requests = [GenerationRequest(prompt=prompt, duration=duration, format=fmt, model=model,
                                      melody=melody, webhook_url=webhook_url,
                                      continuation=continuation,
                                      continuation_start=continuation_start,
                                      continuation_end=continuation_end,
                                      continuation_included=not new_audio_only,
                                      seed=None if seed is None else seed + i)
                    for i in range(count)]
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
        producer = Producer(settings)
        handles = [producer.enqueue(r) for r in requests]  # validated and queued (or refused) first
        if settings.broker.url is None:
            log_path = Path(settings.app.data_dir).expanduser().resolve() / "embedded-worker.log"
            console.print(f"[dim]embedded broker: starting a worker for this command (log: {log_path})[/]")
            # The worker's own preset is the job's, so it preloads the model this job needs.
            # A batch as large as the count (within the worker's bound), so N variations take one
            # generate call instead of N.
            batch = max(settings.generation.max_batch_size, count)
            child_env = override_env({**overrides, **({"model.preset": model} if model else {}),
                                      "generation.max_batch_size": str(batch)})
            if env:
                child_env["MUSICGEN_ENV"] = env
            worker = spawn_worker(settings, child_env, queues=[queue_for(model or settings.model.preset)],
                                  pool="threads", concurrency=default_concurrency("threads", batch), log_path=log_path)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            tasks = [bar.add_task("queued", total=1.0) for _ in handles]

            def follow(task: TaskID) -> Callable[[JobProgress], None]:
                def show(p: JobProgress) -> None:
                    bar.update(task, completed=p.fraction, description=p.message or "queued")
                    if worker is not None and worker.poll() is not None:
                        raise PipelineError(f"the embedded worker exited with code {worker.returncode}; "
                                            f"see {settings.app.data_dir}/embedded-worker.log")
                return show

            # One deadline for all: the jobs run together, so waiting for each in turn costs
            # no more than the slowest of them.
            deadline = time.monotonic() + timeout
            results = []
            for handle, task in zip(handles, tasks, strict=True):
                results.append(handle.wait(max(0.0, deadline - time.monotonic()), on_progress=follow(task)))
                bar.update(task, completed=1.0, description="done")
        # Fetched from wherever the worker stored it (a shared folder, object storage).
        places = [str(h.download(_folder(output_dir))) if output_dir else r.output_path or r.uri
                  for h, r in zip(handles, results, strict=True)]
    except PipelineError as exc:
        fail(exc)
    finally:
        if worker is not None:
            _stop(worker)
    if as_json:
        dumped = [r.model_dump(mode="json") for r in results]
        typer.echo(json.dumps(dumped[0] if count == 1 else dumped, indent=2))
        return
    for result, place in zip(results, places, strict=True):
        typer.echo(place)
        console.print(f"[green]{result.duration:.2f} s {result.format} {result.sample_rate} Hz "
                      f"{result.channels} ch, {result.loudness_lufs} LUFS, seed {result.seed}[/] "
                      f"(queue {result.timings.queue_wait:.2f} s, load {result.timings.model_load:.2f} s, "
                      f"generate {result.timings.generate:.2f} s in a batch of {result.batch_size}, "
                      f"post {result.timings.postprocess:.2f} s)")
