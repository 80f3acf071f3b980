"""One worker process's job runner: cached models, generate, post-process, write the file.

decode (JobSpec) -> predict (MusicGen on the device) -> encode (ffmpeg, atomic file). Celery
stays out of this module: the task passes in callbacks for progress and cancellation.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pipeline.config.presets import model_settings_for
from pipeline.config.schema import ModelSettings, Settings
from pipeline.jobs import JobResult, JobSpec, Timings
from workers.audio.decode import decode_mono
from workers.audio.formats import FORMATS
from workers.audio.postprocess import render
from workers.runtime.batch import GenerationItem
from workers.runtime.model_cache import ModelCache
from workers.runtime.musicgen import LoadedModel, generate, load_model
from workers.storage import remove_partial, write_sidecar

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
# A job's output is <job_id><extension> for the one format it asked for; cleanup does not know
# which, so it tries each name exactly (never a glob on the id: "abc.*" is also job "abc.def").
OUTPUT_EXTENSIONS: tuple[str, ...] = tuple(sorted({f.extension for f in FORMATS.values()}))


def job_temp_dir(settings: Settings, job_id: str) -> Path:
    """The job's private scratch folder (melody upload, render stages)."""
    return Path(settings.storage.temp_dir).expanduser().resolve() / job_id


def job_outputs(settings: Settings, job_id: str) -> list[Path]:
    """Every path the job's finished file may have, one per output format."""
    out_dir = Path(settings.storage.output_dir).expanduser().resolve()
    return [out_dir / f"{job_id}{ext}" for ext in OUTPUT_EXTENSIONS]


def clear_leftovers(settings: Settings, job_id: str) -> None:
    """Remove what earlier attempts of a job left (a worker killed mid-job runs no cleanup):
    its temp folder and the ``.part`` files of its outputs. A finished file stays: the attempt
    starting now replaces it atomically, or removes it if it fails."""
    shutil.rmtree(job_temp_dir(settings, job_id), ignore_errors=True)
    remove_partial(job_outputs(settings, job_id), keep_finished=True)


def discard_job_files(settings: Settings, job_id: str) -> None:
    """Remove every file of a job that ends without a result (failed, cancelled, timed out,
    poison): its temp folder, its output and sidecar, and their ``.part`` files; exactly the
    job's own, nothing of a job whose id merely starts with this one."""
    shutil.rmtree(job_temp_dir(settings, job_id), ignore_errors=True)
    remove_partial(job_outputs(settings, job_id))


class JobCancelledByUser(Exception):
    """Raised inside a running job when its cancel flag is seen; the task turns it into REVOKED."""


@dataclass(frozen=True)
class RunOutcome:
    result: JobResult
    produced_seconds: float
    gpu_seconds: float


class JobRunner:
    """Everything a worker process keeps between jobs: its settings and its model cache."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        if settings.model.num_threads:
            # Process-wide; on a shared CPU host one thread per worker process beats oversubscription.
            import torch

            torch.set_num_threads(settings.model.num_threads)
        self.cache: ModelCache[LoadedModel] = ModelCache(settings.model.cache_size, self._load)
        self._model_settings: dict[str, ModelSettings] = {}

    def _load(self, preset: str) -> LoadedModel:
        m = self._model_settings[preset]
        log.info("loading model %s from %s on %s", preset, m.source, m.device)
        return load_model(m.source, device=m.device, dtype=m.dtype, compile=m.compile,
                          offline=m.offline, cache_dir=m.cache_dir,
                          download_timeout=m.download_timeout)

    def model(self, preset: str) -> tuple[LoadedModel, float]:
        """The loaded model for a preset and the seconds spent loading it (0 when cached)."""
        self._model_settings.setdefault(preset, model_settings_for(self.settings, preset))
        started = time.perf_counter()
        loaded = self.cache.get(preset)
        return loaded, time.perf_counter() - started

    def preload(self) -> float | None:
        """Load the preset's model now if settings ask for it; the seconds it took, or None."""
        if not self.settings.model.preload:
            return None
        return self.model(self.settings.model.preset)[1]

    def run(self, spec: JobSpec, *, worker: str, progress: Progress, started_at: float) -> RunOutcome:
        """Generate one job's file; partial files are removed whatever happens, and so are the
        leftovers of earlier attempts of the same job when this one starts."""
        storage = self.settings.storage
        temp_dir = job_temp_dir(self.settings, spec.job_id)
        out_dir = Path(storage.output_dir).expanduser().resolve()
        clear_leftovers(self.settings, spec.job_id)
        temp_dir.mkdir(parents=True, exist_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            progress(0.0, "loading model")
            loaded, load_s = self.model(spec.model)
            item = GenerationItem(
                prompt=spec.prompt, duration_s=spec.duration, temperature=spec.temperature,
                top_k=spec.top_k, top_p=spec.top_p, guidance_scale=spec.guidance_scale, seed=spec.seed,
                melody=self._melody(spec, temp_dir, loaded.sampling_rate))
            # The batch API takes a list even for one job, so cross-job batching needs no rewrite.
            audio = generate(loaded, [item], lambda f, msg: progress(0.9 * f, msg))[0]
            progress(0.9, "post-processing")
            # spec.output is the shared OutputSpec, checked when the spec was decoded; the
            # table's suffix is also what maintenance sweeps.
            dest = out_dir / f"{spec.job_id}{spec.output.info.extension}"
            rendered = render(audio.samples, audio.sample_rate, spec.output, dest,
                              temp_dir=temp_dir)
            timings = Timings(queue_wait=max(0.0, started_at - spec.enqueued_at), model_load=load_s,
                              generate=audio.generate_seconds, postprocess=rendered.postprocess_seconds,
                              total=time.time() - started_at)
            result = JobResult(
                job_id=spec.job_id, output_path=str(rendered.path), sidecar_path=str(dest) + ".json",
                format=rendered.format, duration=rendered.duration_s, sample_rate=rendered.sample_rate,
                channels=rendered.channels, bit_depth=rendered.bit_depth,
                loudness_lufs=rendered.loudness_lufs, peak_dbfs=rendered.peak_dbfs, model=spec.model,
                seed=audio.seed, worker=worker, timings=timings)
            write_sidecar(dest, {"request": spec.model_dump(mode="json"),
                                 "result": result.model_dump(mode="json")})
            return RunOutcome(result, rendered.duration_s, audio.generate_seconds)
        except BaseException:
            # A file without its sidecar (or a sidecar's .part) is no result: a failed attempt
            # leaves nothing; a retry writes the whole pair again.
            remove_partial(job_outputs(self.settings, spec.job_id))
            raise
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)

    def _melody(self, spec: JobSpec, temp_dir: Path,
                sampling_rate: int) -> tuple[npt.NDArray[np.float32], int] | None:
        if spec.melody is None:
            return None
        return decode_mono(spec.melody.materialise(temp_dir), sampling_rate), sampling_rate

    def remove_outputs(self, job_id: str) -> None:
        """Delete every file a cancelled or timed-out job left (see :func:`discard_job_files`)."""
        discard_job_files(self.settings, job_id)

