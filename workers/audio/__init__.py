"""Audio post-processing on the worker: levels measured and set in process, one encoder run."""

from pipeline.contract.output_format import FORMATS, OutputSpec, check_output_spec
from workers.audio.postprocess import RenderResult, render

__all__ = [
    # what can be written
    "FORMATS", "OutputSpec", "check_output_spec",
    # writing it
    "RenderResult", "render",
]
