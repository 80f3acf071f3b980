"""A small thread-safe LRU of loaded models, keyed by source (hub id or local path)."""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

log = logging.getLogger(__name__)

M = TypeVar("M")


class ModelCache(Generic[M]):
    """Keeps at most ``capacity`` loaded models; the least recently used one is evicted first.

    ``loader(source)`` builds a model on a miss (normally a partial of
    ``workers.runtime.musicgen.load_model``). One lock guards the map *and* the load, so two
    threads asking for the same uncached model load it once, and a GPU never holds two copies
    while a load is in progress; loads are rare, so the serialisation costs nothing that matters.
    """

    def __init__(self, capacity: int, loader: Callable[[str], M]) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._loader = loader
        self._models: OrderedDict[str, M] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, source: str) -> M:
        """Return the model for ``source``, loading it (and evicting the LRU one) on a miss."""
        with self._lock:
            if source in self._models:
                self._models.move_to_end(source)
                return self._models[source]
            # Evict before loading, so the new model never shares the GPU with the one it replaces.
            while len(self._models) >= self.capacity:
                evicted = next(iter(self._models))
                del self._models[evicted]  # no local name may keep the model alive
                log.info("evicting model %s from the cache", evicted)
                _release_memory()
            model = self._loader(source)
            self._models[source] = model
            return model

    def sources(self) -> list[str]:
        """The cached sources, least recently used first."""
        with self._lock:
            return list(self._models)

    def __contains__(self, source: object) -> bool:
        with self._lock:
            return source in self._models

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)

    def clear(self) -> None:
        """Drop every cached model and give the freed GPU memory back to the driver."""
        with self._lock:
            self._models.clear()
            _release_memory()


def _release_memory() -> None:
    # Dropping the last reference frees the tensors only once the cycles through the HF modules
    # are collected; empty_cache then hands the CUDA allocator's cached blocks back, so another
    # process (or the next model) can use them.
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.empty_cache()
