"""Random-weight MusicGen models with the real shapes of facebook/musicgen-small, -medium, -large.

Built in code and in memory, nothing downloaded or saved (large is 3.3 B parameters): the
speed of such a model is the real checkpoint's speed, only its audio is noise. The benchmark
(``benchmarks/gpu.py``) and the decode engine's exactness tests run on them. ``layers`` and
``text_layers`` cut the decoder's and the text encoder's depth, so a CPU can run the real
widths in seconds.

``SHAPES`` is the one place the numbers live. The decoders are those of transformers'
``convert_musicgen_transformers.py`` (FFN 4x the width); the text encoder is T5-base (the
checkpoints ship ``t5-base``'s encoder); the audio codec is facebook/encodec_32khz as its
conversion script configures it. The generation window is the checkpoints' 1500 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    EncodecConfig,
    MusicgenConfig,
    MusicgenDecoderConfig,
    MusicgenForConditionalGeneration,
    T5Config,
)

from pipeline.errors import UnsupportedOption
from workers.runtime.device import resolve_device, resolve_dtype
from workers.runtime.loaded import LoadedModel, loaded_model
from workers.runtime.tiny import fill_codebooks, generation_config, make_processor


@dataclass(frozen=True)
class DecoderShape:
    """One MusicGen decoder's size: depth, width, heads and feed-forward width."""

    layers: int
    hidden: int
    heads: int
    ffn: int


SHAPES: dict[str, DecoderShape] = {
    "small": DecoderShape(layers=24, hidden=1024, heads=16, ffn=4096),
    "medium": DecoderShape(layers=48, hidden=1536, heads=24, ffn=6144),
    "large": DecoderShape(layers=48, hidden=2048, heads=32, ffn=8192),
}

NUM_CODEBOOKS = 4
CODEBOOK_SIZE = 2048  # also the decoder's pad/bos id, so its embeddings hold 2049 rows
MAX_POSITIONS = 2048  # the decoder's sinusoidal position table; the window is 1500 of them

# T5-base: what every MusicGen checkpoint encodes its prompt with (relu FFN, 32 relative buckets).
T5_BASE: dict[str, Any] = {
    "vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12,
    "num_heads": 12, "feed_forward_proj": "relu", "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
}

# facebook/encodec_32khz: 640 samples a frame (8*5*4*4) at 32 kHz is 50 Hz, 2.2 kbps with 11-bit
# codebooks is 4 codebooks; a 128-wide latent, two LSTM layers, 64 base filters.
ENCODEC_32KHZ: dict[str, Any] = {
    "sampling_rate": 32_000, "audio_channels": 1, "upsampling_ratios": [8, 5, 4, 4],
    "target_bandwidths": [2.2], "codebook_size": CODEBOOK_SIZE, "num_filters": 64,
    "hidden_size": 128, "codebook_dim": 128, "num_lstm_layers": 2, "use_causal_conv": False,
    "use_conv_shortcut": False, "norm_type": "weight_norm", "pad_mode": "reflect",
    "compress": 2, "normalize": False,
}


def shape_name(name: str) -> str:
    """``name`` as ``SHAPES`` spells it: small, musicgen-small and facebook/musicgen-small alike."""
    key = name.removeprefix("facebook/").removeprefix("musicgen-")
    if key not in SHAPES:
        raise UnsupportedOption(f"no MusicGen shape {name!r}; one of {', '.join(SHAPES)}",
                                field="model")
    return key


def decoder_parameters(shape: DecoderShape, layers: int | None = None) -> int:
    """The decoder's parameter count, by arithmetic on its shape (no model built).

    Per layer: self- and cross-attention (q, k, v, out: 4 h*h each, no biases), the FFN
    (h*ffn twice, no biases) and three layer norms (2h each). Around them: one embedding per
    codebook (2049 ids), the final layer norm and one LM head per codebook.
    """
    h, depth = shape.hidden, shape.layers if layers is None else layers
    per_layer = 8 * h * h + 2 * h * shape.ffn + 3 * 2 * h
    embeddings = NUM_CODEBOOKS * (CODEBOOK_SIZE + 1) * h
    heads = NUM_CODEBOOKS * h * CODEBOOK_SIZE
    return embeddings + depth * per_layer + 2 * h + heads


def musicgen_config(name: str, *, layers: int | None = None,
                    text_layers: int | None = None) -> MusicgenConfig:
    """The full MusicGen config of ``name``, its decoder (and text encoder) cut to ``layers``
    (``text_layers``) when given."""
    shape = SHAPES[shape_name(name)]
    depth = _depth(layers, shape.layers, "layers")
    text = T5Config(**{**T5_BASE, "num_layers": _depth(text_layers, 12, "text_layers")})
    decoder = MusicgenDecoderConfig(
        vocab_size=CODEBOOK_SIZE, max_position_embeddings=MAX_POSITIONS,
        num_hidden_layers=depth, num_attention_heads=shape.heads, hidden_size=shape.hidden,
        ffn_dim=shape.ffn, num_codebooks=NUM_CODEBOOKS, audio_channels=1,
        pad_token_id=CODEBOOK_SIZE, bos_token_id=CODEBOOK_SIZE, activation_function="gelu",
    )
    return MusicgenConfig(text_encoder=text, audio_encoder=EncodecConfig(**ENCODEC_32KHZ),
                          decoder=decoder)


def random_loaded(name: str, *, layers: int | None = None, text_layers: int | None = None,
                  device: str = "cpu", dtype: str = "float32", seed: int = 0) -> LoadedModel:
    """A random-weight MusicGen with ``name``'s shapes, built on ``device`` in ``dtype``.

    The same ``seed`` on the same device gives the same weights. The processor is the tiny
    checkpoints' (a hand-made T5 vocabulary: any ASCII prompt tokenizes), which is all a random
    text encoder needs.
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    processor = make_processor()
    config = musicgen_config(name, layers=layers, text_layers=text_layers)
    # Initialised where it will run and in its dtype: large would need 13 GB of float32 on the
    # host first otherwise, and its init would run at CPU speed. fork_rng keeps the caller's
    # random state as it was.
    forked = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=forked), torch.device(device):
        torch.manual_seed(seed)
        model = MusicgenForConditionalGeneration._from_config(  # type: ignore[no-untyped-call]
            config, dtype=torch_dtype)
        fill_codebooks(model)
    model.generation_config = generation_config()
    model.eval()
    depth = f"@{layers}" if layers is not None else ""
    return loaded_model(model, processor, source=f"random-{shape_name(name)}{depth}",
                        device=device, dtype=torch_dtype)


def _depth(asked: int | None, full: int, field: str) -> int:
    if asked is None:
        return full
    if not 1 <= asked <= full:
        raise UnsupportedOption(f"{field} must be between 1 and {full}, not {asked}", field=field)
    return asked
