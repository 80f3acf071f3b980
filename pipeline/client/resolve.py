"""Check a request against this deployment's limits and turn it into a ``JobSpec``.

Everything that can be refused is refused here, before anything is queued: a bad job must
never reach a GPU. Field names in errors are the request's own (``duration``, ``melody``...).
"""

from __future__ import annotations

import base64
import re
import time
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from pipeline.config.presets import check_preset, model_settings_for
from pipeline.config.schema import Settings
from pipeline.contract.continuation import continuation_span
from pipeline.contract.flags import FlagRule, enabled
from pipeline.contract.jobs import (
    DEFAULT_WEBHOOK_EVENTS,
    GenerationRequest,
    JobSpec,
    MelodyInput,
    OutputSpec,
    draw_seed,
    invalid_request_from,
)
from pipeline.contract.output_format import FORMATS, check_output_spec
from pipeline.contract.public_addresses import HostNotPublic, public_addresses
from pipeline.contract.remote_urls import host_allowed
from pipeline.contract.user_context import UserContext
from pipeline.errors import InvalidRequest, UnsupportedOption
from pipeline.infra.audio_probe import MelodyLimits, validate_melody
from pipeline.ops.experiments import Assignment, assign

_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,10}$")  # MelodyInput.suffix's own pattern


def _output(request: GenerationRequest, settings: Settings, stereo_model: bool = False) -> OutputSpec:
    """The finished file: the request over the deployment's audio defaults.

    A stereo preset's file keeps both channels unless the request asks for mono; a mono
    model's follows ``audio.channels`` (upmixed when that says 2).

    The worker's own check against the output-format table runs here, so a combination the
    worker could not render (mp3 at 96 kHz, a peak target of -65 dBFS) is refused, naming the
    request's field, before any GPU time is spent.
    """
    audio = settings.audio
    fmt = request.format or audio.format
    info = FORMATS.get(fmt)
    # The deployment's default depth is for lossless formats only; a depth the caller asked for
    # is passed on as is, so the check refuses it for a lossy format instead of dropping it.
    depth = request.bit_depth if request.bit_depth is not None else (
        audio.bit_depth if info is not None and info.lossless else None)
    normalization = request.normalization or audio.normalization
    target = request.loudness_target
    if target is None:
        target = {"lufs": audio.lufs_target, "peak": audio.peak_target_dbfs,
                  "rms": audio.rms_target_dbfs}.get(normalization)
    fields: dict[str, Any] = {
        "format": fmt, "sample_rate": request.sample_rate or audio.sample_rate,
        "channels": request.channels or (2 if stereo_model else audio.channels), "bit_depth": depth,
        "normalization": normalization, "loudness_target": target,
        "mp3_bitrate": audio.mp3_bitrate}
    # The check first, on an unvalidated spec: it raises the typed error (UnsupportedOption or
    # InvalidRequest naming the request's field), where validation would raise pydantic's.
    check_output_spec(OutputSpec.model_construct(**fields))
    return OutputSpec.model_validate(fields)


def _melody(request: GenerationRequest, settings: Settings, melody_model: bool,
            user: UserContext) -> MelodyInput | None:
    if request.melody is None:
        return None
    if not enabled(settings.features, "melody_conditioning", user):
        # A plain false (or a rule switched off) is the deployment's choice; a rule that
        # leaves this user out (percentage, tiers, deny) is about this user only.
        flag = settings.features.melody_conditioning
        everyone = flag is False or (isinstance(flag, FlagRule) and not flag.enabled)
        raise UnsupportedOption("melody conditioning is switched off "
                                + ("in this deployment" if everyone else "for this user"), "melody")
    if not melody_model:
        raise UnsupportedOption("this model preset takes no melody; use a melody preset "
                                "such as musicgen-melody", "melody")
    return _audio_input(request.melody, settings, "melody")[0]


def _limits(settings: Settings) -> MelodyLimits:
    v = settings.validation
    return MelodyLimits(max_size_mb=v.max_melody_size_mb, min_duration_s=v.melody_min_duration,
                        max_duration_s=v.melody_max_duration, allowed_formats=tuple(v.melody_formats),
                        min_sample_rate=v.melody_min_sample_rate)


def _audio_input(value: Path | bytes | str, settings: Settings,
                 field: str) -> tuple[MelodyInput, float | None]:
    """An audio input (melody or continuation) as it will cross the broker, checked against the
    validation limits, and its length in seconds (None for a URI: the worker checks it)."""
    if isinstance(value, str):
        return _by_uri(value, settings, field), None
    try:
        info = validate_melody(value, _limits(settings), field=field)
        if isinstance(value, bytes):
            # Bytes travel inside the JSON payload (bounded by max_melody_size_mb); a path on
            # shared storage keeps the broker light for big files.
            return MelodyInput(data_b64=base64.b64encode(value).decode("ascii")), info.duration_s
        return MelodyInput(path=str(Path(value).expanduser().resolve())), info.duration_s
    except (OSError, ValueError) as exc:  # a path the OS refuses (too long, a loop, no access)
        raise InvalidRequest(f"the {field} cannot be read: {exc}", field) from exc


def _by_uri(uri: str, settings: Settings, field: str) -> MelodyInput:
    """An input the caller keeps: fetched by the worker (limits checked there), never deleted.

    An ``s3://`` one only from the deployment's own bucket (the workers' keys may reach others
    the caller must not read through us); an ``https://`` one only from
    ``storage.melody_url_hosts``.
    """
    parts = urlsplit(uri)
    storage = settings.storage
    if parts.scheme == "s3":
        ours = urlsplit(storage.url or "")
        if ours.scheme != "s3" or parts.netloc != ours.netloc:
            raise InvalidRequest(f"an s3:// {field} must be in this deployment's bucket "
                                 f"({ours.netloc or 'none: storage.url is not s3://'})", field)
    elif not host_allowed(parts.hostname or "", storage.melody_url_hosts):
        raise InvalidRequest(f"{field} host {parts.hostname!r} is not in storage.melody_url_hosts",
                             field)
    suffix = PurePosixPath(parts.path).suffix
    return MelodyInput(uri=uri, suffix=suffix if _SUFFIX.match(suffix) else ".wav")


def _continuation(request: GenerationRequest, settings: Settings, *, duration: float,
                  window_s: float) -> tuple[MelodyInput | None, float]:
    """The clip to continue as it will cross the broker, and the seconds the model's windows
    must cover (the request's duration, plus the clip's span when the output leaves it out).

    The span is checked here when the clip can be probed (bytes, a path); a clip by URI is
    checked by the worker with the same rules (pipeline/contract/continuation.py).
    """
    if request.continuation is None:
        return None, duration
    if request.melody is not None:
        # The first window would be conditioned on both the clip's codes and a melody's
        # chroma; nothing generates or tests that combination yet, so it is refused plainly.
        raise UnsupportedOption("a continuation cannot be combined with a melody; send one or "
                                "the other", "continuation")
    ref, clip_s = _audio_input(request.continuation, settings, "continuation")
    if clip_s is None:
        known = request.continuation_end
        if known is None:
            return ref, duration
        span_s = known - (request.continuation_start or 0.0)
        return ref, duration if request.continuation_included else span_s + duration
    span = continuation_span(start_s=request.continuation_start, end_s=request.continuation_end,
                             clip_s=clip_s, window_s=window_s, duration_s=duration,
                             included=request.continuation_included)
    return ref, span.total_s(duration)


def _webhook(request: GenerationRequest, settings: Settings, user: UserContext) -> str | None:
    """The request's webhook URL once this deployment's allowlist admits its host."""
    url = request.webhook_url
    if url is None:
        return None
    if not enabled(settings.features, "webhooks", user):
        raise UnsupportedOption("webhooks are switched off for this user (features.webhooks)",
                                "webhook_url")
    hooks = settings.webhooks
    if not (hooks.allowed_hosts or hooks.public_hosts) or hooks.secret is None:
        raise UnsupportedOption("webhooks are off in this deployment (webhooks.allowed_hosts "
                                "or webhooks.public_hosts, and webhooks.secret, are not set)",
                                "webhook_url")
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host_allowed(host, hooks.allowed_hosts):
        return url
    if not hooks.public_hosts:
        # Said plainly, without listing the allowed hosts: the list is the operator's.
        raise InvalidRequest(f"webhook host {host!r} is not allowed (webhooks.allowed_hosts)",
                             "webhook_url")
    try:
        public_addresses(host, parts.port)
    except HostNotPublic as exc:
        raise InvalidRequest(f"webhook {exc}: only public receivers are allowed",
                             "webhook_url") from exc
    except OSError as exc:
        raise InvalidRequest(f"webhook host {host!r} does not resolve ({exc})",
                             "webhook_url") from exc
    return url


def _revalidated(request: object) -> GenerationRequest:
    """The request checked again: ``model_copy(update=...)`` and ``model_construct`` skip
    validation, so a request object is no proof that its values were ever checked."""
    if not isinstance(request, GenerationRequest):
        raise InvalidRequest(f"expected a GenerationRequest, got {type(request).__name__}", "request")
    return GenerationRequest(**dict(request))


def resolve(request: GenerationRequest, settings: Settings, *, job_id: str,
            user: UserContext | None = None) -> JobSpec:
    """The request with every default filled in, or a typed error naming the field.

    ``user`` is who the request is for (the producer reads the tier from the quota tables);
    without it the request's user on the default tier, as for a user with no quota row.

    The spec is built through validation too (``JobSpec``'s bounds are the widest any
    deployment allows), so nothing reaches the broker that a worker would refuse to decode.
    """
    request = _revalidated(request)
    if user is None:
        user = UserContext(request.user_id, settings.quotas.default_tier)
    if request.prompt is not None and len(request.prompt) > settings.validation.max_prompt_length:
        raise InvalidRequest(f"prompt is {len(request.prompt)} characters; the limit is "
                             f"{settings.validation.max_prompt_length}", "prompt")
    # A closed set, looked up: ModelNotFound for anything else (never a path).
    # A pinned model is the caller's choice; otherwise an experiment may choose (sticky per user).
    assigned = assign(settings, user, datetime.now(UTC)) if request.model is None else None
    preset = (check_preset(request.model) if request.model is not None
              else assigned.variant if assigned is not None else settings.model.preset)
    model = model_settings_for(settings, preset)

    gen = settings.generation
    duration = request.duration if request.duration is not None else gen.default_duration
    if duration < gen.min_duration or duration > gen.max_duration:
        raise InvalidRequest(f"duration {duration:g} s is outside {gen.min_duration:g}..{gen.max_duration:g} s",
                             "duration")
    continuation, total = _continuation(request, settings, duration=duration,
                                        window_s=model.max_duration)
    if total > gen.max_duration:  # a continuation left out of the output still takes windows
        raise InvalidRequest(f"duration {duration:g} s and the {total - duration:g} s "
                             f"continuation are {total:g} s, past {gen.max_duration:g} s", "duration")
    if total > model.max_duration and not enabled(settings.features, "long_form", user):
        # Past the window the worker continues window by window (workers/runtime/longform.py);
        # the flag decides who may ask for that.
        what = (f"duration {duration:g} s" if total == duration
                else f"duration {duration:g} s with the continuation ({total:g} s)")
        raise UnsupportedOption(f"{what} is longer than the {model.max_duration:g} s window "
                                f"of {preset}, and long-form generation is switched off for this user "
                                "(features.long_form)", "duration")
    try:
        return _spec(request, settings, job_id=job_id, preset=preset, duration=duration,
                     melody_model=model.melody, user=user, assigned=assigned,
                     stereo_model=model.stereo, continuation=continuation)
    except ValidationError as exc:  # a deployment default past the contract's bounds
        raise invalid_request_from(exc) from exc


def _spec(request: GenerationRequest, settings: Settings, *, job_id: str, preset: str,
          duration: float, melody_model: bool, user: UserContext,
          assigned: Assignment | None = None, stereo_model: bool = False,
          continuation: MelodyInput | None = None) -> JobSpec:
    gen = settings.generation
    return JobSpec(
        continuation=continuation, continuation_start=request.continuation_start or 0.0,
        continuation_end=request.continuation_end,
        continuation_included=request.continuation_included,
        job_id=job_id, prompt=request.prompt or "", duration=duration, model=preset,
        temperature=request.temperature if request.temperature is not None else gen.default_temperature,
        top_k=request.top_k if request.top_k is not None else gen.default_top_k,
        top_p=request.top_p if request.top_p is not None else gen.default_top_p,
        guidance_scale=(request.guidance_scale if request.guidance_scale is not None
                        else gen.default_guidance_scale),
        seed=request.seed if request.seed is not None else draw_seed(),
        output=_output(request, settings, stereo_model), melody=_melody(request, settings, melody_model, user),
        user_id=request.user_id, enqueued_at=time.time(),
        # priority_boost raises the job one level of Priority (pipeline/contract/jobs.py: 0-9, 9 first; 9
        # stays 9). A level is one of the ten values celery_priority (pipeline/infra/celery_app.py)
        # maps to the broker's 9 - level, served lowest first; the Redis transport keeps one
        # list per level (priority_steps, pipeline/infra/keys.py), so one level is a real step ahead.
        priority=(min(request.priority + 1, 9) if enabled(settings.features, "priority_boost", user)
                  else request.priority),
        experiment=assigned.experiment if assigned else None,
        variant=assigned.variant if assigned else None,
        webhook_url=_webhook(request, settings, user),
        webhook_events_filter=list(request.webhook_events_filter or DEFAULT_WEBHOOK_EVENTS),
        stream=_stream(request, settings, user, preset=preset, duration=duration),
    )


def _stream(request: GenerationRequest, settings: Settings, user: UserContext, *, preset: str,
            duration: float) -> bool:
    """Whether the job streams: refused here, naming ``stream``, for anything the worker could not
    stream. Chunks come out of the static engine's steps, and out of long-form windows (a window
    at a time), so a job that would run on Hugging Face generate in one call (``model.engine =
    hf``, a melody) is refused; a continuation streams as any job does (the engine runs it
    within the window, long-form windows past it), from the clip when it is included; the
    producer reads the same ``model`` settings as the workers, so
    it knows the engine here. (A job the engine hands to HF all the same, its self-check failed
    or its prompt past the engine's prompt cache, streams its audio as one chunk at the end.)"""
    if not request.stream:
        return False
    if not enabled(settings.features, "streaming_generation", user):
        raise UnsupportedOption("stream=True: streaming generation is switched off for this user "
                                "(features.streaming_generation)", "stream")
    model = model_settings_for(settings, preset)
    if model.engine != "static":
        raise UnsupportedOption(f"stream=True needs the static engine; {preset} runs on "
                                f"model.engine = {model.engine}", "stream")
    if request.melody is not None:
        raise UnsupportedOption("stream=True cannot be combined with a melody (melody jobs run "
                                "on Hugging Face generate, which does not stream)", "stream")
    return True
