"""Melody conditioning for MusicGen-Melody: waveform -> one-hot chroma, without torchaudio.

transformers' ``MusicgenMelodyProcessor`` computes the chroma with torchaudio, which this project
does not depend on (and which is not published for every torch release). ``MelodyProcessor``
reproduces that processor's ``__call__`` (text + audio -> input_ids, attention_mask,
input_features) in plain torch, with its parameters read from the checkpoint's own feature
extractor config, so real checkpoints and the tiny test model are handled alike. One code path
everywhere also keeps seeded output identical between hosts with and without torchaudio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, FeatureExtractionMixin
from transformers.audio_utils import chroma_filter_bank


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """Band-limited (Hann-windowed sinc) resampling along the last axis.

    The kernel is torchaudio's ``functional.resample`` with the settings MusicGen-Melody's feature
    extractor uses (rolloff 0.945, 24 zero crossings), so the chroma matches the reference one.
    """
    if orig_rate == new_rate:
        return waveform
    gcd = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // gcd, new_rate // gcd
    zero_crossings, rolloff = 24, 0.945
    base = min(orig, new) * rolloff
    width = math.ceil(zero_crossings * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = (torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx) * base
    t = t.clamp(-zero_crossings, zero_crossings)
    window = torch.cos(t * math.pi / zero_crossings / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * (base / orig)
    shape = waveform.shape
    flat = waveform.reshape(-1, shape[-1]).to(torch.float64)
    padded = torch.nn.functional.pad(flat, (width, width + orig))
    out = torch.nn.functional.conv1d(padded[:, None], kernel, stride=orig)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)
    target = math.ceil(new * shape[-1] / orig)
    return out[..., :target].reshape(*shape[:-1], target).to(waveform.dtype)


@dataclass(frozen=True)
class ChromaExtractor:
    """Raw mono audio -> one-hot chroma frames, as ``MusicgenMelodyFeatureExtractor`` makes them."""

    sampling_rate: int = 32_000
    n_fft: int = 16_384
    hop_length: int = 4096
    num_chroma: int = 12
    chunk_length: int = 30

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ChromaExtractor:
        """Build from a feature extractor config dict (``processor_config.json`` or legacy)."""
        keys = ("sampling_rate", "n_fft", "hop_length", "num_chroma", "chunk_length")
        return cls(**{k: int(config[k]) for k in keys if k in config})

    def __call__(self, waveforms: list[np.ndarray]) -> torch.Tensor:
        """Chroma of 1-D float waveforms at ``sampling_rate``: ``(batch, frames, num_chroma)``.

        Longer than ``chunk_length`` seconds is truncated; shorter ones are right-padded with
        silence to the longest, as the reference extractor does.
        """
        max_samples = self.chunk_length * self.sampling_rate
        clipped = [np.asarray(w, dtype=np.float32)[:max_samples] for w in waveforms]
        longest = max(len(w) for w in clipped)
        batch = torch.zeros((len(clipped), longest), dtype=torch.float32)
        for i, wav in enumerate(clipped):
            batch[i, : len(wav)] = torch.from_numpy(wav)
        if longest < self.n_fft:  # the STFT needs at least one full window; pad both sides
            pad = self.n_fft - longest
            batch = torch.nn.functional.pad(batch, (pad // 2, pad - pad // 2))
        window = torch.hann_window(self.n_fft)
        spec = torch.stft(batch, self.n_fft, hop_length=self.hop_length, win_length=self.n_fft,
                          window=window, center=True, pad_mode="reflect", return_complex=True)
        power = (spec.abs() / window.pow(2).sum().sqrt()) ** 2
        filters = torch.from_numpy(chroma_filter_bank(
            num_frequency_bins=self.n_fft, num_chroma=self.num_chroma,
            sampling_rate=self.sampling_rate, tuning=0,
        )).float()
        raw = torch.einsum("cf,...ft->...ct", filters, power)
        norm = torch.nn.functional.normalize(raw, p=float("inf"), dim=-2, eps=1e-6).transpose(1, 2)
        # The model is conditioned on the dominant pitch class only: keep a one-hot per frame.
        one_hot = torch.zeros_like(norm)
        one_hot.scatter_(-1, norm.argmax(-1, keepdim=True), 1.0)
        return one_hot


class MelodyProcessor:
    """Tokenizer + chroma extractor with ``MusicgenMelodyProcessor``'s calling convention."""

    def __init__(self, tokenizer: Any, chroma: ChromaExtractor) -> None:
        self.tokenizer = tokenizer
        self.chroma = chroma
        self.sampling_rate = chroma.sampling_rate

    @classmethod
    def from_pretrained(cls, source: str, *, cache_dir: str | None = None,
                        local_files_only: bool = False) -> MelodyProcessor:
        """Load the tokenizer and the chroma parameters of a MusicGen-Melody checkpoint."""
        tokenizer = AutoTokenizer.from_pretrained(source, cache_dir=cache_dir,
                                                  local_files_only=local_files_only)
        config, _ = FeatureExtractionMixin.get_feature_extractor_dict(
            source, cache_dir=cache_dir, local_files_only=local_files_only)
        return cls(tokenizer, ChromaExtractor.from_dict(config))

    def __call__(self, *, text: list[str], audio: list[np.ndarray] | None = None,
                 sampling_rate: int | None = None, return_tensors: str = "pt",
                 **tokenizer_kwargs: Any) -> dict[str, torch.Tensor]:
        """Tokenize ``text`` and, when ``audio`` is given, add its chroma as ``input_features``.

        ``audio`` holds mono waveforms at ``sampling_rate`` (resampled here when it differs).
        Only torch tensors are returned (``return_tensors="pt"``).
        """
        if return_tensors != "pt":
            raise ValueError(f"MelodyProcessor returns torch tensors only, not {return_tensors!r}")
        inputs = dict(self.tokenizer(text, return_tensors="pt", **tokenizer_kwargs))
        if audio is not None:
            rate = sampling_rate if sampling_rate is not None else self.sampling_rate
            waves = [resample(torch.from_numpy(np.asarray(a, dtype=np.float32)), rate,
                              self.sampling_rate).numpy() for a in audio]
            inputs["input_features"] = self.chroma(waves)
        return inputs
