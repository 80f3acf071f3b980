"""The job contract: what a caller asks for, what crosses the broker, what comes back.

``GenerationRequest`` is what a calling service builds; fields left unset take the deployment's
defaults. ``resolve()`` checks it against the Settings' limits and turns it into a ``JobSpec``:
every default filled in and a seed drawn, so a retried or redelivered job makes the same audio
and a worker never depends on the producer's defaults. Only JSON crosses the broker.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import unicodedata
import uuid
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.config.presets import known_presets
from pipeline.contract.output_format import BitDepth, FormatName, Normalization, SampleRate
from pipeline.contract.output_format import OutputSpec as OutputSpec  # noqa: PLC0414 (re-export)
from pipeline.contract.remote_urls import MELODY_SCHEMES, WEBHOOK_SCHEMES, check_url
from pipeline.errors import InvalidRequest

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
QUEUE_PREFIX = "musicgen."
MAX_SEED = 2**32 - 1
# The widest bounds any deployment may configure (config/schema.py); a deployment's own, tighter
# limits are checked by resolve(). A spec past these was not made by a producer of ours.
MAX_DURATION_S = 300.0
MAX_PROMPT_CHARS = 10_000
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux: a longer melody path is refused, not an OSError
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # a melody string that is a URI, not a path


def _printable(value: str) -> str:
    """Refuse control, format, surrogate, private-use and unassigned characters (ids, paths)."""
    bad = next((ch for ch in value if unicodedata.category(ch).startswith("C")), None)
    if bad is not None:
        raise ValueError(f"must not contain control or invisible characters (found {bad!r})")
    return value


# Bounds shared by the request (what a caller may ask for) and the spec (what crosses the
# broker): a spec is validated again when it is built and when a worker decodes it, so a request
# altered after validation (model_copy(update=...), model_construct) still cannot queue a value
# the request would refuse. NaN and infinity fail every range check.
Duration = Annotated[float, Field(gt=0, le=MAX_DURATION_S, allow_inf_nan=False)]
Temperature = Annotated[float, Field(ge=0.1, le=2.0, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=0, le=2048)]
TopP = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
GuidanceScale = Annotated[float, Field(ge=0.0, le=20.0, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
ContinuationTime = Annotated[float, Field(ge=0, le=3600.0, allow_inf_nan=False)]
Priority = Annotated[int, Field(ge=0, le=9, description="9 is the most urgent")]
UserId = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_printable)]
JobId = Annotated[str, Field(pattern=JOB_ID_PATTERN)]
PresetName = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_printable)]
ExperimentName = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_printable)]


def _webhook_shape(value: str) -> str:
    check_url(value, WEBHOOK_SCHEMES)
    return value


# The shape only (http/https, no credentials); the host allowlist is the deployment's, in resolve().
WebhookUrl = Annotated[str, AfterValidator(_webhook_shape)]

# The webhook events a request may ask for (webhook_events_filter), in the order a job sends
# them; "completed" is the job's end (succeeded, failed, timeout or cancelled).
WEBHOOK_EVENTS: tuple[str, ...] = ("start", "progress", "partial", "completed")
WebhookEventName = Literal["start", "progress", "partial", "completed"]
DEFAULT_WEBHOOK_EVENTS: tuple[WebhookEventName, ...] = ("completed",)


def _known_events(value: Any) -> Any:
    # Checked before the Literal items, so an empty list or an unknown name is one error on the
    # field itself (not on "webhook_events_filter.0"), over HTTP as from Python.
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("name at least one event: " + ", ".join(WEBHOOK_EVENTS))
        unknown = [name for name in value if name not in WEBHOOK_EVENTS]
        if unknown:
            raise ValueError(f"unknown event {unknown[0]!r}: the events are "
                             + ", ".join(WEBHOOK_EVENTS))
        return list(dict.fromkeys(value))  # a name given twice is asked for once
    return value


WebhookEvents = Annotated[list[WebhookEventName], BeforeValidator(_known_events)]


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


def _field_path(loc: tuple[int | str, ...]) -> str:
    """A dotted field path from pydantic's ``loc``, without its internal union-member tags
    (``melody.lax-or-strict[...]``): callers branch on the field, not on pydantic's schema."""
    parts: list[str] = []
    for part in loc:
        text = str(part)
        if "[" in text or text in _UNION_TAGS:
            break
        parts.append(text)
    return ".".join(parts)


_UNION_TAGS = frozenset({"bytes", "str", "int", "float", "function-after", "function-before"})


def invalid_request_from(exc: ValidationError, prefix: str = "") -> InvalidRequest:
    """Every pydantic error of a request as one InvalidRequest naming the first bad field."""
    problems = [{"field": prefix + (_field_path(e["loc"]) or "request"),
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

    prompt: str | None = Field(None, min_length=1, max_length=MAX_PROMPT_CHARS,
                               description="what to generate; control characters are stripped. "
                                           "Required unless a continuation is given")
    duration: Duration | None = Field(None, description="seconds of audio")
    model: PresetName | None = Field(None, description="model preset, e.g. musicgen-small")
    temperature: Temperature | None = None
    top_k: TopK | None = None
    top_p: TopP | None = None
    guidance_scale: GuidanceScale | None = None
    seed: Seed | None = Field(None, description="same seed + model + hardware = same audio")
    # Allowed values are the output-format table's; combinations are checked by resolve().
    format: FormatName | None = None
    sample_rate: SampleRate | None = None
    channels: Literal[1, 2] | None = None
    bit_depth: BitDepth | None = Field(None, description="wav and flac only")
    normalization: Normalization | None = None
    loudness_target: float | None = Field(None, ge=-70.0, le=0.0,
                                          description="LUFS for lufs, dBFS for peak and rms")
    melody: Path | bytes | str | None = Field(
        None, description="a local audio file, its bytes, or an s3:// or https:// URI the "
                          "worker fetches (hosts and bucket allowed by the settings)")
    continuation: Path | bytes | str | None = Field(
        None, description="a clip the model continues (audiocraft's generate_continuation): a "
                          "local audio file, its bytes, or an s3:// or https:// URI, as for "
                          "melody; the part used must leave at least 1 s of the model's window")
    continuation_start: ContinuationTime | None = Field(
        None, description="seconds into the continuation clip where the part used starts "
                          "(default 0)")
    continuation_end: ContinuationTime | None = Field(
        None, description="seconds into the continuation clip where the part used ends "
                          "(default: the clip's end); after continuation_start")
    continuation_included: bool = Field(
        True, description="true: the output is the clip followed by the new audio, and "
                          "duration is the whole output's length (longer than the clip); "
                          "false: the output is the new audio only, duration long")
    webhook_url: WebhookUrl | None = Field(
        None, description="http(s) URL the worker POSTs the job's end to, signed; its host must "
                          "be in webhooks.allowed_hosts")
    webhook_events_filter: WebhookEvents | None = Field(
        None, description="which events are POSTed to webhook_url: start (the job begins "
                          "running, once per attempt), progress (at most one per "
                          "webhooks.progress_interval_s), partial (a long-form window's audio is "
                          "ready), completed (its end); unset = [\"completed\"]")
    user_id: UserId = "anonymous"
    priority: Priority = 5
    job_id: JobId | None = Field(None, description="client id, scoped to its user: enqueueing "
                                                   "the same id twice gives one job")
    stream: bool = Field(False, description="publish the audio in chunks as it is generated "
                                            "(handle.stream()); needs features.streaming_generation "
                                            "and the static engine")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise invalid_request_from(exc) from exc

    @field_validator("prompt")
    @classmethod
    def _clean_prompt(cls, value: str | None) -> str | None:
        if value is None:
            return None
        cleaned = sanitise_prompt(value)
        if not cleaned:
            raise ValueError("prompt is empty once control characters and whitespace are removed")
        return cleaned

    @field_validator("webhook_events_filter")
    @classmethod
    def _events_need_a_url(cls, value: list[WebhookEventName] | None,
                           info: ValidationInfo) -> list[WebhookEventName] | None:
        # Declared after webhook_url, so info.data has it (when it was valid).
        if value is not None and info.data.get("webhook_url") is None:
            raise ValueError("webhook_events_filter needs a webhook_url to send the events to")
        return value

    @field_validator("melody", "continuation", mode="before")
    @classmethod
    def _audio_kind(cls, value: Any, info: ValidationInfo) -> Any:
        # Checked before pydantic's union, so a wrong type is one error on the field (not one per
        # union member), and a path is checked before anything touches the file system with it.
        return audio_source(value, str(info.field_name))

    @model_validator(mode="after")
    def _continuation_fields(self) -> GenerationRequest:
        # Typed errors, not ValueError: pydantic would name the model, not the field.
        if self.continuation is None:
            if self.prompt is None:
                raise InvalidRequest("prompt is required unless a continuation is given",
                                     "prompt")
            for name in ("continuation_start", "continuation_end"):
                if getattr(self, name) is not None:
                    raise InvalidRequest(f"{name} is set without a continuation", name)
        check_continuation_span(self.continuation_start, self.continuation_end)
        return self


def audio_source(value: Any, field: str) -> Any:
    """An audio input (melody, continuation) as bytes, a ``Path`` or a URI ``str``, its shape
    checked; ``ValueError`` naming ``field`` otherwise."""
    if value is None or isinstance(value, (bytes, bytearray)):
        return value
    if not isinstance(value, (str, Path)):
        raise ValueError(f"{field} must be a file path, the file's bytes or a URI, not "
                         f"{type(value).__name__}")
    if isinstance(value, str) and _URI.match(value):
        check_url(value, MELODY_SCHEMES)  # a URI stays a str; every other str is a path
        return value
    text = str(value)
    if not text or len(text) > MAX_PATH_CHARS:
        raise ValueError(f"a {field} path must be 1 to {MAX_PATH_CHARS} characters")
    if any(len(part) > 255 for part in Path(text).parts):
        raise ValueError(f"a {field} path has a name longer than 255 characters")
    _printable(text)
    return Path(text)


def check_continuation_span(start: float | None, end: float | None) -> None:
    """``InvalidRequest`` on ``continuation_end`` unless the span used is non-empty."""
    if end is not None and end <= (start or 0.0):
        raise InvalidRequest(f"continuation_end ({end:g} s) must be after continuation_start "
                             f"({start or 0.0:g} s)", "continuation_end",
                             {"rule": "end_after_start", "start": start or 0.0, "end": end})


class MelodyInput(BaseModel):
    """An audio input (a melody or a continuation clip; the name is the melody's, which came
    first) as it crosses the broker: a URI (``file://`` or ``s3://`` in the storage, put
    there by the producer, or the caller's own ``s3://`` / ``https://``). ``path`` and
    ``data_b64`` are read from messages of producers older than storage by reference."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS),
                    AfterValidator(_printable)] | None = None
    data_b64: str | None = None
    uri: str | None = None
    # Uploaded by the producer for this job: the worker deletes it when the job ends.
    owned: bool = False
    # Joined into a file name on the worker: an extension, never a path.
    suffix: str = Field(".wav", pattern=r"^\.[A-Za-z0-9]{1,10}$")

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_absolute():
            raise ValueError("a melody path must be absolute (resolve() resolves it before sending)")
        return value

    @field_validator("data_b64")
    @classmethod
    def _base64(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError(f"data_b64 is not valid base64: {exc}") from exc
        return value

    @field_validator("uri")
    @classmethod
    def _uri_shape(cls, value: str | None) -> str | None:
        # file:// names no host: the worker reads it only inside its storage folder.
        if value is not None and value.startswith("file:///"):
            _printable(value)
        elif value is not None:
            check_url(value, MELODY_SCHEMES)
        return value

    @model_validator(mode="after")
    def _one_source(self) -> MelodyInput:
        if sum(v is not None for v in (self.path, self.data_b64, self.uri)) != 1:
            raise ValueError("a melody is a uri, a path or data_b64, exactly one of them")
        return self

    def materialise(self, folder: Path) -> Path:
        """A local file the worker can read from a ``path`` or ``data_b64`` melody (bytes are
        written under ``folder``); a ``uri`` is fetched by workers/inputs.py instead."""
        if self.uri is not None:
            raise ValueError("a melody by URI is fetched, not materialised")
        if self.path is not None:
            return Path(self.path)
        target = folder / f"melody-{uuid.uuid4().hex}{self.suffix}"
        target.write_bytes(base64.b64decode(self.data_b64 or ""))
        return target


class JobSpec(BaseModel):
    """What a worker receives: a request with every default resolved. JSON only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: JobId
    # Empty only for a continuation without text (GenerationRequest.prompt is optional then).
    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    duration: Duration
    model: PresetName
    temperature: Temperature
    top_k: TopK
    top_p: TopP
    guidance_scale: GuidanceScale
    seed: Seed
    output: OutputSpec
    melody: MelodyInput | None = None
    # The clip to continue, travelling by reference like the melody; GenerationRequest's
    # descriptions say what the span and ``continuation_included`` mean for ``duration``.
    continuation: MelodyInput | None = None
    continuation_start: ContinuationTime = 0.0
    continuation_end: ContinuationTime | None = None
    continuation_included: bool = True
    user_id: UserId
    priority: Priority
    enqueued_at: float = Field(ge=0, allow_inf_nan=False)
    # The experiment that chose this job's model and the variant (a preset) it was given, both
    # recorded in the ledger; unset for a job no experiment touched (pipeline/ops/experiments.py).
    experiment: ExperimentName | None = None
    variant: PresetName | None = None
    # Checked against webhooks.allowed_hosts by resolve() and again before each delivery.
    webhook_url: WebhookUrl | None = None
    # Absent from messages of producers before the filter: the job's end only, as then.
    webhook_events_filter: WebhookEvents = Field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_EVENTS))
    # The worker publishes chunks to the job's Redis Stream (pipeline/infra/keys.py stream_key).
    stream: bool = False

    @model_validator(mode="after")
    def _variant_is_the_model(self) -> JobSpec:
        # Stats compare variants by what ran: a variant other than the model would mislabel it.
        if (self.experiment is None) != (self.variant is None):
            raise ValueError("experiment and variant are set together or not at all")
        if self.variant is not None and self.variant != self.model:
            raise ValueError(f"variant {self.variant!r} is not the job's model {self.model!r}")
        return self

    @model_validator(mode="after")
    def _prompt_or_continuation(self) -> JobSpec:
        if not self.prompt and self.continuation is None:
            raise ValueError("prompt is empty and there is no continuation")
        if self.continuation is None and (self.continuation_start or self.continuation_end
                                          is not None):
            raise ValueError("a continuation span without a continuation")
        check_continuation_span(self.continuation_start, self.continuation_end)
        return self

    @field_validator("prompt")
    @classmethod
    def _sanitised(cls, value: str) -> str:
        # resolve() sanitises the prompt; one that is not already clean was not made by it.
        if sanitise_prompt(value) != value:
            raise ValueError("prompt holds control characters or untrimmed whitespace")
        return value

    @field_validator("model")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        # Only a shipped preset: the queue name and the worker's preset table come from it.
        if value not in known_presets():
            raise ValueError(f"unknown model preset; known presets: {', '.join(known_presets())}")
        return value


class Timings(BaseModel):
    queue_wait: float = 0.0
    model_load: float = 0.0
    generate: float = 0.0
    postprocess: float = 0.0
    total: float = 0.0


class JobResult(BaseModel):
    """A finished job: where the file is and what it is.

    ``uri`` is where the file is stored (``file://`` or ``s3://``): ``handle.download()`` and
    ``handle.open()`` fetch it from any machine with the same storage settings. On object
    storage ``download_url`` is a pre-signed plain-HTTP GET URL valid until
    ``download_expires_at`` (epoch seconds), and ``output_path`` / ``sidecar_path`` are None.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    job_id: str
    output_path: str | None = None
    sidecar_path: str | None = None
    uri: str
    download_url: str | None = None
    download_expires_at: float | None = None
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
    # How many jobs shared this job's model.generate call; timings.generate is that call's wall
    # time, so the job's share of the GPU is generate / batch_size.
    batch_size: int = Field(1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _uri_of_a_local_result(cls, data: Any) -> Any:
        # Results stored before storage by reference have a path and no uri: still readable.
        if isinstance(data, dict) and not data.get("uri") and data.get("output_path"):
            data = {**data, "uri": Path(str(data["output_path"])).absolute().as_uri()}
        return data


def new_job_id() -> str:
    return uuid.uuid4().hex


def draw_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def check_job_id(job_id: str) -> str:
    if not re.match(JOB_ID_PATTERN, job_id):
        raise InvalidRequest(f"job id {job_id!r} must match {JOB_ID_PATTERN}", "job_id")
    return job_id



def request_fingerprint(request: GenerationRequest) -> str:
    """A SHA-256 of what the request asks for, so a repeated ``job_id`` can be told apart from
    a different request reusing it. Normalised: the id and user (checked on their own) are left
    out, an unset field equals one set to None, and a melody counts by its content (a gateway
    upload lands at a new path each time; a file path is read, a URI is its text)."""
    fields = request.model_dump(mode="python", exclude={"job_id", "user_id"})
    if request.continuation is None:  # unset: the fingerprint of a request made before them
        for name in ("continuation_start", "continuation_end", "continuation_included"):
            fields.pop(name, None)
    for name in ("melody", "continuation"):
        value = fields.pop(name, None)
        if isinstance(value, (bytes, bytearray)):
            fields[name] = "sha256:" + hashlib.sha256(value).hexdigest()
        elif isinstance(value, Path):
            try:
                fields[name] = "sha256:" + hashlib.sha256(value.read_bytes()).hexdigest()
            except OSError:  # resolve() reports a missing file; the path is all there is
                fields[name] = str(value)
        elif value is not None:
            fields[name] = str(value)
    text = json.dumps(fields, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()
