"""Continuation requests (issue 25): what a caller may ask, and a typed error naming the field for
every bad continuation, from the request's shape, resolve() (real ffprobe on real WAV files),
by-reference travel through the storage, the worker's fetch of a clip by URI, and the upload's
deletion when its job ends."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pipeline.cli import app as cli_app
from pipeline.client.inputs import by_reference
from pipeline.client.records import request_echo
from pipeline.client.resolve import resolve
from pipeline.config.schema import (
    FeatureSettings,
    ModelSettings,
    Settings,
    StorageSettings,
    ValidationSettings,
)
from pipeline.contract.continuation import (
    SPEC_FIELDS,
    continuation_span,
    generated_s,
    wire_form,
)
from pipeline.contract.jobs import GenerationRequest, JobSpec, MelodyInput, request_fingerprint
from pipeline.contract.outcome import FinalStatus
from pipeline.errors import InputUnavailable, InvalidRequest, PipelineError, UnsupportedOption
from pipeline.infra.celery_app import make_celery
from tests.pipeline.test_melody_by_reference import wav_bytes
from workers.inputs import fetch_input
from workers.webhook_task import job_ended

pytestmark = pytest.mark.timeout(60)

CLIP = wav_bytes(4.0)  # a real 4 s mono 16-bit WAV at 32 kHz


def _refusal(exc: type[PipelineError], settings: Settings | None = None,
             **fields: Any) -> PipelineError:
    with pytest.raises(exc) as caught:
        resolve(GenerationRequest(**{"model": "tiny", **fields}), settings or Settings(),
                job_id="j")
    return caught.value


def test_a_continuation_needs_no_prompt_and_says_how_long_the_output_is() -> None:
    spec = resolve(GenerationRequest(model="tiny", continuation=CLIP, continuation_start=1.0,
                                     continuation_end=3.0, duration=10.0), Settings(), job_id="j")
    assert spec.prompt == "" and spec.duration == 10.0
    assert spec.continuation is not None and spec.continuation.data_b64 is not None
    assert base64.b64decode(spec.continuation.data_b64) == CLIP
    assert (spec.continuation_start, spec.continuation_end, spec.continuation_included) == (
        1.0, 3.0, True)
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec  # crosses the broker
    left_out = resolve(GenerationRequest(prompt="more drums", model="tiny", continuation=CLIP,
                                         continuation_included=False, duration=5.0),
                       Settings(), job_id="k")
    assert left_out.prompt == "more drums" and left_out.continuation_included is False
    # The ledger never echoes the caller's bytes; a job without a continuation reads as before.
    assert request_echo(spec)["continuation"] is True
    plain = resolve(GenerationRequest(prompt="x", model="tiny", duration=1.0), Settings(),
                    job_id="p")
    assert "continuation" not in request_echo(plain)
    # Idempotent enqueues compare the clip by content.
    assert request_fingerprint(GenerationRequest(continuation=CLIP)) == request_fingerprint(
        GenerationRequest(continuation=bytes(CLIP)))
    assert request_fingerprint(GenerationRequest(continuation=CLIP)) != request_fingerprint(
        GenerationRequest(continuation=wav_bytes(3.0)))


@pytest.mark.parametrize(("fields", "field"), [
    ({}, "prompt"),  # neither a prompt nor a continuation
    ({"prompt": "x", "continuation_start": 1.0}, "continuation_start"),
    ({"prompt": "x", "continuation_end": 1.0}, "continuation_end"),
    ({"continuation": CLIP, "continuation_start": 2.0, "continuation_end": 2.0},
     "continuation_end"),
    ({"continuation": CLIP, "continuation_start": 3.0, "continuation_end": 1.0},
     "continuation_end"),
    ({"continuation": CLIP, "continuation_start": -1.0}, "continuation_start"),
    ({"continuation": CLIP, "continuation_end": float("nan")}, "continuation_end"),
    ({"continuation": 42}, "continuation"),
    ({"continuation": "http://cdn.example.com/clip.wav"}, "continuation"),
    ({"continuation": "x" * 5000}, "continuation"),
])
def test_a_request_of_the_wrong_shape_names_its_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        GenerationRequest(**fields)
    assert refused.value.field == field
    assert refused.value.code == "invalid_request"


@pytest.mark.parametrize(("fields", "field", "rule"), [
    ({"continuation_end": 4.5}, "continuation_end", "within_clip"),
    ({"continuation_start": 4.0}, "continuation_start", "within_clip"),
    # 4 s of clip and a 4.5 s window (the tiny preset's, set below) leave under 1 s of room.
    ({"duration": 4.5}, "continuation", "max_duration_s"),
    ({"continuation_end": 2.0, "duration": 2.0}, "duration", "longer_than_continuation"),
])
def test_a_span_that_cannot_be_continued_names_its_field(fields: dict[str, Any], field: str,
                                                         rule: str) -> None:
    settings = (Settings(model=ModelSettings(preset="tiny", max_duration=4.5))
                if field == "continuation" else Settings())
    error = _refusal(InvalidRequest, settings, continuation=CLIP, **{"duration": 3.0, **fields})
    assert error.field == field and error.details["rule"] == rule


def test_every_bad_clip_is_refused_naming_the_continuation(tmp_path: Path) -> None:
    strict = Settings(validation=ValidationSettings(max_melody_size_mb=1, melody_formats=["flac"],
                                                    melody_min_sample_rate=16000))
    cases: list[tuple[Settings, bytes | Path, str]] = [
        (Settings(), b"not audio at all", "readable"),
        (Settings(), b"", "non_empty"),
        (strict, wav_bytes(20.0), "max_size_mb"),  # 1.25 MB
        (strict, wav_bytes(2.0), "allowed_formats"),
        (Settings(), wav_bytes(2.0, rate=8000), "min_sample_rate"),
        (Settings(), wav_bytes(0.5), "min_duration_s"),
        (Settings(), tmp_path / "missing.wav", "exists"),
    ]
    for settings, clip, rule in cases:
        error = _refusal(InvalidRequest, settings, continuation=clip, duration=5.0)
        assert (error.field, error.details["rule"]) == ("continuation", rule), rule
        assert "continuation" in error.message


def test_a_continuation_with_a_melody_and_past_the_flag_are_refused() -> None:
    both = _refusal(UnsupportedOption, model="tiny-melody", continuation=CLIP,
                    melody=wav_bytes(2.0), prompt="x", duration=6.0)
    assert both.field == "continuation"
    # Left out of the output, the clip still takes the window: 4 s + 28 s is long-form.
    no_long = Settings(features=FeatureSettings(long_form=False))
    error = _refusal(UnsupportedOption, no_long, continuation=CLIP, duration=28.0,
                     continuation_included=False)
    assert error.field == "duration" and "32" in error.message
    resolve(GenerationRequest(model="tiny", continuation=CLIP, duration=28.0), no_long,
            job_id="fits")  # included, 28 s is the whole output: within the window


def test_a_clip_travels_by_reference_and_comes_back_whole(tmp_path: Path) -> None:
    storage = StorageSettings(url=(tmp_path / "store").as_uri())
    settings = Settings(storage=storage)
    spec = resolve(GenerationRequest(model="tiny", continuation=CLIP, melody=None, duration=6.0),
                   settings, job_id="ref")
    sent = by_reference(spec, storage)
    ref = sent.continuation
    assert ref is not None and ref.owned and ref.uri is not None and ref.data_b64 is None
    assert ref.uri.startswith((tmp_path / "store" / "inputs").as_uri())
    folder = tmp_path / "job"
    folder.mkdir()
    path, info = fetch_input(ref, settings, folder, "continuation")
    assert path.read_bytes() == CLIP and info.duration_s == pytest.approx(4.0)
    # The worker applies the producer's span rules to what it fetched.
    with pytest.raises(InvalidRequest) as past:
        continuation_span(start_s=0, end_s=5.0, clip_s=info.duration_s, window_s=30,
                          duration_s=6.0, included=True)
    assert past.value.field == "continuation_end"


@pytest.mark.parametrize(("uri", "rule"), [
    ("s3://someone-else/clip.wav", "refused"),
    ("https://cdn.example.com/clip.wav", "refused"),  # not in storage.melody_url_hosts now
])
def test_a_clip_the_worker_cannot_fetch_is_input_unavailable(tmp_path: Path, uri: str,
                                                             rule: str) -> None:
    settings = Settings(storage=StorageSettings(url="s3://our-bucket/results"))
    with pytest.raises(InputUnavailable) as refused:
        fetch_input(MelodyInput(uri=uri), settings, tmp_path, "continuation")
    assert refused.value.field == "continuation" and refused.value.details["rule"] == rule
    assert refused.value.code == "input_unavailable"


def test_a_missing_stored_clip_is_input_unavailable(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "inputs").mkdir(parents=True)
    settings = Settings(storage=StorageSettings(url=store.as_uri()))
    ref = MelodyInput(uri=(store / "inputs" / "gone.wav").as_uri(), owned=True)
    with pytest.raises(InputUnavailable) as refused:
        fetch_input(ref, settings, tmp_path, "continuation")
    assert refused.value.field == "continuation" and refused.value.details["rule"] == "missing"


def test_an_uploaded_clip_is_deleted_when_its_job_ends(tmp_path: Path) -> None:
    storage = StorageSettings(url=(tmp_path / "store").as_uri(), temp_dir=str(tmp_path / "tmp"))
    settings = Settings(storage=storage)
    spec = by_reference(resolve(GenerationRequest(model="tiny", continuation=CLIP, duration=6.0),
                                settings, job_id="ends"), storage)
    assert spec.continuation is not None and spec.continuation.uri is not None
    uploaded = Path(spec.continuation.uri.removeprefix("file://"))
    assert uploaded.read_bytes() == CLIP
    job_ended(make_celery(settings), spec.model_dump(mode="json"), FinalStatus.SUCCEEDED)
    assert not uploaded.exists()


def test_time_limits_count_a_clip_left_out_of_the_output() -> None:
    def spec(**fields: Any) -> JobSpec:
        return resolve(GenerationRequest(model="tiny", duration=5.0, **fields), Settings(),
                       job_id="t")

    assert generated_s(spec(prompt="x"), 30.0) == 5.0
    assert generated_s(spec(continuation=CLIP), 30.0) == 5.0  # included: duration is the whole
    assert generated_s(spec(continuation=CLIP, continuation_start=1.0, continuation_end=3.5,
                            continuation_included=False), 30.0) == 7.5
    # By URI with no end the span is only known to the worker: the most a window allows.
    by_uri = JobSpec.model_validate({**spec(prompt="x").model_dump(),
                                     "continuation": {"uri": "s3://b/clip.wav"},
                                     "continuation_included": False})
    assert generated_s(by_uri, 30.0) == 5.0 + 29.0


def test_the_cli_passes_a_continuation_and_its_span_on(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    clip = tmp_path / "clip.wav"
    clip.write_bytes(CLIP)
    runner = CliRunner()
    # Refused before anything is queued, naming the request's field.
    span = runner.invoke(cli_app, ["generate", "--continuation", str(clip), "--continuation-start",
                                   "3", "--continuation-end", "2"])
    assert span.exit_code != 0 and "continuation_end" in span.output
    past = runner.invoke(cli_app, ["generate", "--model", "tiny", "--continuation", str(clip),
                                   "--continuation-end", "9", "--duration", "12"])
    assert past.exit_code != 0 and "continuation_end" in past.output, past.output
    alone = runner.invoke(cli_app, ["generate", "--continuation-end", "2"])
    assert alone.exit_code != 0 and "[prompt]" in alone.output


def test_a_job_without_a_continuation_crosses_the_broker_as_before() -> None:
    plain = resolve(GenerationRequest(prompt="x", model="tiny", duration=1.0), Settings(),
                    job_id="w")
    sent = wire_form(plain)
    assert not SPEC_FIELDS & set(sent)  # a worker from before continuations still decodes it
    assert JobSpec.model_validate(sent) == plain
    continued = resolve(GenerationRequest(model="tiny", continuation=CLIP, duration=6.0,
                                          continuation_included=False), Settings(), job_id="c")
    assert JobSpec.model_validate(wire_form(continued)) == continued


def test_an_end_at_the_clips_end_survives_the_workers_resampled_length() -> None:
    # ffprobe said 4.0 s; decoded and resampled, the worker counts a sample less.
    span = continuation_span(start_s=1.0, end_s=4.0, clip_s=4.0 - 1 / 32000, window_s=30,
                             duration_s=2.0, included=False)
    assert span.end_s == pytest.approx(4.0 - 1 / 32000) and span.total_s(2.0) < 5.0
    with pytest.raises(InvalidRequest) as past:
        continuation_span(start_s=None, end_s=4.1, clip_s=4.0, window_s=30, duration_s=2.0,
                          included=False)
    assert past.value.field == "continuation_end"
