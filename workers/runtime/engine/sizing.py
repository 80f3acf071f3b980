"""How many rows a static engine gets: what was asked, as far as the device's memory allows.

An engine's cache is allocated whole at construction: per row, keys and values for both
guidance halves, every layer and head, over the whole window of positions (self-attention) and
the prompt tokens (cross-attention). At 64 rows in bf16 that is ~19 GB for musicgen-small and
~76 GB for large (issue 22), so ``max_batch_size`` alone is no size. On CUDA the rows are capped
so that the cache takes at most ``fraction`` of the memory free once the model is loaded; the
rest is for the step's activations, EnCodec and the HF path's jobs (melody, long-form), which
share the device. On the CPU the limit is ``max_batch_size``: host memory is not ours to share
out, and the worker's memory guard watches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class EngineShape:
    """What one engine row's cache is made of."""

    layers: int
    heads: int
    head_dim: int
    positions: int  # decoding steps of the model's window
    prompt_tokens: int  # the cross-attention cache's length
    dtype_bytes: int

    @property
    def row_bytes(self) -> int:
        """Cache bytes of one engine row: 2 guidance halves x (keys, values)."""
        return (2 * 2 * self.layers * self.heads * self.head_dim
                * (self.positions + self.prompt_tokens) * self.dtype_bytes)


@dataclass(frozen=True)
class Sizing:
    """The rows chosen and why, for the log."""

    rows: int
    asked: int
    row_bytes: int
    budget_bytes: int | None  # None: no device memory limit (the CPU)

    def line(self) -> str:
        mib = self.row_bytes / 2**20
        if self.budget_bytes is None:
            return f"{self.rows} rows as asked ({mib:.1f} MiB of cache each)"
        capped = "" if self.rows == self.asked else f" (asked {self.asked})"
        return (f"{self.rows} rows{capped}: {mib:.1f} MiB of cache each within a budget of "
                f"{self.budget_bytes / 2**30:.2f} GiB of free device memory")


def rows_for(asked: int, shape: EngineShape, free_bytes: int | None, fraction: float) -> Sizing:
    """The rows an engine gets: ``asked``, capped by ``fraction`` of ``free_bytes`` when there
    is a reading (0 when not even one row fits)."""
    if free_bytes is None:
        return Sizing(asked, asked, shape.row_bytes, None)
    budget = int(free_bytes * fraction)
    return Sizing(max(0, min(asked, budget // shape.row_bytes)), asked, shape.row_bytes, budget)


def shape_of(loaded: Any, positions: int, prompt_tokens: int) -> EngineShape:
    """The cache shape of an engine over ``loaded`` (a ``LoadedModel``)."""
    config = loaded.model.config.decoder
    heads = int(config.num_attention_heads)
    return EngineShape(layers=int(config.num_hidden_layers), heads=heads,
                       head_dim=int(config.hidden_size) // heads, positions=positions,
                       prompt_tokens=prompt_tokens,
                       dtype_bytes=torch.empty((), dtype=loaded.dtype).element_size())


def free_device_bytes(device: str) -> int | None:
    """Free memory of a CUDA device now; None elsewhere (no limit of ours)."""
    target = torch.device(device)
    if target.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(target)
    return int(free)
