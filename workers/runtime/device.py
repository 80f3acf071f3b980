"""Pick the torch device and dtype a worker runs MusicGen on, from the ``model.*`` settings."""

from __future__ import annotations

import logging

import torch

from pipeline.errors import UnsupportedOption

log = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "mps", "cpu")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(preference: str) -> str:
    """Turn a device preference into a torch device string.

    ``"auto"`` picks cuda, then mps, then cpu. ``"cuda"`` (or ``"cuda:N"``) and ``"mps"`` that this
    host does not have raise ``UnsupportedOption`` rather than silently running on the CPU: a
    GPU worker that quietly generates at CPU speed is worse than one that refuses to start.
    """
    choice = preference.strip().lower()
    if choice == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    if choice == "cpu":
        return "cpu"
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UnsupportedOption(
                f"model.device is {preference!r} but CUDA is not available on this host "
                "(no GPU, or a CPU-only torch build); use 'auto' or 'cpu'", field="model.device")
        index = choice.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise UnsupportedOption(
                f"model.device is {preference!r} but this host has "
                f"{torch.cuda.device_count()} CUDA device(s)", field="model.device")
        return choice
    if choice == "mps":
        if not _mps_available():
            raise UnsupportedOption(
                "model.device is 'mps' but Apple MPS is not available on this host; "
                "use 'auto' or 'cpu'", field="model.device")
        return "mps"
    raise UnsupportedOption(
        f"model.device {preference!r} is not one of {', '.join(DEVICES)}", field="model.device")


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """Turn a dtype setting (``auto``, ``float32``, ``float16``, ``bfloat16``) into a torch dtype.

    ``"auto"`` is bfloat16 on CUDA when the GPU supports it (same range as float32, so no
    overflow in the EnCodec decoder), else float16; float32 on cpu and mps. float16 asked for on
    the CPU falls back to float32 with a warning: half-precision CPU kernels are slow or missing.
    """
    key = name.strip().lower()
    if key == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if key not in DTYPES:
        raise UnsupportedOption(
            f"model.dtype {name!r} is not one of auto, {', '.join(DTYPES)}", field="model.dtype")
    dtype = DTYPES[key]
    if dtype is torch.float16 and device == "cpu":
        log.warning("model.dtype float16 is not supported well on the CPU; using float32")
        return torch.float32
    return dtype
