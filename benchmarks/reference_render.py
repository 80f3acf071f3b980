"""The multi-pass ffmpeg render that ``postprocess.render`` replaced: the benchmark's baseline.

Kept (not imported by the worker) so that ``benchmarks/render.py`` can time it beside the
new path in one run and a test can compare both paths' loudness on the same input; delete it
with them once that comparison is no longer wanted. Same signature and ``RenderResult``.

Every step is a real ffmpeg run (built with ffmpeg-python, run with a timeout):

1. the float samples go to a float WAV in a private folder under ``temp_dir``;
2. stage: pan to the requested channels, resample (soxr when linked) -> a float WAV, and in
   the same run measure it (sample peak and RMS with astats, loudnorm's R128 analysis for lufs);
3. choose the gain (or loudnorm's second pass) from those measurements;
4. encode: gain (or loudnorm's second pass) + the encoder, into a ``.part`` file beside ``dest``;
5. measure the encoded file (the numbers in ``RenderResult`` are of the file as written),
   then rename it over ``dest``.

Temp files go on success and on failure; ``dest`` appears whole or not at all.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ffmpeg as ffmpeg_lib
import numpy as np
import soundfile as sf

from pipeline.contract.output_format import OutputSpec, check_output_spec
from workers.audio.dsp import channels_first, input_rate
from workers.audio.ffmpeg_meters import (
    TRUE_PEAK_CEILING_DBTP,
    Analysis,
    Loudness,
    add_meters,
    analyse,
    loudnorm_pass2,
    parse_loudnorm_json,
    parse_meters,
    shifted,
)
from workers.audio.formats import (
    FfmpegCaps,
    encoder_args,
    ffmpeg_capabilities,
    run_ffmpeg,
)
from workers.audio.postprocess import RenderResult
from workers.storage import atomic_write_path

CLIP_CEILING_DBFS = -0.1  # rms gain stops here: a hair under full scale so PCM rounding can't clip
LUFS_TOLERANCE_LU = 0.2  # re-encode with a trimmed target when the file misses by more than this
LUFS_MAX_TRIMS = 2
SUBSONIC_HZ = 10  # DC-blocking high-pass corner, applied whenever the level is normalised
LOUDNORM_MAX_INPUT_LUFS = -1.0  # loudnorm's measured_I must be <= 0; keep a margin

Filter = tuple[str, tuple[Any, ...], dict[str, Any]]


def render(samples: np.ndarray, sample_rate: int, spec: OutputSpec, dest: Path, *,
           temp_dir: Path, ffmpeg: str = "ffmpeg", timeout_s: float = 300.0) -> RenderResult:
    """Write ``samples`` ((channels, n) or 1-D mono float) to ``dest`` as ``spec`` asks.

    Raises ``UnsupportedOption`` for a bad spec before anything runs, ``ServiceUnavailable``
    when ffmpeg is missing, ``PostProcessFailed`` (retryable) when ffmpeg fails or times out,
    and ``ValueError`` for samples that are not finite float audio of 1 or 2 channels.
    """
    started = time.perf_counter()
    check_output_spec(spec)
    audio = channels_first(samples)
    sample_rate = input_rate(sample_rate)
    caps = ffmpeg_capabilities(ffmpeg)
    codec = encoder_args(spec, caps)
    temp_dir = Path(temp_dir)
    temp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="render-", dir=temp_dir) as work_dir:
        raw, stage = Path(work_dir) / "input.wav", Path(work_dir) / "stage.wav"
        sf.write(raw, audio.T, sample_rate, subtype="FLOAT")
        before = _stage(raw, stage, audio.shape[0], spec, caps, ffmpeg, timeout_s)
        with atomic_write_path(Path(dest)) as part:
            if spec.normalization == "lufs":
                final, notes = _encode_lufs(stage, part, spec, caps, codec, before, ffmpeg,
                                            timeout_s)
                gain = 0.0
            else:
                gain, notes = _linear_gain(spec, before)
                chain = [("volume", (), {"volume": f"{gain:.4f}dB"})] if gain else []
                _encode(stage, part, [*chain, _aformat(spec)], codec, ffmpeg, timeout_s,
                        what=f"encoding {spec.format}")
                final = analyse(part, ffmpeg=ffmpeg, timeout_s=timeout_s)
    assert final.loudness is not None  # analyse() measures loudness by default
    return RenderResult(
        path=Path(dest), format=spec.format, duration_s=final.duration_s,
        sample_rate=spec.sample_rate, channels=spec.channels, bit_depth=spec.effective_bit_depth,
        loudness_lufs=final.loudness.integrated_lufs, peak_dbfs=final.peak_dbfs,
        true_peak_dbtp=final.loudness.true_peak_dbtp,
        postprocess_seconds=time.perf_counter() - started, gain_db=gain, notes=tuple(notes))


def _stage(raw: Path, stage: Path, in_channels: int, spec: OutputSpec, caps: FfmpegCaps,
           ffmpeg: str, timeout_s: float) -> Analysis:
    """Pan and resample ``raw`` into the float ``stage`` file and measure it in the same run."""
    stream = ffmpeg_lib.input(str(raw))
    chain = [_pan(in_channels, spec.channels), *_resample(spec, caps)]
    if spec.normalization != "none":
        # A DC offset or subsonic drift takes headroom and no loudness (K-weighting ignores it),
        # so no gain could reach a loudness target past it. A 2-pole 10 Hz high-pass removes it
        # and leaves everything audible; "none" keeps the samples exactly as generated.
        chain.append(("highpass", (), {"f": str(SUBSONIC_HZ), "poles": "2"}))
    for name, args, kwargs in chain:
        stream = stream.filter(name, *args, **kwargs)
    split = stream.filter_multi_output("asplit")
    lufs = spec.normalization == "lufs"
    to_file = split[0].output(str(stage), f="wav", acodec="pcm_f32le")
    to_meters = add_meters(split[1], loudness=lufs).output("-", f="null")
    argv = (ffmpeg_lib.merge_outputs(to_file, to_meters).overwrite_output()
            .global_args("-hide_banner", "-nostdin", "-nostats").compile(cmd=ffmpeg))
    stderr = run_ffmpeg(argv, what="resampling, mapping channels and measuring",
                        timeout_s=timeout_s)
    return parse_meters(stderr, loudness=lufs, sample_rate=spec.sample_rate)


def _pan(in_channels: int, out_channels: int) -> Filter:
    # "<" renormalises the gains, so "c0<c0+c1" is the 0.5/0.5 downmix. ("=" would need
    # escaping that ffmpeg-python gets wrong for pan.) pan also names the layout, which the
    # float WAV from soundfile lacks and later filters need.
    sources = ["c0"] if in_channels == 1 else ["c0", "c1"]
    if out_channels == 1:
        spec = "mono|c0<" + "+".join(sources)
    else:
        spec = f"stereo|c0<{sources[0]}|c1<{sources[-1]}"
    return ("pan", (spec,), {})


def _resample(spec: OutputSpec, caps: FfmpegCaps) -> list[Filter]:
    options: dict[str, Any] = {"resampler": "soxr", "precision": 28} if caps.has_soxr else {}
    return [("aresample", (spec.sample_rate,), options), _aformat(spec)]


def _aformat(spec: OutputSpec) -> Filter:
    # Pin rate and layout at the end of every chain: after loudnorm, ffmpeg 5.1 cannot
    # negotiate a channel layout for the encoder without it ("Cannot select channel layout").
    layout = "mono" if spec.channels == 1 else "stereo"
    return ("aformat", (), {"sample_rates": spec.sample_rate, "channel_layouts": layout})


def _encode(src: Path, out: Path, chain: Sequence[Filter], codec: dict[str, Any], ffmpeg: str,
            timeout_s: float, *, what: str) -> str:
    stream = ffmpeg_lib.input(str(src))
    for name, args, kwargs in chain:
        stream = stream.filter(name, *args, **kwargs)
    argv = (stream.output(str(out), **codec).overwrite_output()
            .global_args("-hide_banner", "-nostdin", "-nostats").compile(cmd=ffmpeg))
    return run_ffmpeg(argv, what=what, timeout_s=timeout_s)


def _linear_gain(spec: OutputSpec, before: Analysis) -> tuple[float, list[str]]:
    """The gain (dB) for none/peak/rms, and notes on anything unusual."""
    notes: list[str] = []
    target = spec.target
    if target is None:
        if before.peak_dbfs > 0:
            notes.append(f"input peaks at {before.peak_dbfs:+.2f} dBFS; without normalization "
                         "the encoder clips it")
        return 0.0, notes
    if not math.isfinite(before.peak_dbfs):
        notes.append("input is silent; normalization skipped")
        return 0.0, notes
    if spec.normalization == "peak":
        return target - before.peak_dbfs, notes
    gain = target - before.rms_dbfs
    headroom = CLIP_CEILING_DBFS - before.peak_dbfs
    if gain > headroom:
        notes.append(f"rms gain capped at {headroom:+.2f} dB (wanted {gain:+.2f} dB) so the peak "
                     f"stays at {CLIP_CEILING_DBFS} dBFS; RMS lands at "
                     f"{before.rms_dbfs + headroom:.2f} dBFS, not {target:.2f}")
        gain = headroom
    return gain, notes


def _encode_lufs(stage: Path, part: Path, spec: OutputSpec, caps: FfmpegCaps,
                 codec: dict[str, Any], before: Analysis, ffmpeg: str,
                 timeout_s: float) -> tuple[Analysis, list[str]]:
    """EBU R128 two-pass loudnorm, checked on the encoded file and trimmed if it missed.

    Pass 1 is ``before.loudness`` (loudnorm's analysis of the stage file). Pass 2 runs
    loudnorm with those measured values and linear=true: one constant gain, the same as
    ``volume``, unless that gain would push the true peak over -1 dBTP, when loudnorm switches
    to its dynamic mode (a gain that rides the 3 s short-term loudness, plus a limiter).
    loudnorm works at 192 kHz, so ``aresample`` takes the result back to the requested rate.

    Why the trim loop: what is measured on the finished file is what counts, and three things
    move it after pass 2: the 192 kHz round trip removes the band next to Nyquist (~0.25 LU on
    full-band noise at 32 kHz), lossy encoders low-pass and reshape peaks, and dynamic mode on
    short clips lands a few tenths off. Each miss > LUFS_TOLERANCE_LU re-runs pass 2 with the
    target moved by the measured error; in linear mode the error is a constant so one trim
    lands it, in dynamic mode loudnorm re-solves for the new target.
    """
    target = spec.target
    assert target is not None and before.loudness is not None
    notes: list[str] = []
    if before.loudness.unmeasurable:
        notes.append("input has no integrated loudness (silent, or shorter than one 0.4 s "
                     "BS.1770 block); loudness normalization skipped")
        _encode(stage, part, [_aformat(spec)], codec, ffmpeg, timeout_s,
                what=f"encoding {spec.format}")
        return analyse(part, ffmpeg=ffmpeg, timeout_s=timeout_s), notes
    measured: Loudness = before.loudness
    pre: list[Filter] = []
    if measured.integrated_lufs > LOUDNORM_MAX_INPUT_LUFS:
        # Louder than loudnorm's measured_I range (float input above full scale): turn it
        # down first by a known gain and shift the pass-1 numbers by the same amount.
        pre_gain = -10.0 - measured.integrated_lufs
        pre = [("volume", (), {"volume": f"{pre_gain:.4f}dB"})]
        measured = shifted(measured, pre_gain)
    aim = target
    for attempt in range(LUFS_MAX_TRIMS + 1):
        chain = [*pre, ("loudnorm", (), loudnorm_pass2(measured, aim)), *_resample(spec, caps)]
        stderr = _encode(stage, part, chain, codec, ffmpeg, timeout_s,
                         what=f"normalising loudness and encoding {spec.format}")
        mode = parse_loudnorm_json(stderr).normalization_type
        final = analyse(part, ffmpeg=ffmpeg, timeout_s=timeout_s)
        assert final.loudness is not None
        error = target - final.loudness.integrated_lufs
        if abs(error) <= LUFS_TOLERANCE_LU or attempt == LUFS_MAX_TRIMS:
            break
        aim = min(-5.0, max(-70.0, aim + error))
    if mode == "dynamic":
        notes.append(f"loudnorm used dynamic mode: one linear gain to {target} LUFS would have "
                     f"put the true peak above {TRUE_PEAK_CEILING_DBTP} dBTP")
    if abs(error) > LUFS_TOLERANCE_LU:
        notes.append(f"loudness landed {-error:+.2f} LU from the {target} LUFS target")
    return final, notes

