"""The static KV cache: every row's keys and values, allocated once for the engine's life.

Rows come in pairs: row ``r``'s conditional half at ``2r`` and its unconditional half (the
classifier-free guidance branch, fed the same tokens with empty text) at ``2r + 1``, so the first
``2b`` cache rows are exactly the first ``b`` engine rows and a step over them slices instead of
gathering. Self-attention holds ``positions`` entries per row (the model's window in decoding
steps); cross-attention holds the prompt's keys and values, computed once at admission, padded to
``text_tokens`` with a mask. Writes are in place (``index_copy_``), so the tensors' addresses never
change: what a CUDA graph needs.

Self-attention keys and values are one tensor per layer, each written in place by the step (the
pattern of HF's ``StaticCache`` and gpt-fast): a compiled step then mutates its inputs directly,
which inductor keeps in place. Written through a view of one tensor of all layers, the compiled
step kept a functional ``index_put`` and a ``select_scatter`` over the whole cache and copied it
back every step, a cost that grew with ``rows``, not with the rows stepped (issue 22, defect 2).
"""

from __future__ import annotations

import torch


class StaticCache:
    """Keys, values and masks for ``rows`` engine rows (``2 * rows`` cache rows) of one model."""

    def __init__(self, *, layers: int, rows: int, heads: int, head_dim: int, positions: int,
                 text_tokens: int, dtype: torch.dtype, device: str | torch.device) -> None:
        self.layers, self.heads, self.head_dim = layers, heads, head_dim
        self.positions, self.text_tokens = positions, text_tokens
        shape = (2 * rows, heads, positions, head_dim)
        self.self_k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.self_v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        cross = (layers, 2 * rows, heads, text_tokens, head_dim)
        self.cross_k = torch.zeros(cross, dtype=dtype, device=device)
        self.cross_v = torch.zeros(cross, dtype=dtype, device=device)
        # True = attend. Unused rows attend everywhere: their values are zeros, so the output is
        # zero rather than the NaN of an all-masked softmax.
        self.cross_mask = torch.ones((2 * rows, 1, 1, text_tokens), dtype=torch.bool,
                                     device=device)
        # Made once, sliced every step: a step's causal mask and write indices need no new
        # ranges. ``_write_base[r]`` is row r's first entry of each head in a layer's flat view.
        self.position_ids = torch.arange(positions, device=device)
        self._write_base = (torch.arange(2 * rows * heads, device=device)
                            * positions).view(2 * rows, heads)

    def reset(self, row: int) -> None:
        """Forget row ``row``'s self-attention entries (both halves)."""
        pair = slice(2 * row, 2 * row + 2)
        for keys, values in zip(self.self_k, self.self_v, strict=True):
            keys[pair].zero_()
            values[pair].zero_()

    def set_prompt(self, row: int, keys: list[torch.Tensor], values: list[torch.Tensor],
                   mask: torch.Tensor) -> None:
        """Fill row ``row``'s cross-attention from its prompt.

        ``keys[layer]``/``values[layer]`` are ``(heads, tokens, head_dim)`` and ``mask`` is
        ``(tokens,)`` bool. The unconditional half gets zeros and attends to all of them, which is
        what transformers computes for it (zero text states times a zero mask: a zero output).
        """
        tokens = mask.shape[0]
        cond, uncond = 2 * row, 2 * row + 1
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            self.cross_k[layer, cond].zero_()
            self.cross_v[layer, cond].zero_()
            self.cross_k[layer, cond, :, :tokens] = k
            self.cross_v[layer, cond, :, :tokens] = v
            self.cross_k[layer, uncond].zero_()
            self.cross_v[layer, uncond].zero_()
        self.cross_mask[cond].fill_(False)
        self.cross_mask[cond, 0, 0, :tokens] = mask
        self.cross_mask[uncond].fill_(True)

    def write_index(self, rows: int, position: torch.Tensor) -> torch.Tensor:
        """Flat indices into a layer's ``(2*rows*heads*positions, head_dim)`` view for one step.

        ``position`` is ``(2*rows,)``; the result addresses every head of every row at its own
        position, in ``(row, head)`` order, the order of a step's ``(2*rows, heads, head_dim)``.
        """
        return (self._write_base[:rows] + position[:, None]).reshape(-1)
