"""Thousands of malformed requests: each is refused with a typed error before anything is
queued, and none reaches a worker (the queue and the id claims stay empty).

Three ways in, each of which once let something through: a request built with bad values, a
valid request altered afterwards (``model_copy(update=...)`` skips validation), and objects
that are not requests at all. Every refusal names one of the request's own fields."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeline
from pipeline import GenerationRequest
from pipeline.config.presets import known_presets
from pipeline.contract.output_format import (
    BIT_DEPTHS,
    CHANNELS,
    FORMATS,
    NORMALIZATIONS,
    SAMPLE_RATES,
)
from pipeline.errors import InvalidRequest, ModelNotFound, PipelineError, UnsupportedOption
from pipeline.infra.keys import queue_list_keys
from pipeline.quota.configured import prepare_database

from .conftest import REPO, base_env

pytestmark = pytest.mark.integration

VALID: dict[str, Any] = {"prompt": "ambient pads", "duration": 1.0, "model": "tiny"}
REPO_SETTINGS = REPO / "settings"

# One bad value per field; a request gets one or more of them on top of a valid base.
BAD: dict[str, st.SearchStrategy[Any]] = {
    "prompt": st.one_of(st.just(""), st.text(alphabet="\x00\x07\x1b \t\n\u200b", min_size=1),
                        st.text(min_size=801, max_size=900), st.integers(), st.none(), st.lists(st.text())),
    "duration": st.one_of(st.floats(max_value=0.0), st.floats(min_value=30.0001), st.just(math.nan),
                          st.just(math.inf), st.text(min_size=1).filter(lambda s: not _is_number(s))),
    "temperature": st.one_of(st.floats(max_value=0.0999), st.floats(min_value=2.0001), st.just(math.nan)),
    "top_k": st.one_of(st.integers(max_value=-1), st.integers(min_value=2049)),
    "top_p": st.one_of(st.floats(max_value=-0.0001), st.floats(min_value=1.0001)),
    "guidance_scale": st.one_of(st.floats(max_value=-0.0001), st.floats(min_value=20.0001)),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32)),
    "format": st.text(min_size=1, max_size=8).filter(lambda s: s not in FORMATS),
    "sample_rate": st.integers().filter(lambda r: r not in SAMPLE_RATES),
    "channels": st.integers().filter(lambda c: c not in CHANNELS),
    "bit_depth": st.integers().filter(lambda b: b not in BIT_DEPTHS),
    "normalization": st.text(min_size=1, max_size=6).filter(lambda s: s not in NORMALIZATIONS),
    "loudness_target": st.one_of(st.floats(min_value=0.0001), st.floats(max_value=-70.0001)),
    "melody": st.one_of(st.binary(min_size=0, max_size=64), st.just(Path("/nonexistent/melody.wav")),
                        st.just(Path("/tmp/" + "m" * 300 + ".wav")), st.text(min_size=4097, max_size=4100),
                        st.integers(), st.floats(), st.lists(st.integers(), max_size=2)),
    "user_id": st.one_of(st.just(""), st.text(min_size=129, max_size=140),
                         st.text(min_size=1, max_size=20).map(lambda s: s + "\x00"),
                         st.sampled_from(["a\nb", "\u200b", "tab\t", "\x1b[31m"])),
    "priority": st.one_of(st.integers(max_value=-1), st.integers(min_value=10)),
    "job_id": st.one_of(st.just(""), st.text(min_size=1).filter(lambda s: " " in s or "/" in s),
                        st.sampled_from(["a\x00", "../x", "x" * 129])),
    # Any text that is not a preset: paths, traversal, NUL bytes, names past 255 characters.
    "model": st.one_of(st.text(min_size=1, max_size=20), st.text(min_size=256, max_size=300),
                       st.sampled_from(["../settings", "../profiles/high_volume", "/etc/passwd",
                                        str(REPO_SETTINGS / "settings"), "models/tiny", "tiny\x00"]))
             .filter(lambda m: m not in known_presets()),
    "no_such_field": st.integers(),
}
# Valid each on its own, refused together: checked against the deployment, not the type.
BAD_COMBINATIONS = [
    {"format": "opus", "sample_rate": 44100},
    {"format": "mp3", "bit_depth": 24},
    {"format": "flac", "bit_depth": 8},
    {"format": "mp3", "sample_rate": 96000},  # the worker's encoder table refuses it
    {"normalization": "peak", "loudness_target": -65.0},  # past the peak range
    {"melody": Path("/etc/hostname")},  # a melody for a model that takes none
]
# What a caller may write onto a valid request object after validation (model_copy skips it).
ALTERED: dict[str, st.SearchStrategy[Any]] = {
    "temperature": st.one_of(st.floats(min_value=2.0001), st.just(math.nan), st.just(-1.0)),
    "top_p": st.one_of(st.just(math.nan), st.floats(min_value=1.0001)),
    "top_k": st.integers(max_value=-1),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32)),
    "format": st.text(min_size=1, max_size=6).filter(lambda s: s not in FORMATS),
    "prompt": st.text(alphabet="\x00\x01\x7f", min_size=1, max_size=10),
    "priority": st.one_of(st.integers(min_value=10), st.integers(max_value=-1)),
    "user_id": st.sampled_from(["a\x00b", "", "x" * 129]),
    "model": st.sampled_from(["../settings", "/etc/passwd", "x" * 300]),
    "duration": st.one_of(st.just(math.inf), st.floats(max_value=0.0)),
}
NOT_REQUESTS = st.one_of(st.none(), st.text(max_size=5), st.integers(),
                         st.fixed_dictionaries({"prompt": st.just("pads")}), st.just([VALID]))
FIELDS = set(GenerationRequest.model_fields) | {"request", "no_such_field"}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@pytest.fixture(scope="module")
def producer(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> pipeline.Producer:
    workdir = tmp_path_factory.mktemp("fuzz")
    mp = pytest.MonkeyPatch()
    for key, value in base_env(workdir, redis_url).items():
        if key.startswith("MUSICGEN_"):
            mp.setenv(key, value)
    try:
        settings = pipeline.load_settings(cwd=workdir)
        prepare_database(settings)  # the explicit set-up step a deployment runs once
        return pipeline.Producer(settings)
    finally:
        mp.undo()


def _queued(client: redis.Redis) -> int:
    return sum(client.llen(key) for key in queue_list_keys("musicgen.tiny"))


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(case=st.one_of(
    st.dictionaries(st.sampled_from(sorted(BAD)), st.nothing(), min_size=1, max_size=3)
      .flatmap(lambda keys: st.fixed_dictionaries({k: BAD[k] for k in keys}))
      .map(lambda bad: ("built", bad)),
    st.sampled_from(BAD_COMBINATIONS).map(lambda bad: ("built", bad)),
    st.dictionaries(st.sampled_from(sorted(ALTERED)), st.nothing(), min_size=1, max_size=2)
      .flatmap(lambda keys: st.fixed_dictionaries({k: ALTERED[k] for k in keys}))
      .map(lambda bad: ("altered", bad)),
    NOT_REQUESTS.map(lambda obj: ("not_a_request", obj))))
def test_every_malformed_request_is_refused_before_enqueue(producer: pipeline.Producer, redis_url: str,
                                                           case: tuple[str, Any]) -> None:
    kind, bad = case
    client = redis.Redis.from_url(redis_url)
    before_queue, before_claims = _queued(client), len(list(client.scan_iter("musicgen:job:*")))
    with pytest.raises(PipelineError) as refused:
        if kind == "built":
            producer.enqueue(GenerationRequest(**{**VALID, **bad}))
        elif kind == "altered":
            producer.enqueue(GenerationRequest(**VALID).model_copy(update=bad))
        else:
            producer.enqueue(bad)
    error = refused.value
    assert isinstance(error, (InvalidRequest, UnsupportedOption, ModelNotFound)), error
    assert error.code in ("invalid_request", "unsupported_option", "model_not_found")
    # The request's own field, never pydantic's internal path (melody.lax-or-strict[...]).
    assert error.field in FIELDS, f"field {error.field!r} for {kind} {bad!r}: {error}"
    if kind == "altered":
        assert error.field in bad, f"{bad!r} refused on {error.field!r}"
    assert _queued(client) == before_queue
    assert len(list(client.scan_iter("musicgen:job:*"))) == before_claims
    client.close()
