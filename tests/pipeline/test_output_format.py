"""One output-format table for producer and worker (issue 8, defect 1).

``resolve()`` used to accept requests the worker's check refused only after generating (mp3 at
96 kHz, a peak target of -65 dBFS): GPU time spent, then a failed job. Now both sides build the
same ``OutputSpec`` from ``pipeline.contract.output_format``; these tests hold the producer to refusing,
with the request's field named, everything the worker would refuse.
"""

from __future__ import annotations

import math
from typing import Any, get_args

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.client.resolve import resolve
from pipeline.config import load_settings
from pipeline.config.schema import Settings
from pipeline.contract.jobs import GenerationRequest, JobSpec, invalid_request_from
from pipeline.contract.output_format import (
    BIT_DEPTHS,
    FORMATS,
    MP3_BITRATES,
    NORMALIZATIONS,
    SAMPLE_RATES,
    TARGET_RANGES,
    FormatName,
    OutputSpec,
    check_output_spec,
)
from pipeline.errors import InvalidRequest, PipelineError, SettingsError, UnsupportedOption

OUTPUT_FIELDS = {"format", "sample_rate", "channels", "bit_depth", "normalization",
                 "loudness_target"}
BASE: dict[str, Any] = {"prompt": "warm pads", "duration": 1.0}
# Audio defaults a deployment may choose; each is a renderable combination of its own.
AUDIO_VARIANTS: list[dict[str, Any]] = [
    {},  # the shipped defaults: wav, 32000 Hz, 16 bits, mono, lufs -14
    {"audio.format": "mp3", "audio.sample_rate": 44100, "audio.normalization": "peak",
     "audio.channels": 2, "audio.mp3_bitrate": "320k"},
    {"audio.format": "flac", "audio.sample_rate": 48000, "audio.bit_depth": 24,
     "audio.normalization": "none"},
    {"audio.format": "opus", "audio.sample_rate": 48000, "audio.normalization": "rms",
     "audio.rms_target_dbfs": -18.0},
]


def _load(tmp_path_factory: pytest.TempPathFactory, audio: dict[str, Any]) -> Settings:
    return load_settings("development", cwd=tmp_path_factory.mktemp("output-format"),
                         overrides={"model.preset": "tiny", **audio})


@pytest.fixture(scope="module")
def deployments(tmp_path_factory: pytest.TempPathFactory) -> list[Settings]:
    return [_load(tmp_path_factory, audio) for audio in AUDIO_VARIANTS]


@pytest.fixture(scope="module")
def defaults(deployments: list[Settings]) -> Settings:
    return deployments[0]


# --- the regressions: refused by resolve(), before anything is queued -----------------------

@pytest.mark.parametrize(("options", "error", "field"), [
    ({"format": "mp3", "sample_rate": 96000}, UnsupportedOption, "sample_rate"),
    ({"format": "mp3", "sample_rate": 88200}, UnsupportedOption, "sample_rate"),
    ({"normalization": "peak", "loudness_target": -65.0}, InvalidRequest, "loudness_target"),
    ({"normalization": "rms", "loudness_target": -60.5}, InvalidRequest, "loudness_target"),
    ({"normalization": "lufs", "loudness_target": -3.0}, InvalidRequest, "loudness_target"),
    ({"normalization": "none", "loudness_target": -14.0}, InvalidRequest, "loudness_target"),
    ({"format": "opus", "sample_rate": 44100}, UnsupportedOption, "sample_rate"),
    ({"format": "opus"}, UnsupportedOption, "sample_rate"),  # the default 32000 Hz
    ({"format": "flac", "bit_depth": 8}, UnsupportedOption, "bit_depth"),
    ({"format": "flac", "bit_depth": 32}, UnsupportedOption, "bit_depth"),
    ({"format": "mp3", "bit_depth": 16}, UnsupportedOption, "bit_depth"),
    ({"format": "ogg", "bit_depth": 24}, UnsupportedOption, "bit_depth"),
])
def test_resolve_refuses_what_the_worker_cannot_render(defaults: Settings, options: dict[str, Any],
                                                       error: type[PipelineError],
                                                       field: str) -> None:
    with pytest.raises(error) as refused:
        resolve(GenerationRequest(**BASE, **options), defaults, job_id="j1")
    assert refused.value.field == field and not refused.value.retryable


@pytest.mark.parametrize(("options", "bit_depth"), [
    ({"format": "wav", "bit_depth": 8}, 8), ({"format": "wav", "bit_depth": 32}, 32),
    ({"format": "flac", "bit_depth": 24}, 24), ({"format": "flac"}, 16),
    ({"format": "mp3"}, None),  # the deployment's 16-bit default is for lossless formats only
    ({"format": "opus", "sample_rate": 48000}, None),
])
def test_depth_rules_for_accepted_requests(defaults: Settings, options: dict[str, Any],
                                           bit_depth: int | None) -> None:
    output = resolve(GenerationRequest(**BASE, **options), defaults, job_id="j1").output
    assert output.bit_depth == bit_depth and output.effective_bit_depth == bit_depth


def test_a_spec_decoded_on_the_worker_with_a_bad_output_is_refused(defaults: Settings) -> None:
    payload = resolve(GenerationRequest(**BASE), defaults, job_id="j1").model_dump(mode="json")
    payload["output"] |= {"format": "mp3", "sample_rate": 96000, "bit_depth": None}
    with pytest.raises(ValidationError) as refused:
        JobSpec.model_validate(payload)
    [problem] = refused.value.errors()
    assert (problem["loc"], problem["type"]) == (("output", "sample_rate"), "unsupported_option")
    # What the worker's task makes of it (workers/tasks.py _decode): a typed, permanent refusal.
    typed = invalid_request_from(refused.value, "spec.")
    assert typed.field == "spec.output.sample_rate" and not typed.retryable


def test_every_rate_and_depth_of_the_table_is_a_request_value() -> None:
    # The request's allowed values are the table's: no rate the worker writes is refused by the
    # request type, and none it cannot write is offered.
    assert set(FORMATS) == set(get_args(FormatName))
    assert set(SAMPLE_RATES) == {r for info in FORMATS.values() for r in info.sample_rates}
    assert set(BIT_DEPTHS) == {d for info in FORMATS.values() for d in info.bit_depths}
    for rate in SAMPLE_RATES:
        assert GenerationRequest(**BASE, sample_rate=rate).sample_rate == rate
    with pytest.raises(InvalidRequest) as refused:
        GenerationRequest(**BASE, sample_rate=44000)
    assert refused.value.field == "sample_rate"


@pytest.mark.parametrize(("audio", "path"), [
    ({"audio.format": "opus"}, "audio"),  # opus at the default 32000 Hz
    ({"audio.format": "flac", "audio.bit_depth": 8}, "audio"),
    ({"audio.format": "mp3", "audio.sample_rate": 96000}, "audio"),
    ({"audio.mp3_bitrate": "500k"}, "audio.mp3_bitrate"),  # refused even with wav the default
    ({"audio.peak_target_dbfs": -65.0}, "audio.peak_target_dbfs"),
])
def test_audio_defaults_must_be_renderable(tmp_path_factory: pytest.TempPathFactory,
                                           audio: dict[str, Any], path: str) -> None:
    with pytest.raises(SettingsError) as refused:
        _load(tmp_path_factory, audio)
    assert path in [problem["path"] for problem in refused.value.details]


# --- the property: whatever resolve() accepts, the worker renders ----------------------------

def _maybe_bad(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
    return st.one_of(good, good, bad)  # mostly values of the table, sometimes anything


TARGETS = st.one_of(
    st.floats(min_value=-80.0, max_value=5.0, allow_nan=False),
    # The edges of every range, and just past them.
    st.sampled_from(sorted({edge + nudge for low, high in TARGET_RANGES.values()
                            for edge in (low, high) for nudge in (-1e-6, 0.0, 1e-6)})))
OPTIONS = st.fixed_dictionaries({}, optional={
    "format": _maybe_bad(st.sampled_from(sorted(FORMATS)), st.text(max_size=5)),
    "sample_rate": _maybe_bad(st.sampled_from(SAMPLE_RATES), st.integers(0, 200_000)),
    "channels": _maybe_bad(st.sampled_from([1, 2]), st.integers(-1, 8)),
    "bit_depth": _maybe_bad(st.sampled_from(BIT_DEPTHS), st.integers(0, 64)),
    "normalization": _maybe_bad(st.sampled_from(NORMALIZATIONS), st.text(max_size=5)),
    "loudness_target": TARGETS,
})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=OPTIONS, which=st.integers(0, len(AUDIO_VARIANTS) - 1))
def test_every_accepted_request_passes_the_worker_check(deployments: list[Settings],
                                                        options: dict[str, Any],
                                                        which: int) -> None:
    from workers.audio.formats import check_output_spec as worker_check  # what render() runs

    deployment = deployments[which]
    try:
        spec = resolve(GenerationRequest(**BASE, **options), deployment, job_id="j1")
    except (InvalidRequest, UnsupportedOption) as refused:
        # Only output options vary here, so only one of them can be the reason.
        assert refused.field in OUTPUT_FIELDS, refused
        return
    worker_check(spec.output)
    check_output_spec(spec.output)
    assert spec.output.mp3_bitrate in MP3_BITRATES
    # What crosses the broker decodes to the same spec on the worker.
    assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec
    # And the request's own choices were kept, not silently replaced by defaults.
    for name in OUTPUT_FIELDS - {"loudness_target"}:
        if name in options:
            assert getattr(spec.output, name) == options[name]
    if "loudness_target" in options:
        assert spec.output.target is not None
        assert math.isclose(spec.output.target, options["loudness_target"])


@pytest.mark.parametrize(("options", "error", "field"), [
    ({"format": "opus", "sample_rate": 44100}, UnsupportedOption, "sample_rate"),
    ({"normalization": "peak", "loudness_target": -65.0}, InvalidRequest, "loudness_target"),
])
def test_an_output_spec_cannot_be_built_unrenderable(options: dict[str, Any],
                                                     error: type[PipelineError],
                                                     field: str) -> None:
    with pytest.raises(ValidationError) as built:
        OutputSpec(**options)
    [problem] = built.value.errors()
    assert (problem["loc"], problem["type"]) == ((field,), error.code)
    with pytest.raises(error) as checked:  # the check itself raises the typed error
        check_output_spec(OutputSpec.model_construct(**options))
    assert checked.value.field == field
