"""Turn generated samples into a finished file: map channels, resample, normalise, encode.

Everything but the encoder runs in process on the samples (``dsp``, ``loudness``, ``limiter``),
and the encoder runs once (``encode``; ``encode.encoder_for`` chooses it): wav, flac and ogg
are written in process by libsndfile, because starting ffmpeg (~85 ms) would cost more than
their encoding; mp3 and opus by one ffmpeg run that reads the finished float samples from
stdin (``encode``'s docstring has the measurements: the LAME and libopus inside soundfile's
wheel are slower than ffmpeg's start plus Debian's builds, and libsndfile cannot ask libopus
for ffmpeg's unconstrained VBR). Numbers in ``RenderResult`` are measured in process: for wav,
flac and opus on the samples encoded (what a lossless file holds exactly; libopus keeps
loudness within 0.25 LU), for mp3 and ogg on the file decoded back by libsndfile, because LAME
and Vorbis move loudness by up to 0.6 and 1.9 LU at low rates; a file more than
``LUFS_TRIM_LU`` off its lufs target is encoded once more with the aim trimmed by the miss.
The promise, held by the tests with ffmpeg's own ebur128 meter: the finished file is within
``LUFS_PROMISE_LU`` of the loudness target.

Steps: (stereo->mono as (L+R)/2, mono->stereo duplicated) -> soxr to the output rate -> when
normalising, a 10 Hz DC high-pass -> the gain for peak/rms/lufs (lufs: a true-peak limiter when
one linear gain would cross -1 dBTP) -> measure -> encode into a ``.part`` beside ``dest`` that
is renamed over it. ``dest`` appears whole or not at all; nothing is written to ``temp_dir``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.contract.output_format import OutputSpec, check_output_spec
from workers.audio.dsp import channels_first, input_rate, map_channels, remove_dc, resample
from workers.audio.encode import (
    decode,
    encode_with_ffmpeg,
    encoder_for,
    for_integer_pcm,
    reads_back,
    write_in_process,
)
from workers.audio.formats import encoder_args, ffmpeg_capabilities
from workers.audio.limiter import limit
from workers.audio.loudness import TRUE_PEAK_CEILING_DBTP, Levels, integrated_lufs, measure
from workers.storage import atomic_write_path

CLIP_CEILING_DBFS = -0.1  # rms gain stops here: a hair under full scale so PCM rounding can't clip
LUFS_PROMISE_LU = 0.5  # the finished file's loudness is this close to the target
LUFS_AIM_LU = 0.1  # the limiter loop stops this close (limiting lowers loudness a little)
# A read-back lossy file further off than this is encoded once more. 0.2 would re-encode the
# common mp3 at 44.1 kHz (LAME lowers noisy content ~0.25 LU) at twice the cost; at 0.3 the
# worst file measured by ffmpeg's ebur128 over every lossy rate, mono/stereo, noise/tone was
# 0.4 LU off (Vorbis at 8-12 kHz, where ebur128 and BS.1770 here differ by ~0.2 LU).
LUFS_TRIM_LU = 0.3
LIMITER_PASSES = 4


@dataclass(frozen=True)
class RenderResult:
    """The finished file and what was measured on the samples encoded into it.

    ``sample_rate`` is the encoded rate (an Opus decoder always plays at 48 kHz);
    ``duration_s`` is the duration of the samples encoded (gapless); ``gain_db`` is the linear
    gain applied (0 for none); ``notes`` records anything the caller should know, such as a
    capped rms gain or the true-peak limiter at work.
    """

    path: Path
    format: str
    duration_s: float
    sample_rate: int
    channels: int
    bit_depth: int | None
    loudness_lufs: float
    peak_dbfs: float
    true_peak_dbtp: float
    postprocess_seconds: float
    gain_db: float = 0.0
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for the sidecar and the job result)."""
        data = asdict(self)
        data["path"], data["notes"] = str(self.path), list(self.notes)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in data.items()}


def render(samples: np.ndarray, sample_rate: int, spec: OutputSpec, dest: Path, *,
           temp_dir: Path, ffmpeg: str = "ffmpeg", timeout_s: float = 300.0) -> RenderResult:
    """Write ``samples`` ((channels, n) or 1-D mono float) to ``dest`` as ``spec`` asks.

    Raises ``UnsupportedOption`` for a bad spec before anything runs, ``ServiceUnavailable``
    when ffmpeg is missing (mp3, opus), ``PostProcessFailed`` (retryable) when ffmpeg or
    libsndfile fails or ffmpeg times out, and ``ValueError`` for samples that are not finite
    float audio of 1 or 2 channels. ``temp_dir`` is accepted for the caller's contract;
    nothing is staged there.
    """
    del temp_dir  # every stage lives in memory now
    started = time.perf_counter()
    check_output_spec(spec)
    audio = channels_first(samples)
    sample_rate = input_rate(sample_rate)
    # Asked before any work: an ffmpeg that lacks the encoder refuses the spec up front.
    ffmpeg_encodes = encoder_for(spec) == "ffmpeg"
    codec = encoder_args(spec, ffmpeg_capabilities(ffmpeg)) if ffmpeg_encodes else {}
    rate = spec.sample_rate
    audio = resample(map_channels(audio, spec.channels), sample_rate, rate)
    if spec.normalization != "none":
        audio = remove_dc(audio, rate)
    target, source = spec.target, audio
    audio, gain, levels, notes = _normalise(source, rate, spec, target)
    with atomic_write_path(Path(dest)) as part:
        _encode(audio, rate, spec, codec, part, ffmpeg=ffmpeg, timeout_s=timeout_s)
        if reads_back(spec):
            written = _read_back(part, levels)
            lufs_target = target if spec.normalization == "lufs" else None
            miss = 0.0 if lufs_target is None else lufs_target - written.loudness_lufs
            if lufs_target is not None and not written.unmeasurable and abs(miss) > LUFS_TRIM_LU:
                # The codec moved loudness (Vorbis and LAME at low rates): one more encode with
                # the aim moved by the measured miss; the codec's shift is close to constant.
                audio, gain, levels, notes = _normalise(source, rate, spec, lufs_target + miss)
                _encode(audio, rate, spec, codec, part, ffmpeg=ffmpeg, timeout_s=timeout_s)
                notes.append(f"the {spec.format} encoder moved loudness by {-miss:+.2f} LU; "
                             "encoded once more with the aim trimmed by that much")
                written = _read_back(part, levels)
            levels = written
    return RenderResult(
        path=Path(dest), format=spec.format, duration_s=levels.duration_s, sample_rate=rate,
        channels=spec.channels, bit_depth=spec.effective_bit_depth,
        loudness_lufs=levels.loudness_lufs, peak_dbfs=levels.peak_dbfs,
        true_peak_dbtp=levels.true_peak_dbtp,
        postprocess_seconds=time.perf_counter() - started, gain_db=gain, notes=tuple(notes))


def _read_back(part: Path, encoded: Levels) -> Levels:
    """The levels of the file as a player decodes it; its duration is the samples' own."""
    decoded, rate = decode(part)
    measured = measure(decoded, rate)
    return Levels(measured.peak_dbfs, measured.rms_dbfs, measured.true_peak_dbtp,
                  measured.loudness_lufs, encoded.samples, encoded.sample_rate)


def _encode(audio: np.ndarray, rate: int, spec: OutputSpec, codec: Mapping[str, Any],
            part: Path, *, ffmpeg: str, timeout_s: float) -> str:
    """Write the finished samples into ``part``: the one encoder step (ffmpeg's stderr or "")."""
    if encoder_for(spec) == "libsndfile":
        write_in_process(audio, rate, spec, part)
        return ""
    return encode_with_ffmpeg(audio, rate, codec, part, ffmpeg=ffmpeg, timeout_s=timeout_s)


def _normalise(audio: np.ndarray, rate: int, spec: OutputSpec,
               target: float | None) -> tuple[np.ndarray, float, Levels, list[str]]:
    """Apply ``spec``'s normalisation aiming at ``target``: the samples, the gain (dB), their
    levels, and notes."""
    before = measure(audio, rate)
    notes: list[str] = []
    if target is None:
        if before.peak_dbfs > 0:
            notes.append(f"input peaks at {before.peak_dbfs:+.2f} dBFS; without normalization "
                         "the encoder clips it")
        return _as_written(audio, rate, spec, before, 0.0, notes)
    if spec.normalization == "lufs":  # says why silence or a too-short clip has no loudness
        return _lufs(audio, rate, spec, target, before)
    if not math.isfinite(before.peak_dbfs):
        notes.append("input is silent; normalization skipped")
        return _as_written(audio, rate, spec, before, 0.0, notes)
    if spec.normalization == "peak":
        gain = target - before.peak_dbfs
    else:
        gain = target - before.rms_dbfs
        headroom = CLIP_CEILING_DBFS - before.peak_dbfs
        if gain > headroom:
            notes.append(f"rms gain capped at {headroom:+.2f} dB (wanted {gain:+.2f} dB) so the "
                         f"peak stays at {CLIP_CEILING_DBFS} dBFS; RMS lands at "
                         f"{before.rms_dbfs + headroom:.2f} dBFS, not {target:.2f}")
            gain = headroom
    return _as_written(_gained(audio, gain), rate, spec, before.shifted(gain), gain, notes)


def _lufs(audio: np.ndarray, rate: int, spec: OutputSpec, target: float,
          before: Levels) -> tuple[np.ndarray, float, Levels, list[str]]:
    """One linear gain to ``target`` LUFS; the true-peak limiter when that gain would cross
    the ceiling, with the gain raised until the limited audio lands within ``LUFS_AIM_LU``."""
    if before.unmeasurable:
        notes = ["input has no integrated loudness (silent, or shorter than one 0.4 s BS.1770 "
                 "block); loudness normalization skipped"]
        return _as_written(audio, rate, spec, before, 0.0, notes)
    gain = target - before.loudness_lufs
    if before.true_peak_dbtp + gain <= TRUE_PEAK_CEILING_DBTP:
        return _as_written(_gained(audio, gain), rate, spec, before.shifted(gain), gain, [])
    wanted = gain
    for _ in range(LIMITER_PASSES):
        limited, reduction = limit(_gained(audio, gain), rate, TRUE_PEAK_CEILING_DBTP)
        error = target - integrated_lufs(limited, rate)
        if abs(error) <= LUFS_AIM_LU or not math.isfinite(error):
            break
        gain += error
    notes = [f"true-peak limiter: one linear gain of {wanted:+.2f} dB to {target} LUFS would have "
             f"put the true peak at {before.true_peak_dbtp + wanted:+.2f} dBTP, above "
             f"{TRUE_PEAK_CEILING_DBTP} dBTP; {gain:+.2f} dB applied and up to {reduction:.2f} dB "
             "limited"]
    written, _, levels, more = _as_written(limited, rate, spec, measure(limited, rate), gain, [])
    if abs(levels.loudness_lufs - target) > LUFS_PROMISE_LU:
        more.append(f"loudness landed {levels.loudness_lufs - target:+.2f} LU from the {target} "
                    "LUFS target: the limiter could not reach it under the true-peak ceiling")
    return written, gain, levels, notes + more


def _gained(audio: np.ndarray, gain_db: float) -> np.ndarray:
    return audio if gain_db == 0 else audio * np.float32(10.0 ** (gain_db / 20.0))


def _as_written(audio: np.ndarray, rate: int, spec: OutputSpec, levels: Levels, gain: float,
                notes: list[str]) -> tuple[np.ndarray, float, Levels, list[str]]:
    """The samples as the encoder will store them, with levels that describe exactly those."""
    if spec.info.lossless and levels.peak_dbfs > 0:
        audio = for_integer_pcm(audio)  # integer PCM clips past full scale: measure what stays
        levels = measure(audio, rate)
    return audio, gain, levels, notes
