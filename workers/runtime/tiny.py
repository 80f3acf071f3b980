"""Build tiny, randomly initialised MusicGen checkpoints for tests and offline demos.

The checkpoints are written with ``save_pretrained`` in the same layout as
``facebook/musicgen-small`` and ``facebook/musicgen-melody`` (config.json, generation_config.json,
model.safetensors, tokenizer files, processor_config.json), so the runtime loads them through
exactly the ``from_pretrained`` path it uses for a real checkpoint. Nothing is downloaded: the
tokenizer is made here.

The shapes that the runtime depends on match the real models: 32 kHz mono, a hop of 640 samples
(50 frames a second), 4 codebooks of 2048 entries, a 1500-token generation window. Everything else
(widths, depths) is as small as it goes, so a model is ~4 MB and generates a second of audio in
well under a second on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    EncodecConfig,
    EncodecFeatureExtractor,
    GenerationConfig,
    MusicgenConfig,
    MusicgenDecoderConfig,
    MusicgenForConditionalGeneration,
    MusicgenMelodyConfig,
    MusicgenMelodyDecoderConfig,
    MusicgenMelodyForConditionalGeneration,
    MusicgenProcessor,
    T5Config,
    T5Tokenizer,
)

SAMPLING_RATE = 32_000
CODEBOOK_SIZE = 2048  # the real models' codebook size; the decoder's pad/bos token is this id
NUM_CODEBOOKS = 4

_WORDS = (
    "a", "and", "with", "the", "of", "in", "for", "music", "song", "beat", "piano", "guitar",
    "drums", "bass", "synth", "strings", "violin", "jazz", "rock", "pop", "lofi", "ambient",
    "electronic", "classical", "techno", "house", "hip", "hop", "orchestral", "cinematic", "calm",
    "happy", "sad", "dark", "upbeat", "slow", "fast", "chill", "epic", "soft", "loud", "melody",
    "rhythm", "80s", "90s",
)
_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-&/()#+"

README = """# Tiny random MusicGen ({kind})

This is **not** a real model. It is a tiny, randomly initialised MusicGen ({cls}) built by
`workers.runtime.tiny.make_tiny` (seed {seed}). It has the real model's on-disk format and audio
shapes (32 kHz, 50 frames/s, 4 codebooks per channel) but its output is noise.

It exists so that tests, CI and offline demos exercise the real loading and generation code
without downloading multi-gigabyte checkpoints. Never serve it to users.
"""


def make_tiny(path: Path, *, melody: bool = False, stereo: bool = False, seed: int = 0) -> Path:
    """Build a tiny random MusicGen checkpoint into ``path`` and return ``path``.

    ``melody=True`` builds a MusicGen-Melody (chroma-conditioned) checkpoint instead of the
    text-to-music one; ``stereo=True`` one like facebook/musicgen-stereo-*: the decoder predicts
    eight codebooks, left and right interleaved (``audio_channels = 2``), decoded by the same
    mono EnCodec one channel at a time. The same ``seed`` gives the same weights.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _make_tokenizer()
    model: MusicgenForConditionalGeneration | MusicgenMelodyForConditionalGeneration
    # Weight init draws from torch's global generator: seed it for a reproducible build, inside
    # fork_rng so the caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if melody:
            model = MusicgenMelodyForConditionalGeneration(_melody_config(len(tokenizer), stereo))
        else:
            model = MusicgenForConditionalGeneration(_config(len(tokenizer), stereo))
        fill_codebooks(model)
    model.generation_config = generation_config()
    model.save_pretrained(path)
    if melody:
        _save_melody_processor(path, tokenizer)
    else:
        make_processor(tokenizer).save_pretrained(path)
    kind = ("stereo " if stereo else "") + ("melody" if melody else "text-to-music")
    (path / "README.md").write_text(
        README.format(kind=kind, cls=type(model).__name__, seed=seed), encoding="utf-8"
    )
    return path


@torch.no_grad()
def fill_codebooks(model: torch.nn.Module) -> None:
    # EnCodec's codebooks are buffers that training fills (k-means init); a fresh model holds
    # zeros, which would decode every token sequence to the same waveform, and then neither the
    # seed nor the prompt would change the audio. Random codebooks make each code sound different.
    for layer in model.audio_encoder.quantizer.layers:  # type: ignore[union-attr]
        codebook = layer.codebook
        codebook.embed.normal_()
        codebook.embed_avg.copy_(codebook.embed)
        codebook.cluster_size.fill_(1.0)
        codebook.inited.fill_(1.0)


def make_processor(tokenizer: T5Tokenizer | None = None) -> MusicgenProcessor:
    """The text-to-music processor of the tiny checkpoints: this module's tokenizer (or
    ``tokenizer``) and EnCodec's 32 kHz feature extractor. ``workers.runtime.shapes`` builds its
    in-memory models' processor with it too."""
    feature_extractor = EncodecFeatureExtractor(
        feature_size=1, sampling_rate=SAMPLING_RATE, padding_side="left",
        return_attention_mask=True,
    )
    return MusicgenProcessor(  # type: ignore[no-untyped-call]
        feature_extractor=feature_extractor, tokenizer=tokenizer or _make_tokenizer())


def _make_tokenizer() -> T5Tokenizer:
    # A T5-style Unigram vocabulary built by hand: T5's special ids (<pad>=0, </s>=1, <unk>=2), then
    # single characters (so any ASCII prompt tokenizes without <unk>) and a few whole words. It is
    # the same tokenizer class as the real checkpoints', so AutoTokenizer/AutoProcessor resolve it
    # the same way.
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -8.0) for c in _CHARS]
    vocab += [("▁" + w, -4.0) for w in _WORDS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _text_encoder_config(vocab_size: int) -> T5Config:
    # Round the embedding table up, as T5's own 32128-for-32100 does.
    padded = -(-vocab_size // 32) * 32
    return T5Config(
        vocab_size=padded, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        feed_forward_proj="relu", relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
    )


def _audio_encoder_config() -> EncodecConfig:
    # The 32 kHz EnCodec of MusicGen: ratios 8*5*4*4 = 640 samples a frame (50 Hz), and a 2.2 kbps
    # target with 11-bit codebooks, which is what makes num_quantizers == 4.
    return EncodecConfig(
        sampling_rate=SAMPLING_RATE, audio_channels=1, upsampling_ratios=[8, 5, 4, 4],
        target_bandwidths=[2.2], codebook_size=CODEBOOK_SIZE, num_filters=4, hidden_size=16,
        num_lstm_layers=1, use_causal_conv=False, use_conv_shortcut=False, norm_type="weight_norm",
        pad_mode="reflect", compress=2, normalize=False,
    )


def _decoder_kwargs(stereo: bool = False) -> dict[str, object]:
    channels = 2 if stereo else 1
    return {
        "vocab_size": CODEBOOK_SIZE, "max_position_embeddings": 2048, "num_hidden_layers": 2,
        "num_attention_heads": 2, "hidden_size": 32, "ffn_dim": 64,
        "num_codebooks": NUM_CODEBOOKS * channels, "audio_channels": channels, "pad_token_id": CODEBOOK_SIZE, "bos_token_id": CODEBOOK_SIZE,
        "activation_function": "gelu", "dropout": 0.1,
        # 10x the real init scale: at 0.02 a 32-wide random decoder is so close to uniform that
        # text or melody conditioning rarely changes a sampled token, and tests could not see it.
        "initializer_factor": 0.2,
    }


def _config(vocab_size: int, stereo: bool = False) -> MusicgenConfig:
    return MusicgenConfig(
        text_encoder=_text_encoder_config(vocab_size), audio_encoder=_audio_encoder_config(),
        decoder=MusicgenDecoderConfig(**_decoder_kwargs(stereo)),  # type: ignore[arg-type]
    )


def _melody_config(vocab_size: int, stereo: bool = False) -> MusicgenMelodyConfig:
    return MusicgenMelodyConfig(
        text_encoder=_text_encoder_config(vocab_size), audio_encoder=_audio_encoder_config(),
        decoder=MusicgenMelodyDecoderConfig(**_decoder_kwargs(stereo)),  # type: ignore[arg-type]
        num_chroma=12, chroma_length=235,
    )


def generation_config() -> GenerationConfig:
    # What facebook/musicgen-* ship: sampling, classifier-free guidance 3.0, a 1500-token window.
    return GenerationConfig(  # type: ignore[no-untyped-call]
        do_sample=True, guidance_scale=3.0, max_length=1500, top_k=250,
        bos_token_id=CODEBOOK_SIZE, pad_token_id=CODEBOOK_SIZE,
        decoder_start_token_id=CODEBOOK_SIZE,
    )


def _save_melody_processor(path: Path, tokenizer: T5Tokenizer) -> None:
    # MusicgenMelodyFeatureExtractor cannot be instantiated without torchaudio (absent from this
    # project's dependencies, and not published for every torch version), so its config is written
    # directly, in the nested processor_config.json format that ProcessorMixin.save_pretrained
    # writes. The values are those of facebook/musicgen-melody.
    tokenizer.save_pretrained(path)
    feature_extractor = {
        "chunk_length": 30, "feature_extractor_type": "MusicgenMelodyFeatureExtractor",
        "feature_size": 12, "hop_length": 4096, "n_fft": 16384, "num_chroma": 12,
        "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False,
        "sampling_rate": SAMPLING_RATE, "stem_indices": [3, 2],
    }
    processor = {"feature_extractor": feature_extractor,
                 "processor_class": "MusicgenMelodyProcessor"}
    (path / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n",
                                                encoding="utf-8")
    config_file = path / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text(encoding="utf-8"))
    tokenizer_config["processor_class"] = "MusicgenMelodyProcessor"
    config_file.write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
