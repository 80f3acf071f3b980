"""EnCodec decodes the rows that finish in the same step together, one call per length, and
each row's audio is what decoding it alone gives (issue 22, defect 5). Real tiny models, mono and
stereo; the audio compared with each job run alone in an engine of one row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.runtime import GeneratedAudio, GenerationItem, LoadedModel, load_model, make_tiny
from workers.runtime.engine import StaticEngine
from workers.runtime.engine import engine as engine_module

from .test_engine import assert_same_codes, decoded_rows, recorded_codes
from .test_engine_batching import steps_of

# Rows of one length decoded together differ from their decodes alone only by float rounding of
# the batched convolutions (~1e-7 measured); a different code moves the audio by ~1e-2.
BATCHED_VS_ALONE_MAX_DIFF = 1e-6

EQUAL = [GenerationItem("calm piano", 0.6, seed=1, temperature=0.0),
         GenerationItem("loud rock drums", 0.6, seed=2, top_k=50, guidance_scale=1.5),
         GenerationItem("jazz", 0.6, seed=3, top_p=0.9, guidance_scale=1.0)]
SHORTER = GenerationItem("ambient pads", 0.3, seed=4, temperature=0.0)


def run_to_end(engine: StaticEngine, late: tuple[int, GenerationItem] | None = None
               ) -> tuple[dict[str, tuple[GeneratedAudio, torch.Tensor]], list[int]]:
    """Step until every row is done, admitting ``late`` (steps from now, item) on the way:
    each job's audio and codes by prompt, and the rows each EnCodec call decoded."""
    admit_late = [] if late is None else [late]
    names = {row: engine._slots.get(row).item.prompt for row in engine._slots.active()}
    got: dict[str, tuple[GeneratedAudio, torch.Tensor]] = {}
    calls: list[int] = []
    steps = 0
    while engine.active() or admit_late:
        for after, item in list(admit_late):
            if steps == after:
                names[engine.admit(item, item.seed or 0)] = item.prompt
                admit_late.remove((after, item))
        with recorded_codes(engine.loaded) as seen:
            finished = engine.step()
        steps += 1
        calls += [len(part) for part in seen[::engine.loaded.audio_channels]]
        for (row, audio), codes in zip(finished, decoded_rows(seen, engine.loaded.audio_channels),
                                       strict=True):
            assert isinstance(audio, GeneratedAudio), audio
            got[names.pop(row)] = (audio, codes)
    return got, calls


def alone(loaded: LoadedModel, item: GenerationItem) -> tuple[GeneratedAudio, torch.Tensor]:
    engine = StaticEngine(loaded, max_rows=1)
    engine.admit(item, item.seed or 0)
    return run_to_end(engine)[0][item.prompt]


def assert_as_alone(got: tuple[GeneratedAudio, torch.Tensor],
                    want: tuple[GeneratedAudio, torch.Tensor]) -> None:
    assert_same_codes(got[1], want[1])
    assert got[0].samples.shape == want[0].samples.shape
    assert float(np.abs(got[0].samples - want[0].samples).max()) <= BATCHED_VS_ALONE_MAX_DIFF


@pytest.fixture(scope="module")
def stereo(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = make_tiny(tmp_path_factory.mktemp("stereo") / "tiny-stereo", stereo=True)
    return load_model(str(path), device="cpu", dtype="float32", offline=True)


@pytest.mark.parametrize("channels", [1, 2])
def test_rows_ending_together_are_decoded_in_one_call_per_length_as_each_alone(
        tiny_model: LoadedModel, stereo: LoadedModel, channels: int) -> None:
    loaded = tiny_model if channels == 1 else stereo
    engine = StaticEngine(loaded, max_rows=4)
    for item in EQUAL:
        engine.admit(item, item.seed or 0)
    # The shorter job joins late enough to end in the same step as the three equal ones.
    late = steps_of(loaded, EQUAL[0]) - steps_of(loaded, SHORTER)
    got, calls = run_to_end(engine, (late, SHORTER))
    assert sorted(calls) == [1, 3]  # one call for the three equal rows, one for the shorter
    for item in (*EQUAL, SHORTER):
        assert got[item.prompt][0].samples.shape == (channels, round(item.duration_s * 32000))
        assert_as_alone(got[item.prompt], alone(loaded, item))


def test_at_most_decode_rows_share_a_call(tiny_model: LoadedModel,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "DECODE_ROWS", 2)
    engine = StaticEngine(tiny_model, max_rows=3)
    for item in EQUAL:
        engine.admit(item, item.seed or 0)
    got, calls = run_to_end(engine)
    assert calls == [2, 1]
    for item in EQUAL:
        assert_as_alone(got[item.prompt], alone(tiny_model, item))
