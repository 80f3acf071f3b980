"""make_tiny: a real-format, deterministic, tiny MusicGen checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import AutoConfig, AutoProcessor, FeatureExtractionMixin, MusicgenProcessor

from workers.runtime.tiny import make_tiny

CHECKPOINT_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", "processor_config.json", "README.md"}


@pytest.mark.parametrize("name", ["tiny", "tiny-melody"])
def test_writes_a_small_checkpoint_in_the_real_layout(tiny_models_dir: Path, name: str) -> None:
    folder = tiny_models_dir / name
    assert {p.name for p in folder.iterdir()} >= CHECKPOINT_FILES
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 10 * 1024 * 1024
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert "noise" in readme and "random" in readme


def test_audio_shapes_match_the_real_musicgen(tiny_path: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_path, local_files_only=True)
    assert config.model_type == "musicgen"
    assert config.audio_encoder.sampling_rate == 32000
    assert config.audio_encoder.hop_length == 640
    assert config.audio_encoder.frame_rate == 50
    assert config.audio_encoder.audio_channels == 1
    # EnCodec's quantizer count must equal the decoder's codebooks, or decoding fails.
    assert config.audio_encoder.num_quantizers == config.decoder.num_codebooks == 4


def test_generation_config_is_like_the_real_checkpoints(tiny_path: Path) -> None:
    saved = json.loads((tiny_path / "generation_config.json").read_text(encoding="utf-8"))
    assert saved["do_sample"] is True
    assert saved["guidance_scale"] == 3.0
    assert saved["max_length"] == 1500
    assert saved["decoder_start_token_id"] == saved["pad_token_id"] == 2048


def test_processor_loads_with_auto_processor_and_tokenizes_offline(tiny_path: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_path, local_files_only=True)
    assert isinstance(processor, MusicgenProcessor)
    tokenizer = processor.tokenizer
    ids = tokenizer("80s Synth-Pop, upbeat & happy!").input_ids
    assert tokenizer.unk_token_id not in ids
    assert ids[-1] == tokenizer.eos_token_id
    batch = processor(text=["calm piano", "a much longer prompt with drums"], padding=True,
                      return_tensors="pt")
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()


def test_melody_checkpoint_declares_the_melody_processor(tiny_melody_path: Path) -> None:
    config = AutoConfig.from_pretrained(tiny_melody_path, local_files_only=True)
    assert config.model_type == "musicgen_melody"
    assert (config.num_chroma, config.chroma_length) == (12, 235)
    features, _ = FeatureExtractionMixin.get_feature_extractor_dict(
        str(tiny_melody_path), local_files_only=True)
    assert features["feature_extractor_type"] == "MusicgenMelodyFeatureExtractor"
    assert features["sampling_rate"] == 32000
    processor = json.loads((tiny_melody_path / "processor_config.json").read_text(encoding="utf-8"))
    assert processor["processor_class"] == "MusicgenMelodyProcessor"


def test_same_seed_builds_the_same_weights(tmp_path: Path, tiny_path: Path) -> None:
    again = load_file(make_tiny(tmp_path / "again", seed=0) / "model.safetensors")
    other = load_file(make_tiny(tmp_path / "other", seed=1) / "model.safetensors")
    first = load_file(tiny_path / "model.safetensors")
    assert again.keys() == first.keys()
    assert all(again[k].equal(first[k]) for k in first)
    assert not all(other[k].equal(first[k]) for k in first)
