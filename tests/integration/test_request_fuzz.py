"""Thousands of malformed requests: each is refused with a typed error before anything is
queued, and none reaches a worker (the queue and the id claims stay empty)."""

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
from pipeline.errors import InvalidRequest, ModelNotFound, UnsupportedOption
from pipeline.keys import queue_list_keys

from .conftest import base_env

pytestmark = pytest.mark.integration

VALID: dict[str, Any] = {"prompt": "ambient pads", "duration": 1.0, "model": "tiny"}

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
    "format": st.text(min_size=1, max_size=8).filter(lambda s: s not in ("wav", "mp3", "flac", "ogg", "opus")),
    "sample_rate": st.integers().filter(lambda r: r not in (8000, 12000, 16000, 22050, 24000, 32000, 44100,
                                                             48000, 96000)),
    "channels": st.integers().filter(lambda c: c not in (1, 2)),
    "bit_depth": st.integers().filter(lambda b: b not in (8, 16, 24, 32)),
    "normalization": st.text(min_size=1, max_size=6).filter(lambda s: s not in ("none", "peak", "rms", "lufs")),
    "loudness_target": st.one_of(st.floats(min_value=0.0001), st.floats(max_value=-70.0001)),
    "melody": st.one_of(st.binary(min_size=0, max_size=64), st.just(Path("/nonexistent/melody.wav"))),
    "user_id": st.one_of(st.just(""), st.text(min_size=129, max_size=140)),
    "priority": st.one_of(st.integers(max_value=-1), st.integers(min_value=10)),
    "job_id": st.one_of(st.just(""), st.text(min_size=1).filter(lambda s: " " in s or "/" in s)),
    "model": st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20)
             .filter(lambda m: m not in ("tiny", "tiny-melody", "musicgen-small", "musicgen-medium",
                                         "musicgen-large", "musicgen-melody")),
    "no_such_field": st.integers(),
}
# Valid each on its own, refused together: checked against the deployment, not the type.
BAD_COMBINATIONS = [
    {"format": "opus", "sample_rate": 44100},
    {"format": "mp3", "bit_depth": 24},
    {"format": "flac", "bit_depth": 8},
    {"melody": Path("/etc/hostname")},  # a melody for a model that takes none
]


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
        return pipeline.Producer(pipeline.load_settings(cwd=workdir))
    finally:
        mp.undo()


def _queued(client: redis.Redis) -> int:
    return sum(client.llen(key) for key in queue_list_keys("musicgen.tiny"))


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(bad=st.one_of(
    st.dictionaries(st.sampled_from(sorted(BAD)), st.nothing(), min_size=1, max_size=3)
      .flatmap(lambda keys: st.fixed_dictionaries({k: BAD[k] for k in keys})),
    st.sampled_from(BAD_COMBINATIONS)))
def test_every_malformed_request_is_refused_before_enqueue(producer: pipeline.Producer, redis_url: str,
                                                           bad: dict[str, Any]) -> None:
    client = redis.Redis.from_url(redis_url)
    before_queue, before_claims = _queued(client), len(list(client.scan_iter("musicgen:job:*")))
    with pytest.raises((InvalidRequest, UnsupportedOption, ModelNotFound)) as refused:
        producer.enqueue(GenerationRequest(**{**VALID, **bad}))
    error = refused.value
    assert error.code in ("invalid_request", "unsupported_option", "model_not_found")
    assert error.field, f"no offending field named for {bad!r}: {error}"
    assert _queued(client) == before_queue
    assert len(list(client.scan_iter("musicgen:job:*"))) == before_claims
    client.close()
