"""The job contract: what a caller asks for, what crosses the broker, what comes back.

``GenerationRequest`` is what a calling service builds; fields left unset take the deployment's
defaults. ``resolve()`` checks it against the Settings' limits and turns it into a ``JobSpec``:
every default filled in and a seed drawn, so a retried or redelivered job makes the same audio
and a worker never depends on the producer's defaults. Only JSON crosses the broker.
"""

from __future__ import annotations

import base64
import re
import secrets
import unicodedata
import uuid
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import InvalidRequest
from pipeline.output_format import BitDepth, FormatName, Normalization, SampleRate
from pipeline.output_format import OutputSpec as OutputSpec  # noqa: PLC0414 (re-export)

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
QUEUE_PREFIX = "musicgen."
MAX_SEED = 2**32 - 1


def queue_for(preset: str) -> str:
    """One queue per model preset, so a worker only takes jobs for the model it holds."""
    return f"{QUEUE_PREFIX}{preset}"


class JobStatus(str, Enum):
    queued = "queued"
    started = "started"
    progress = "progress"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


def invalid_request_from(exc: ValidationError, prefix: str = "") -> InvalidRequest:
    """Every pydantic error of a request as one InvalidRequest naming the first bad field."""
    problems = [{"field": prefix + ".".join(str(p) for p in e["loc"]) or "request",
                 "message": e["msg"], "type": e["type"]} for e in exc.errors(include_url=False)]
    first = problems[0]
    return InvalidRequest(f"{first['field']}: {first['message']}"
                          + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                          first["field"], problems)


def sanitise_prompt(text: str) -> str:
    """Drop control and format characters, collapse whitespace: what the model sees is text."""
    kept = "".join(" " if ch in "\t\n\r" else ch for ch in text
                   if unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co") or ch in "\t\n\r")
    return " ".join(kept.split())


class GenerationRequest(BaseModel):
    """A request for one piece of music; unset fields take the deployment's defaults.

    Invalid values raise ``InvalidRequest`` (code ``invalid_request``) naming the field.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, description="what to generate; control characters are stripped")
    duration: float | None = Field(None, gt=0, description="seconds of audio")
    model: str | None = Field(None, min_length=1, description="model preset, e.g. musicgen-small")
    temperature: float | None = Field(None, ge=0.1, le=2.0)
    top_k: int | None = Field(None, ge=0, le=2048)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    guidance_scale: float | None = Field(None, ge=0.0, le=20.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="same seed + model + hardware = same audio")
    # Allowed values are the output-format table's; combinations are checked by resolve().
    format: FormatName | None = None
    sample_rate: SampleRate | None = None
    channels: Literal[1, 2] | None = None
    bit_depth: BitDepth | None = Field(None, description="wav and flac only")
    normalization: Normalization | None = None
    loudness_target: float | None = Field(None, ge=-70.0, le=0.0,
                                          description="LUFS for lufs, dBFS for peak and rms")
    melody: Path | bytes | None = Field(None, description="a local audio file, or its bytes")
    user_id: str = Field("anonymous", min_length=1, max_length=128)
    priority: int = Field(5, ge=0, le=9, description="9 is the most urgent")
    job_id: str | None = Field(None, pattern=JOB_ID_PATTERN,
                               description="client id: enqueueing the same id twice gives one job")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise invalid_request_from(exc) from exc

    @field_validator("prompt")
    @classmethod
    def _clean_prompt(cls, value: str) -> str:
        cleaned = sanitise_prompt(value)
        if not cleaned:
            raise ValueError("prompt is empty once control characters and whitespace are removed")
        return cleaned


class MelodyInput(BaseModel):
    """A melody as it crosses the broker: a path on shared storage, or base64 bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str | None = None
    data_b64: str | None = None
    suffix: str = ".wav"

    def materialise(self, folder: Path) -> Path:
        """A local file the worker can read (bytes are written under ``folder``)."""
        if self.path is not None:
            return Path(self.path)
        target = folder / f"melody-{uuid.uuid4().hex}{self.suffix}"
        target.write_bytes(base64.b64decode(self.data_b64 or ""))
        return target


class JobSpec(BaseModel):
    """What a worker receives: a request with every default resolved. JSON only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    prompt: str
    duration: float
    model: str
    temperature: float
    top_k: int
    top_p: float
    guidance_scale: float
    seed: int
    output: OutputSpec
    melody: MelodyInput | None = None
    user_id: str
    priority: int
    enqueued_at: float


class Timings(BaseModel):
    queue_wait: float = 0.0
    model_load: float = 0.0
    generate: float = 0.0
    postprocess: float = 0.0
    total: float = 0.0


class JobResult(BaseModel):
    """A finished job: where the file is and what it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    output_path: str
    sidecar_path: str
    format: str
    duration: float
    sample_rate: int
    channels: int
    bit_depth: int | None
    loudness_lufs: float | None
    peak_dbfs: float | None
    model: str
    seed: int
    worker: str
    timings: Timings


def new_job_id() -> str:
    return uuid.uuid4().hex


def draw_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def check_job_id(job_id: str) -> str:
    if not re.match(JOB_ID_PATTERN, job_id):
        raise InvalidRequest(f"job id {job_id!r} must match {JOB_ID_PATTERN}", "job_id")
    return job_id

