"""One worker process's job runner: cached models, generate, post-process, write the file.

decode (JobSpec) -> predict (MusicGen on the device, batched with other jobs by
``workers.generation.HfLoop``, or by ``workers.generation.EngineLoop`` over the static engine
when ``model.engine = "static"``) -> encode (in the calling task thread, while the engine generates
the next batch). Celery stays out of this module: the task passes in callbacks for progress and
cancellation.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from pipeline.config.presets import model_settings_for
from pipeline.config.schema import ModelSettings, Settings
from pipeline.contract.continuation import continuation_span, generated_s
from pipeline.contract.jobs import JobResult, JobSpec, Timings
from pipeline.contract.time_limits import job_time_limits
from pipeline.errors import JobCancelled, JobTimeout
from pipeline.infra.storage_backends import backend_for, local_root
from workers.audio.decode import decode_audio, decode_mono
from workers.audio.formats import FORMATS
from workers.audio.postprocess import render
from workers.generation import BatchStats, Engine, EngineLoop, GenerationLoop, HfLoop, Ticket
from workers.generation.streaming import JobStream, StreamPublisher
from workers.inputs import fetch_input, fetch_melody
from workers.partials import PartialPublisher, PartialSink, partial_name
from workers.runtime.batch import GeneratedAudio, GenerationItem, validate_items
from workers.runtime.frames import batch_key_for, check_continuation, prompt_frames
from workers.runtime.loaded import LoadedModel
from workers.runtime.loading import load_model
from workers.runtime.longform import WindowHook
from workers.runtime.model_cache import ModelCache
from workers.runtime.musicgen import generate
from workers.storage import remove_partial, upload_pair, write_sidecar

if TYPE_CHECKING:  # the engine's modules import it lazily: an hf worker never loads them
    from workers.runtime.engine.serving import EngineBuilder

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
# How often a task thread waiting for its batch wakes to report progress and look at its cancel
# flag and time limit: the engine's loop itself never touches Redis.
WAIT_POLL_S = 0.25
# A job's output is <job_id><extension> for the one format it asked for; cleanup does not know
# which, so it tries each name exactly (never a glob on the id: "abc.*" is also job "abc.def").
OUTPUT_EXTENSIONS: tuple[str, ...] = tuple(sorted({f.extension for f in FORMATS.values()}))


def job_temp_dir(settings: Settings, job_id: str) -> Path:
    """The job's private scratch folder (melody upload, render stages)."""
    return Path(settings.storage.temp_dir).expanduser().resolve() / job_id


def output_folder(settings: Settings, job_id: str) -> Path:
    """Where a job's file is rendered: the storage folder itself (``file://`` or
    ``output_dir``), or for object storage the job's temp folder it is uploaded from."""
    root = local_root(settings.storage)
    return root if root is not None else job_temp_dir(settings, job_id)


def job_outputs(settings: Settings, job_id: str) -> list[Path]:
    """Every path the job's finished file may have, one per output format."""
    out_dir = output_folder(settings, job_id)
    return [out_dir / f"{job_id}{ext}" for ext in OUTPUT_EXTENSIONS]


def partial_outputs(settings: Settings, job_id: str) -> list[Path]:
    """Every path a long job's partial file (``workers.partials``) may have in its folder."""
    out_dir = output_folder(settings, job_id)
    return [out_dir / partial_name(job_id, ext) for ext in OUTPUT_EXTENSIONS]


def clear_leftovers(settings: Settings, job_id: str) -> None:
    """Remove what earlier attempts of a job left (a worker killed mid-job runs no cleanup):
    its temp folder and the ``.part`` files of its outputs. A finished file stays: the attempt
    starting now replaces it atomically, or removes it if it fails."""
    shutil.rmtree(job_temp_dir(settings, job_id), ignore_errors=True)
    remove_partial(job_outputs(settings, job_id), keep_finished=True)
    remove_partial(partial_outputs(settings, job_id))


def discard_job_files(settings: Settings, job_id: str) -> None:
    """Remove every file of a job that ends without a result (failed, cancelled, timed out,
    poison): its temp folder, its output and sidecar, and their ``.part`` files; exactly the
    job's own, nothing of a job whose id merely starts with this one."""
    shutil.rmtree(job_temp_dir(settings, job_id), ignore_errors=True)
    remove_partial([*job_outputs(settings, job_id), *partial_outputs(settings, job_id)])
    if local_root(settings.storage) is None:
        # A hard kill between the file's upload and its sidecar's leaves an object behind.
        names = [f"{job_id}{ext}{tail}" for ext in OUTPUT_EXTENSIONS for tail in ("", ".json")]
        names += [partial_name(job_id, ext) for ext in OUTPUT_EXTENSIONS]
        try:
            backend_for(settings.storage).delete(names)
        except Exception:  # the retention sweep is the backstop
            log.warning("could not remove the stored files of job %s", job_id, exc_info=True)


# The fade across a stream's chunk seams: 10 ms, far below a note, far above a sample step.
STREAM_CROSSFADE_S = 0.01


class JobCancelledByUser(Exception):
    """Raised inside a running job when its cancel flag is seen; the task turns it into REVOKED."""


@dataclass(frozen=True)
class RunOutcome:
    result: JobResult
    produced_seconds: float
    gpu_seconds: float


def _batcher_limits(settings: Settings, row_cap: int | None = None) -> dict[str, Any]:
    gen = settings.generation
    # Only the threads pool has more than one job in a process at a time: in prefork and solo
    # a batch is one job, and waiting for company that cannot come would only add latency.
    batch = gen.max_batch_size if settings.worker.pool == "threads" else 1
    if row_cap is not None:  # the rows the device's memory holds (EngineBuilder's sizing)
        batch = min(batch, row_cap)
    return {"max_batch_size": batch, "batch_wait_s": gen.batch_wait_ms / 1000,
            "hard_limit_s": float(settings.worker.hard_time_limit)}


class JobRunner:
    """Everything a worker process keeps between jobs: its settings and its model cache."""

    def __init__(self, settings: Settings,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 on_engine: Callable[[str, str], None] | None = None) -> None:
        self.settings = settings
        if settings.model.num_threads:
            # Process-wide; on a shared CPU host one thread per worker process beats oversubscription.
            import torch

            torch.set_num_threads(settings.model.num_threads)
        self.cache: ModelCache[LoadedModel] = ModelCache(settings.model.cache_size, self._load)
        self._model_settings: dict[str, ModelSettings] = {}
        self._presets: dict[int, str] = {}  # id(LoadedModel) -> its preset, for logs and metrics
        self._row_cap: int | None = None  # fewer rows than max_batch_size fit the device
        self.engines: EngineBuilder | None = None
        self._streams: StreamPublisher | None = None  # built for the first stream=True job
        # The HF path; with the static engine it still runs what that engine cannot (melody,
        # past the window), so ``batcher`` always exists and ``loop`` is what jobs go to.
        self.batcher = HfLoop(_generate, on_batch=on_batch, **_batcher_limits(settings))
        self.loop: GenerationLoop = self.batcher
        if settings.model.engine == "static":
            from workers.runtime.engine import EngineUnsupported
            from workers.runtime.engine.selfcheck import self_check
            from workers.runtime.engine.serving import EngineBuilder

            self.engines = EngineBuilder(
                compile=settings.model.compile,
                memory_fraction=settings.model.engine_memory_fraction, on_verdict=on_engine,
                check=self_check if settings.model.engine_self_check else None)
            limits = _batcher_limits(settings)
            self.loop = EngineLoop(
                self._engine, self.batcher, max_batch_size=limits["max_batch_size"],
                hard_limit_s=limits["hard_limit_s"], unsupported=(EngineUnsupported,),
                on_batch=on_batch)

    def apply_settings(self, settings: Settings) -> None:
        """A live settings change: jobs that start from now on use ``settings`` (time limits,
        batch size and wait); a running job keeps the limits it started with. What this object
        built from the model settings (the model cache, the engine) is not live: those keys need
        a restart."""
        self.loop.configure(**_batcher_limits(settings, self._row_cap))
        self.settings = settings

    def serving_engines(self) -> dict[str, str]:
        """Model preset -> the engine serving it (``static`` or ``hf``), for the heartbeat."""
        if self.engines is None:
            return dict.fromkeys(self.cache.sources(), "hf")
        return self.engines.serving()

    def _engine(self, loaded: LoadedModel, rows: int) -> Engine:
        """The continuous loop's engine factory: sized, built and checked by ``engines``."""
        assert self.engines is not None
        engine = self.engines.build(loaded, rows,
                                    model=self._presets.get(id(loaded), loaded.source))
        if engine.max_rows < rows:
            # Fewer rows fit than the loop asked for: it must not ask again for more (it would
            # rebuild the engine for every job), nor admit more jobs than rows.
            self._row_cap = min(engine.max_rows, self._row_cap or engine.max_rows)
            self.loop.configure(**_batcher_limits(self.settings, self._row_cap))
        return engine

    def _load(self, preset: str) -> LoadedModel:
        m = self._model_settings[preset]
        log.info("loading model %s from %s on %s", preset, m.source, m.device)
        loaded = load_model(m.source, device=m.device, dtype=m.dtype, compile=m.compile,
                            offline=m.offline, cache_dir=m.cache_dir,
                            download_timeout=m.download_timeout)
        self._presets[id(loaded)] = preset
        return loaded

    def model(self, preset: str) -> tuple[LoadedModel, float]:
        """The loaded model for a preset and the seconds spent loading it (0 when cached)."""
        self._model_settings.setdefault(preset, model_settings_for(self.settings, preset))
        if preset not in self.cache:
            # A load evicts a model from the cache; an idle engine would keep it in memory.
            self.loop.release_idle_engines()
        started = time.perf_counter()
        loaded = self.cache.get(preset)
        return loaded, time.perf_counter() - started

    def preload(self) -> float | None:
        """Load the preset's model now if settings ask for it, and build and self-check its
        static engine (with ``model.engine = static``; see ``workers.runtime.engine.serving``);
        the seconds the load took, or None."""
        if not self.settings.model.preload:
            return None
        loaded, seconds = self.model(self.settings.model.preset)
        self.loop.prepare(loaded)  # an engine's refusal is logged once: HF serves the model
        return seconds

    def stream_publisher(self) -> StreamPublisher:
        """The process's chunk publisher (``workers.generation.streaming``), built on first use."""
        if self._streams is None:
            from workers.runtime.engine.stream import (
                LEFT_CONTEXT_FRAMES,
                LOOKAHEAD_FRAMES,
                decode_chunks,
            )

            self._streams = StreamPublisher(decode_chunks, left_context=LEFT_CONTEXT_FRAMES,
                                            lookahead=LOOKAHEAD_FRAMES,
                                            crossfade_s=STREAM_CROSSFADE_S)
        return self._streams

    def run(self, spec: JobSpec, *, worker: str, progress: Progress, started_at: float,
            on_partial: PartialSink | None = None, stream_client: Any = None,
            attempt: int = 1) -> RunOutcome:
        """Generate one job's file; partial files are removed whatever happens, and so are the
        leftovers of earlier attempts of the same job when this one starts.

        A long job publishes its audio so far after each window (``workers.partials``) and
        hands ``on_partial`` where it is; that file is gone when the job ends. A ``stream=True``
        job publishes its audio in chunks to its Redis Stream on ``stream_client`` as attempt
        ``attempt`` (on the HF path, which has no steps to follow, as one chunk at the end).
        """
        storage = self.settings.storage
        backend = backend_for(storage)
        temp_dir = job_temp_dir(self.settings, spec.job_id)
        # Object storage: rendered in the job's temp folder, then uploaded.
        out_dir = output_folder(self.settings, spec.job_id)
        clear_leftovers(self.settings, spec.job_id)
        temp_dir.mkdir(parents=True, exist_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        partials: PartialPublisher | None = None
        job_stream: JobStream | None = None
        try:
            progress(0.0, "loading model")
            loaded, load_s = self.model(spec.model)
            if spec.stream and stream_client is not None:
                job_stream = JobStream(stream_client, spec.job_id, attempt,
                                       sample_rate=loaded.sampling_rate,
                                       channels=loaded.audio_channels,
                                       ttl_s=self.settings.broker.result_expires)
            item = GenerationItem(
                prompt=spec.prompt, duration_s=spec.duration, temperature=spec.temperature,
                top_k=spec.top_k, top_p=spec.top_p, guidance_scale=spec.guidance_scale, seed=spec.seed,
                melody=self._melody(spec, temp_dir, loaded.sampling_rate),
                continuation=self._continuation(spec, temp_dir, loaded),
                continuation_included=spec.continuation_included,
                window_stride_s=self.settings.generation.window_stride)
            # Checked here, alone, so a job the model cannot do fails by itself and never takes
            # its batch down with it.
            validate_items([item], max_duration_s=loaded.max_duration_s,
                           sampling_rate=loaded.sampling_rate, melody_supported=loaded.is_melody)
            check_continuation(item, loaded)
            progress(0.0, "waiting for a batch")
            limits = job_time_limits(self.settings.worker, generated_s(
                spec, model_settings_for(self.settings, spec.model).max_duration))
            ticket = self.loop.submit(loaded, item, batch_key_for(loaded, item), model=spec.model,
                                      hard_limit_s=limits.hard)
            # A continuation whose output leaves its clip out starts after the clip's frames.
            skipped = 0 if item.continuation_included else prompt_frames(item, loaded)
            if job_stream is not None:
                ticket.stream = self.stream_publisher().row(
                    job_stream, chunk_s=self.settings.generation.stream_chunk_s,
                    frame_rate=loaded.frame_rate,
                    target_samples=round(spec.duration * loaded.sampling_rate),
                    first_frame=skipped)
            skip = skipped * loaded.samples_per_frame
            partials = PartialPublisher(spec, loaded, out_dir, temp_dir, backend, on_partial,
                                        skip=skip)
            audio = self._wait(ticket, progress, deadline=started_at + limits.soft,
                               limit=limits.soft, partials=partials)
            if job_stream is not None:  # the stream ends before the file is rendered
                self.stream_publisher().finish(job_stream, audio.samples)
            progress(0.9, "post-processing")
            # spec.output is the shared OutputSpec, checked when the spec was decoded; the
            # table's suffix is also what maintenance sweeps.
            dest = out_dir / f"{spec.job_id}{spec.output.info.extension}"
            rendered = render(audio.samples, audio.sample_rate, spec.output, dest,
                              temp_dir=temp_dir)
            timings = Timings(queue_wait=max(0.0, started_at - spec.enqueued_at), model_load=load_s,
                              generate=audio.generate_seconds, postprocess=rendered.postprocess_seconds,
                              total=time.time() - started_at)
            key = dest.name
            local = backend.local_root is not None
            expires = storage.presign_expiry_s
            result = JobResult(
                job_id=spec.job_id, output_path=str(rendered.path) if local else None,
                sidecar_path=str(dest) + ".json" if local else None,
                uri=rendered.path.as_uri() if local else backend.uri(key),
                download_url=None if local else backend.presign(key, expires),
                download_expires_at=None if local else time.time() + expires,
                format=rendered.format, duration=rendered.duration_s, sample_rate=rendered.sample_rate,
                channels=rendered.channels, bit_depth=rendered.bit_depth,
                loudness_lufs=rendered.loudness_lufs, peak_dbfs=rendered.peak_dbfs, model=spec.model,
                seed=audio.seed, worker=worker, timings=timings, batch_size=audio.batch_size)
            # The sidecar is metadata: a pre-signed URL in it would expire with nothing to renew it.
            write_sidecar(dest, {"request": spec.model_dump(mode="json"), "result": result.model_dump(
                mode="json", exclude={"download_url", "download_expires_at"})})
            if not local:
                upload_pair(backend, dest, key)  # the temp folder goes in the finally below
            return RunOutcome(result, rendered.duration_s, audio.generate_seconds / audio.batch_size)
        except BaseException as exc:
            if job_stream is not None:
                self.stream_publisher().fail(job_stream, _stream_error(exc))
            # A file without its sidecar (or a sidecar's .part) is no result: a failed attempt
            # leaves nothing; a retry writes the whole pair again.
            remove_partial(job_outputs(self.settings, spec.job_id))
            raise
        finally:
            if partials is not None:
                partials.remove()
            shutil.rmtree(temp_dir, ignore_errors=True)

    def _wait(self, ticket: Ticket, progress: Progress, *, deadline: float, limit: float,
              partials: PartialPublisher | None = None) -> GeneratedAudio:
        """Wait for the engine to generate this job, reporting its progress meanwhile.

        Whatever ends the wait early (the cancel flag seen by ``progress``, the soft time limit,
        Celery's own soft limit in a prefork child) drops the ticket, so the job leaves its batch
        at the next step while its neighbours go on.
        """
        streamed: Any = None  # the last window whose codes went to the stream
        try:
            while True:
                try:
                    return ticket.future.result(timeout=WAIT_POLL_S)
                except TimeoutError:
                    pass
                if ticket.stream is not None and ticket.partial is not None \
                        and ticket.partial is not streamed:
                    streamed = ticket.partial
                    self._stream_window(ticket, streamed)
                if partials is not None and ticket.partial is not None \
                        and ticket.partial is not partials.last:
                    partials.publish(ticket.partial)
                progress(0.9 * ticket.fraction, ticket.message or (
                    "generating" if ticket.fraction else "waiting for a batch"))
                if time.time() > deadline:
                    raise JobTimeout(f"job passed its soft time limit of {limit:g} s", "duration")
        except BaseException as exc:
            ticket.drop(exc)
            raise

    def _stream_window(self, ticket: Ticket, partial: Any) -> None:
        """A long-form job's codes after a window (the prefix of its final codes): the chunks
        they complete go to the stream, decoded together off this thread. Long-form windows run
        on the HF path, which has no steps to follow: its chunks come a window at a time."""
        row = ticket.stream
        codes = partial.codes
        due = [(row, lo, start, end, codes[:, lo:hi])
                for lo, start, end, hi in row.due(int(codes.shape[-1]))]
        if due:
            row.publisher.chunks(ticket.loaded, due)

    def _melody(self, spec: JobSpec, temp_dir: Path,
                sampling_rate: int) -> tuple[npt.NDArray[np.float32], int] | None:
        if spec.melody is None:
            return None
        # Fetched and checked (size, duration, format) before any GPU time is spent.
        return decode_mono(fetch_melody(spec.melody, self.settings, temp_dir),
                           sampling_rate), sampling_rate

    def _continuation(self, spec: JobSpec, temp_dir: Path,
                      loaded: LoadedModel) -> tuple[npt.NDArray[np.float32], int] | None:
        """The span of the clip to continue, at the model's rate and channel count; its span
        checked as the producer checks it (a clip by URI is first seen here)."""
        if spec.continuation is None:
            return None
        path, _ = fetch_input(spec.continuation, self.settings, temp_dir, "continuation")
        rate = loaded.sampling_rate
        samples = decode_audio(path, rate, loaded.audio_channels, field="continuation")
        span = continuation_span(start_s=spec.continuation_start, end_s=spec.continuation_end,
                                 clip_s=samples.shape[-1] / rate, window_s=loaded.max_duration_s,
                                 duration_s=spec.duration, included=spec.continuation_included)
        return samples[:, round(span.start_s * rate):round(span.end_s * rate)], rate

    def remove_outputs(self, job_id: str) -> None:
        """Delete every file a cancelled or timed-out job left (see :func:`discard_job_files`)."""
        discard_job_files(self.settings, job_id)


def _stream_error(exc: BaseException) -> BaseException:
    """What a stream's end entry says of ``exc``: a cancel as ``job_cancelled``."""
    if isinstance(exc, JobCancelledByUser):
        return JobCancelled("the job was cancelled")
    return exc


def _generate(loaded: LoadedModel, items: list[GenerationItem],
              progress: Callable[[float, str], None],
              on_window: WindowHook | None) -> list[GeneratedAudio]:
    # Looked up at call time, so a wrapper installed on this module (tests/integration/faults.py)
    # sees every batch the engine runs.
    return generate(loaded, items, progress, on_window)
