"""The error tree as a caller meets it: every class importable from ``pipeline``, ``JobTimeout``
a ``TimeoutError`` that still crosses processes intact (pickle, and Celery's JSON exception
transport, which rebuilds an exception as ``cls(*args)``), and the request fingerprint that
tells an idempotent retry from a different request."""

from __future__ import annotations

import pickle
from pathlib import Path

from celery import Celery

import pipeline
from pipeline.contract.jobs import GenerationRequest, request_fingerprint
from pipeline.errors import JobTimeout, PipelineError, _all_subclasses


def test_every_error_class_is_importable_from_pipeline() -> None:
    # The caller's classes, those of the pipeline package; a worker's own subclasses (e.g. the
    # engine's EngineUnsupported) exist only where torch is, and are loaded when another test
    # of the same run imported workers.
    for cls in _all_subclasses(PipelineError):
        if not cls.__module__.startswith("pipeline"):
            continue
        assert getattr(pipeline, cls.__name__) is cls, cls.__name__
        assert cls.__name__ in pipeline.__all__


def test_job_timeout_is_a_timeout_error_that_crosses_processes_intact() -> None:
    err = JobTimeout("waited 5 s", "timeout", {"waited": 5})
    assert isinstance(err, TimeoutError) and isinstance(err, PipelineError)
    assert (err.errno, err.strerror) == (None, None)  # not OSError's reading of the arguments
    for copy in (pickle.loads(pickle.dumps(err)), PipelineError.from_dict(err.to_dict())):
        assert type(copy) is JobTimeout
        assert (copy.message, copy.field, copy.details) == ("waited 5 s", "timeout", {"waited": 5})
    backend = Celery(backend="cache+memory://").backend
    crossed = backend.exception_to_python(backend.prepare_exception(err, "json"))
    assert isinstance(crossed, JobTimeout) and crossed.details == {"waited": 5}


def test_the_fingerprint_compares_what_a_request_asks_for(tmp_path: Path) -> None:
    base = GenerationRequest(prompt="rain", duration=4, job_id="a", user_id="u1")
    same = GenerationRequest(prompt="  rain ", duration=4.0, seed=None, job_id="b", user_id="u2")
    assert request_fingerprint(base) == request_fingerprint(same)  # id, user, spacing, None
    assert request_fingerprint(base) != request_fingerprint(base.model_copy(update={"duration": 5}))
    one, two = tmp_path / "one.wav", tmp_path / "two.wav"
    one.write_bytes(b"RIFF-same")
    two.write_bytes(b"RIFF-same")
    # A melody counts by its content: a re-upload lands at a new path but is the same request.
    assert (request_fingerprint(base.model_copy(update={"melody": one}))
            == request_fingerprint(base.model_copy(update={"melody": two}))
            == request_fingerprint(base.model_copy(update={"melody": b"RIFF-same"})))
    two.write_bytes(b"RIFF-other")
    assert (request_fingerprint(base.model_copy(update={"melody": one}))
            != request_fingerprint(base.model_copy(update={"melody": two})))

