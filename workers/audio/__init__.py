"""Audio post-processing on the worker: output formats, loudness, rendering with ffmpeg."""

from workers.audio.formats import FORMATS, OutputSpec, check_output_spec
from workers.audio.postprocess import RenderResult, render

__all__ = [
    # what can be written
    "FORMATS", "OutputSpec", "check_output_spec",
    # writing it
    "RenderResult", "render",
]
