"""The job contract under hostile input: a model name is never a path, every value that crosses
the broker is validated where the spec is built and again where a worker decodes it, and every
refusal is a typed error naming the request's own field (issue 8: A, C, D and item 7)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from pipeline.client.resolve import resolve
from pipeline.config import load_settings
from pipeline.config.presets import known_presets, model_settings_for
from pipeline.config.schema import Settings
from pipeline.contract.jobs import GenerationRequest, JobSpec, queue_for
from pipeline.errors import InvalidRequest, ModelNotFound, PipelineError


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return load_settings("development", cwd=tmp_path_factory.mktemp("contract"),
                         overrides={"model.preset": "tiny"})


def _refusal(settings: Settings, request: Any) -> PipelineError:
    with pytest.raises(PipelineError) as refused:
        resolve(request, settings, job_id="j1")
    return refused.value


# --- A: the model is a closed set, looked up, never joined into a path ----------------------

@pytest.mark.parametrize("name", [
    "../settings", "../profiles/high_volume", "models/tiny", "/etc/passwd",
    str(Path(__file__).resolve().parents[2] / "settings" / "settings"),  # an absolute path to a real .toml
    "tiny\x00", "x" * 300, "TINY", "tiny ",
])
def test_a_model_that_is_not_a_known_preset_is_refused(settings: Settings, name: str) -> None:
    try:
        request = GenerationRequest(prompt="pads", duration=1.0, model=name)
    except InvalidRequest as exc:  # too long or a control character: refused by the request itself
        assert exc.field == "model"
        return
    error = _refusal(settings, request)
    assert isinstance(error, ModelNotFound), error
    assert error.field == "model"
    assert error.details["known_presets"] == list(known_presets())


def test_known_presets_are_the_shipped_files_and_their_queues() -> None:
    shipped = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "settings" / "models")
                     .glob("*.toml"))
    assert list(known_presets()) == shipped
    assert {queue_for(name) for name in known_presets()} == {f"musicgen.{n}" for n in shipped}


def test_every_preset_validates_like_the_active_one(settings: Settings) -> None:
    for name in known_presets():
        model = model_settings_for(settings, name)
        assert model.preset == name
        assert 0 < model.max_duration <= 30.0


# --- C: values that skipped validation never reach the queue -----------------------------

@pytest.mark.parametrize(("update", "field"), [
    ({"temperature": 99.0}, "temperature"),
    ({"top_p": math.nan}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"guidance_scale": math.inf}, "guidance_scale"),
    ({"seed": -1}, "seed"),
    ({"format": "exe"}, "format"),
    ({"prompt": "\x00\x00\x00"}, "prompt"),
    ({"priority": 42}, "priority"),
    ({"user_id": "alice\x00"}, "user_id"),
    ({"model": "../settings"}, "model"),
    ({"duration": -5.0}, "duration"),
])
def test_a_request_altered_after_validation_is_checked_again(settings: Settings,
                                                            update: dict[str, Any],
                                                            field: str) -> None:
    # model_copy(update=...) skips pydantic validation: resolve() must not trust the object.
    request = GenerationRequest(prompt="pads", duration=1.0).model_copy(update=update)
    error = _refusal(settings, request)
    assert error.code in ("invalid_request", "unsupported_option", "model_not_found")
    assert error.field == field, error


def _good_spec(settings: Settings) -> dict[str, Any]:
    return resolve(GenerationRequest(prompt="pads", duration=1.0, seed=3), settings,
                   job_id="j1").model_dump(mode="json")


@pytest.mark.parametrize(("path", "value"), [
    (("temperature",), 99.0), (("top_p",), "NaN"), (("seed",), -1), (("seed",), 2**32),
    (("priority",), 42), (("prompt",), "\x00\x00"), (("prompt",), "  padded  "),
    (("prompt",), "x" * 10_001), (("user_id",), "a\nb"), (("job_id",), "../x"),
    (("model",), "../settings"), (("duration",), 0), (("duration",), 1e9),
    (("enqueued_at",), "Infinity"), (("output", "format"), "exe"),
    (("melody",), {"path": "relative.wav"}), (("melody",), {"data_b64": "%%%"}),
    (("melody",), {"data_b64": "AAAA", "suffix": "/../../etc/x"}),
    (("melody",), {"path": "/a.wav", "data_b64": "AAAA"}),
])
def test_the_worker_decode_refuses_what_the_producer_would(settings: Settings,
                                                           path: tuple[str, ...],
                                                           value: Any) -> None:
    payload = _good_spec(settings)
    JobSpec.model_validate(payload)  # the untouched spec decodes
    target = payload
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValueError):  # pydantic's ValidationError: the task turns it typed
        JobSpec.model_validate(payload)


# --- D: every failure is typed and names the request's own field -------------------------

@pytest.mark.parametrize("melody", [5, 1.5, ["a"], {"path": "x"}, object()])
def test_a_wrongly_typed_melody_names_the_melody_field(melody: Any) -> None:
    with pytest.raises(InvalidRequest) as refused:
        GenerationRequest(prompt="pads", melody=melody)
    assert refused.value.field == "melody"
    assert all(p["field"] == "melody" for p in refused.value.details)


@pytest.mark.parametrize("melody", ["a" * 5000, "/tmp/" + "b" * 300 + ".wav", "/tmp/a\x00.wav"])
def test_an_unusable_melody_path_is_refused_without_touching_the_disk(melody: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        GenerationRequest(prompt="pads", melody=Path(melody))
    assert refused.value.field == "melody"


@pytest.mark.parametrize("user_id", ["a\x00b", "tab\tbed", "\u200bzero-width", "bell\x07", ""])
def test_ids_refuse_control_and_invisible_characters(user_id: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        GenerationRequest(prompt="pads", user_id=user_id)
    assert refused.value.field == "user_id"


@pytest.mark.parametrize("request_like", [None, "pads", {"prompt": "pads"}, 42])
def test_resolve_refuses_what_is_not_a_request(settings: Settings, request_like: Any) -> None:
    error = _refusal(settings, request_like)
    assert isinstance(error, InvalidRequest)
    assert error.field == "request"


def test_ordinary_ids_and_paths_still_pass(settings: Settings, tmp_path: Path) -> None:
    for user in ("anonymous", "user-42", "alice@example.com", "Zoë", "团队:7"):
        spec = resolve(GenerationRequest(prompt="pads", duration=1.0, user_id=user), settings,
                       job_id="j1")
        assert JobSpec.model_validate(spec.model_dump(mode="json")) == spec
