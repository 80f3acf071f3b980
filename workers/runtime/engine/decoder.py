"""One decoding step of MusicGen's decoder over a static cache, with per-row positions.

The arithmetic is transformers' (``models/musicgen/modeling_musicgen.py``), op for op, over the
loaded model's own modules: the sum of the codebook embeddings plus the sinusoidal position of
each row, then per layer pre-norm self-attention, pre-norm cross-attention on the prompt and the
pre-norm GELU feed-forward, each added to its residual; a final layer norm, one head per codebook,
and classifier-free guidance on float32 logits (``uncond + (cond - uncond) * scale``, the formula
of HF's ``ClassifierFreeGuidanceLogitsProcessor``). What differs is only the bookkeeping: every
row has its own position (it attends to its own cache entries up to it), its own prompt and its
own guidance scale, and keys and values are written in place into ``StaticCache``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from workers.runtime.engine.cache import StaticCache


class DecoderStep(nn.Module):
    """``forward(tokens, position, scale, guided, length)``: guided float32 logits of a step.

    ``tokens`` ``(b, codebooks)`` are the rows' current (delay-masked) tokens, ``position`` ``(b,)``
    where each is in its sequence, ``scale`` ``(b,)`` the guidance scale and ``guided`` ``(b,)``
    whether guidance is on. The step covers engine rows ``0 .. b-1`` (cache rows ``0 .. 2b-1``);
    ``length`` bounds how many self-attention positions are read (at least every row's position
    plus one). Returns ``(b, codebooks, vocab)``.
    """

    def __init__(self, model: Any, cache: StaticCache) -> None:
        super().__init__()
        decoder = model.decoder.model.decoder  # MusicgenForCausalLM -> MusicgenModel -> decoder
        self.embed_tokens = decoder.embed_tokens
        self.layers = decoder.layers
        self.layer_norm = decoder.layer_norm
        self.lm_heads = model.decoder.lm_heads
        positions = decoder.embed_positions
        if positions.weights.size(0) < cache.positions:  # transformers grows it the same way
            positions.make_weights(cache.positions, positions.embedding_dim)
        self.positions = positions
        self.cache = cache
        attention = self.layers[0].self_attn
        self.heads, self.head_dim = attention.num_heads, attention.head_dim
        self.scaling = attention.scaling

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, scale: torch.Tensor,
                guided: torch.Tensor, length: int) -> torch.Tensor:
        # The modules' own functions are called directly (F.linear, F.layer_norm, F.embedding):
        # the same kernels on the same weights, without nn.Module's per-call dispatch, which is
        # a good part of a small model's step.
        rows = 2 * tokens.shape[0]  # conditional and unconditional halves, interleaved
        tokens = tokens.repeat_interleave(2, dim=0)
        position = position.repeat_interleave(2, dim=0)
        # sum() from 0, as transformers adds the codebooks: the same float additions in order.
        embeds = sum(F.embedding(tokens[:, c], self.embed_tokens[c].weight)
                     for c in range(tokens.shape[1]))
        hidden = (embeds + self.positions.weights.index_select(0, position))[:, None, :]
        cache = self.cache
        write = cache.write_index(rows, position)
        self_mask = (cache.position_ids[:length][None, :] <= position[:, None])[:, None, None, :]
        cross_mask = cache.cross_mask[:rows]
        heads, head_dim = self.heads, self.head_dim
        for index, layer in enumerate(self.layers):
            residual = hidden
            hidden = _norm(layer.self_attn_layer_norm, hidden)
            attn = layer.self_attn
            query = _linear(attn.q_proj, hidden).view(rows, 1, heads, head_dim).transpose(1, 2)
            key = _linear(attn.k_proj, hidden).view(rows * heads, head_dim)
            value = _linear(attn.v_proj, hidden).view(rows * heads, head_dim)
            keys, values = cache.self_k[index], cache.self_v[index]
            keys.view(-1, head_dim).index_copy_(0, write, key)
            values.view(-1, head_dim).index_copy_(0, write, value)
            hidden = residual + self._attend(
                attn, query, keys[:rows, :, :length], values[:rows, :, :length], self_mask)

            residual = hidden
            hidden = _norm(layer.encoder_attn_layer_norm, hidden)
            attn = layer.encoder_attn
            query = _linear(attn.q_proj, hidden).view(rows, 1, heads, head_dim).transpose(1, 2)
            hidden = residual + self._attend(attn, query, cache.cross_k[index, :rows],
                                             cache.cross_v[index, :rows], cross_mask)

            residual = hidden
            hidden = _norm(layer.final_layer_norm, hidden)
            hidden = _linear(layer.fc2, layer.activation_fn(_linear(layer.fc1, hidden)))
            hidden = residual + hidden
        hidden = _norm(self.layer_norm, hidden)[:, 0]
        logits = torch.stack([_linear(head, hidden) for head in self.lm_heads], dim=1).float()
        cond, uncond = logits[0::2], logits[1::2]
        mixed = uncond + (cond - uncond) * scale[:, None, None]
        return torch.where(guided[:, None, None], mixed, cond)

    def prefill(self, row: int, tokens: torch.Tensor) -> None:
        """Write engine row ``row``'s self-attention keys and values for positions
        ``0 .. n-1`` of ``tokens`` ``(n, codebooks)`` in one pass (a continuation's clip, known
        in advance), as ``n`` steps would: both guidance halves, causal, on the cross-attention
        already set. Nothing past the last layer's keys and values is needed (no logits: the
        row's first step reads position ``n``)."""
        n = tokens.shape[0]
        embeds = sum(F.embedding(tokens[:, c], self.embed_tokens[c].weight)
                     for c in range(tokens.shape[1]))
        hidden = (embeds + self.positions.weights[:n])[None].expand(2, n, -1)
        cache, pair = self.cache, slice(2 * row, 2 * row + 2)
        heads, head_dim = self.heads, self.head_dim

        def split(states: torch.Tensor) -> torch.Tensor:  # (2, n, h*d) -> (2, h, n, d)
            return states.view(2, n, heads, head_dim).transpose(1, 2)

        for index, layer in enumerate(self.layers):
            residual = hidden
            hidden = _norm(layer.self_attn_layer_norm, hidden)
            attn = layer.self_attn
            key, value = split(_linear(attn.k_proj, hidden)), split(_linear(attn.v_proj, hidden))
            cache.self_k[index][pair, :, :n] = key
            cache.self_v[index][pair, :, :n] = value
            if index == len(self.layers) - 1:
                return
            query = split(_linear(attn.q_proj, hidden))
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                 scale=self.scaling)
            hidden = residual + _linear(attn.out_proj, out.transpose(1, 2).reshape(2, n, -1))

            residual = hidden
            hidden = _norm(layer.encoder_attn_layer_norm, hidden)
            attn = layer.encoder_attn
            out = F.scaled_dot_product_attention(
                split(_linear(attn.q_proj, hidden)), cache.cross_k[index, pair],
                cache.cross_v[index, pair], attn_mask=cache.cross_mask[pair], scale=self.scaling)
            hidden = residual + _linear(attn.out_proj, out.transpose(1, 2).reshape(2, n, -1))

            residual = hidden
            hidden = _norm(layer.final_layer_norm, hidden)
            hidden = residual + _linear(layer.fc2, layer.activation_fn(_linear(layer.fc1, hidden)))

    def _attend(self, attn: Any, query: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask,
                                             scale=self.scaling)
        out = out.transpose(1, 2).reshape(query.shape[0], 1, -1)
        return _linear(attn.out_proj, out)


def _linear(module: Any, hidden: torch.Tensor) -> torch.Tensor:
    """``module(hidden)`` for an ``nn.Linear``, without the module call."""
    out: torch.Tensor = F.linear(hidden, module.weight, module.bias)
    return out


def _norm(module: Any, hidden: torch.Tensor) -> torch.Tensor:
    """``module(hidden)`` for an ``nn.LayerNorm``, without the module call."""
    return F.layer_norm(hidden, module.normalized_shape, module.weight, module.bias, module.eps)
