"""The MusicGen runtime: the only part of the project that touches torch and transformers.

Import it in the worker's per-process setup hook, never from the producer side.
"""

from workers.runtime.batch import GeneratedAudio, GenerationItem
from workers.runtime.device import resolve_device, resolve_dtype
from workers.runtime.loaded import LoadedModel
from workers.runtime.loading import load_model
from workers.runtime.model_cache import ModelCache
from workers.runtime.musicgen import generate
from workers.runtime.tiny import make_tiny

__all__ = [  # noqa: RUF022 - grouped by use, as house style asks
    # loading
    "LoadedModel",
    "ModelCache",
    "load_model",
    "make_tiny",
    "resolve_device",
    "resolve_dtype",
    # generating
    "GeneratedAudio",
    "GenerationItem",
    "generate",
]
