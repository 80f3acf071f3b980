"""Measuring audio with ffmpeg: sample peak and RMS (astats), EBU R128 loudness (loudnorm).

The meters of the multi-pass reference render (``benchmarks/reference_render.py``), and an ffmpeg-side
measurement of a finished file that is independent of the in-process meters in ``loudness``
(tests use it to check what ``render`` promises). In the reference render one meter is used
everywhere, for the first loudnorm pass and for the finished file, so that
"the measured loudness" means the same thing at every step. loudnorm's analysis up-samples to
192 kHz; for full-band noise that reads ~0.1-0.2 LU lower than ``ebur128`` (which works at
48 kHz), so mixing the two meters would bias the result.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ffmpeg as ffmpeg_lib

from pipeline.errors import PostProcessFailed
from workers.audio.formats import run_ffmpeg
from workers.audio.loudness import SILENCE_LUFS
from workers.audio.loudness import TRUE_PEAK_CEILING_DBTP as TRUE_PEAK_CEILING_DBTP  # noqa: PLC0414

_ASTATS = {"peak": re.compile(r"Peak level dB:\s*(\S+)"),
           "rms": re.compile(r"RMS level dB:\s*(\S+)"),
           "samples": re.compile(r"Number of samples:\s*(\d+)")}
_INPUT_RATE = re.compile(r"Stream #0:\d+\S*: Audio: [^\n]*?, (\d+) Hz")


@dataclass(frozen=True)
class Loudness:
    """loudnorm's analysis of a whole file (its ``print_format=json`` block)."""

    integrated_lufs: float
    true_peak_dbtp: float
    lra: float
    threshold: float
    target_offset: float
    normalization_type: str = "analysis"

    @property
    def unmeasurable(self) -> bool:
        """True when BS.1770 gives no integrated loudness: silence, or under one 0.4 s block."""
        return not math.isfinite(self.integrated_lufs) or self.integrated_lufs <= SILENCE_LUFS


@dataclass(frozen=True)
class Analysis:
    """What one decode of a file measured; ``samples`` counts frames per channel."""

    peak_dbfs: float
    rms_dbfs: float
    samples: int
    sample_rate: int
    loudness: Loudness | None

    @property
    def duration_s(self) -> float:
        """Decoded (gapless) duration: codec priming and padding already trimmed by ffmpeg."""
        return self.samples / self.sample_rate


def parse_loudnorm_json(stderr: str) -> Loudness:
    """The last loudnorm JSON block in ffmpeg's stderr."""
    start, end = stderr.rfind("{"), stderr.rfind("}")
    if start < 0 or end < start:
        raise PostProcessFailed("ffmpeg's loudnorm printed no measurement",
                                details={"stderr_tail": stderr[-2000:]})
    data = json.loads(stderr[start:end + 1])
    return Loudness(integrated_lufs=float(data["input_i"]), true_peak_dbtp=float(data["input_tp"]),
                    lra=float(data["input_lra"]), threshold=float(data["input_thresh"]),
                    target_offset=float(data["target_offset"]),
                    normalization_type=str(data.get("normalization_type", "analysis")))


def parse_astats(stderr: str) -> tuple[float, float, int]:
    """(peak dBFS, RMS dBFS, samples per channel) from astats' "Overall" section."""
    at = stderr.rfind("] Overall")
    found = {key: rx.search(stderr[at:]) for key, rx in _ASTATS.items()} if at >= 0 else {}
    values = {key: m.group(1) for key, m in found.items() if m is not None}
    if len(values) != len(_ASTATS):
        raise PostProcessFailed("ffmpeg's astats printed no overall statistics",
                                details={"stderr_tail": stderr[-2000:]})
    peak, rms, samples = values["peak"], values["rms"], values["samples"]
    return float(peak), float(rms), int(samples)


def add_meters(stream: Any, *, loudness: bool) -> Any:
    """Append the meters to an ffmpeg-python stream (astats, then loudnorm's analysis)."""
    stream = stream.filter("astats", measure_perchannel="none")
    return stream.filter("loudnorm", print_format="json") if loudness else stream


def parse_meters(stderr: str, *, loudness: bool, sample_rate: int) -> Analysis:
    """The ``Analysis`` that ``add_meters`` printed to stderr, for audio at ``sample_rate``."""
    peak, rms, samples = parse_astats(stderr)
    return Analysis(peak_dbfs=peak, rms_dbfs=rms, samples=samples, sample_rate=sample_rate,
                    loudness=parse_loudnorm_json(stderr) if loudness else None)


def analyse(path: Path, *, ffmpeg: str, timeout_s: float, loudness: bool = True) -> Analysis:
    """Decode ``path`` once and measure it; ``loudness=False`` skips the (slower) R128 meter."""
    stream = add_meters(ffmpeg_lib.input(str(path)), loudness=loudness)
    argv = (stream.output("-", f="null")
            .global_args("-hide_banner", "-nostdin", "-nostats").compile(cmd=ffmpeg))
    stderr = run_ffmpeg(argv, what=f"measuring {path.name}", timeout_s=timeout_s)
    # The first "Stream #0:N ... Hz" line is the input's: the decoded rate (48 kHz for Opus).
    rate = _INPUT_RATE.search(stderr[:stderr.find("Stream mapping")])
    if rate is None:
        raise PostProcessFailed(f"could not read the decoded sample rate of {path.name}",
                                details={"stderr_tail": stderr[-2000:]})
    return parse_meters(stderr, loudness=loudness, sample_rate=int(rate.group(1)))


def loudnorm_pass2(measured: Loudness, target_lufs: float,
                   true_peak_dbtp: float = TRUE_PEAK_CEILING_DBTP) -> dict[str, Any]:
    """loudnorm's second-pass options: the first pass's numbers, linear mode requested.

    loudnorm keeps to a single linear gain only when that gain leaves the true peak under
    ``TP`` and the measured range fits ``LRA``; setting LRA to at least the measured range
    removes the second condition, so dynamic mode happens only when the peak ceiling demands it.
    The caller must first rule out unmeasurable input and bring measured I into loudnorm's [-99, 0].

    loudnorm reads measured_LRA 0 and measured_thresh -70 as "not measured" and then silently
    ignores linear=true; a steady tone or noise really measures LRA 0.00, so those two values
    are nudged off their sentinels by 0.01 (far below anything the meter resolves).
    """
    lra = max(measured.lra, 0.01) if math.isfinite(measured.lra) else 0.01
    thresh = measured.threshold if measured.threshold != -70.0 else -69.99
    return {
        "I": f"{target_lufs:.2f}", "TP": f"{true_peak_dbtp:.2f}",
        "LRA": f"{min(50.0, max(7.0, math.ceil(lra))):.2f}",
        "measured_I": f"{measured.integrated_lufs:.2f}",
        "measured_TP": f"{_clamp(measured.true_peak_dbtp, -99.0, 99.0):.2f}",
        "measured_LRA": f"{_clamp(lra, 0.01, 99.0):.2f}",
        "measured_thresh": f"{_clamp(thresh, -99.0, 0.0):.2f}",
        "offset": f"{_clamp(measured.target_offset, -99.0, 99.0):.2f}",
        "linear": "true", "print_format": "json",
    }


def shifted(measured: Loudness, gain_db: float) -> Loudness:
    """The measurement of the same audio after a linear gain of ``gain_db``."""
    return Loudness(measured.integrated_lufs + gain_db, measured.true_peak_dbtp + gain_db,
                    measured.lra, measured.threshold + gain_db, measured.target_offset)


def _clamp(value: float, low: float, high: float) -> float:
    return min(high, max(low, value)) if math.isfinite(value) else low
