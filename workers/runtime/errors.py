"""How a torch failure inside the model becomes one of the pipeline's typed errors."""

from __future__ import annotations

from typing import NoReturn

import torch

from pipeline.errors import GpuOutOfMemory, ModelRuntimeError, PipelineError


def raise_runtime(error: RuntimeError, during: str) -> NoReturn:
    """Map a torch RuntimeError to the pipeline's errors (always raises)."""
    raise runtime_error(error, during) from error


def runtime_error(error: RuntimeError, during: str) -> PipelineError:
    """The pipeline error ``raise_runtime`` raises for ``error``, without raising it: for a
    failure that belongs to one row of a batch and is handed back as that row's result.

    Out of memory (CUDA's own error, or any whose message says so) is ``GpuOutOfMemory`` and
    empties the CUDA cache; anything else is ``ModelRuntimeError``. ``error`` is the cause.
    """
    converted: PipelineError
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower():
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            torch.cuda.empty_cache()
        converted = GpuOutOfMemory(f"out of GPU memory during {during}: {error}")
    else:
        converted = ModelRuntimeError(f"model failed during {during}: {error}")
    converted.__cause__ = error
    return converted
