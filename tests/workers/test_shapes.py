"""Random-weight MusicGen models with the real shapes (workers/runtime/shapes.py).

Full-depth sizes are checked by arithmetic and on torch's meta device (shapes only, no memory,
no initialisation); the one model really built is small cut to two decoder layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import MusicgenForCausalLM, MusicgenForConditionalGeneration

from pipeline.errors import UnsupportedOption
from workers.runtime import GenerationItem, generate
from workers.runtime.loaded import LoadedModel
from workers.runtime.shapes import SHAPES, decoder_parameters, musicgen_config, random_loaded


@pytest.fixture(scope="module")
def small2() -> LoadedModel:
    return random_loaded("small", layers=2, text_layers=1)


@pytest.mark.parametrize("name", ["small", "medium", "large"])
def test_the_decoder_arithmetic_is_what_transformers_builds_at_full_depth(name: str) -> None:
    with torch.device("meta"):  # parameter shapes only: large would be 13 GB of float32
        decoder = MusicgenForCausalLM(musicgen_config(name).decoder)
    assert sum(p.numel() for p in decoder.parameters()) == decoder_parameters(SHAPES[name])


def test_full_size_small_has_the_published_parameter_count() -> None:
    with torch.device("meta"):
        model = MusicgenForConditionalGeneration(musicgen_config("small"))
    # The hub lists facebook/musicgen-small at 591M tensors' worth: decoder, T5-base encoder,
    # EnCodec and the projection. Its file also holds ~4M of buffers (EnCodec's codebooks, the
    # decoder's position table) that are not parameters, hence 1% rather than exact.
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(591e6, rel=0.01)
    # audiocraft calls its largest LM 3.3B; the shape gives 3.26B.
    assert decoder_parameters(SHAPES["large"]) == pytest.approx(3.3e9, rel=0.02)


def test_small_cut_to_two_layers_keeps_the_real_widths_and_audio_facts(small2: LoadedModel) -> None:
    decoder = small2.model.decoder.config
    assert (decoder.num_hidden_layers, decoder.hidden_size, decoder.num_attention_heads,
            decoder.ffn_dim) == (2, 1024, 16, 4096)
    assert small2.model.config.text_encoder.num_layers == 1
    assert small2.model.config.text_encoder.d_model == 768
    assert sum(p.numel() for p in small2.model.decoder.parameters()) == decoder_parameters(
        SHAPES["small"], layers=2)
    assert (small2.sampling_rate, small2.frame_rate, small2.samples_per_frame) == (32_000, 50.0, 640)
    assert (small2.num_codebooks, small2.max_duration_s, small2.is_melody) == (4, 30.0, False)
    assert (small2.device, small2.dtype, small2.source) == ("cpu", torch.float32, "random-small@2")


def test_it_generates_through_the_runtime(small2: LoadedModel) -> None:
    items = [GenerationItem(prompt="calm piano", duration_s=0.1, seed=3),
             GenerationItem(prompt="loud drums", duration_s=0.1, seed=4)]
    first, second = generate(small2, items)
    assert first.samples.shape == second.samples.shape == (1, 3200)  # 5 frames of 640 samples
    assert np.isfinite(first.samples).all() and np.abs(first.samples).max() > 0
    assert not np.array_equal(first.samples, second.samples)
    # The same seed gives the same tokens alone as in a batch; EnCodec's batched convolutions
    # may round the samples differently in the last bit.
    alone = generate(small2, items[:1])[0]
    np.testing.assert_allclose(alone.samples, first.samples, atol=1e-5)


def test_the_seed_decides_the_weights() -> None:
    def weights(seed: int) -> torch.Tensor:
        loaded = random_loaded("small", layers=1, text_layers=1, seed=seed)
        return loaded.model.decoder.model.decoder.layers[0].fc1.weight.detach().clone()

    state = torch.random.get_rng_state()
    assert torch.equal(weights(0), weights(0))
    assert not torch.equal(weights(0), weights(1))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's stream is untouched


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"name": "huge"}, "model"),
    ({"name": "small", "layers": 0}, "layers"),
    ({"name": "medium", "layers": 49}, "layers"),
    ({"name": "large", "text_layers": 13}, "text_layers"),
])
def test_bad_arguments_are_refused_with_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(UnsupportedOption) as raised:
        random_loaded(**kwargs)  # type: ignore[arg-type]
    assert raised.value.field == field
