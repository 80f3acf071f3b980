"""The self-attention cache is one tensor per layer written in place, so the compiled step never
copies it (issue 22, defect 2): read from the code inductor generates for one row bucket."""

from __future__ import annotations

import math
import re

import torch
from torch._inductor.utils import run_and_get_code

from workers.runtime import LoadedModel
from workers.runtime.engine import StaticEngine


def test_the_compiled_step_allocates_no_buffer_the_size_of_a_layers_cache(
        tiny_model: LoadedModel) -> None:
    engine = StaticEngine(tiny_model, max_rows=4)
    cache = engine._cache
    assert len(cache.self_k) == len(cache.self_v) == len(engine._step.layers)
    layer = cache.self_k[0]
    addresses = [t.data_ptr() for t in (*cache.self_k, *cache.self_v)]
    step = torch.compile(engine._step, dynamic=False)
    try:
        with torch.inference_mode():
            _, code = run_and_get_code(step, engine._tokens[:1], engine._position[:1],
                                       engine._scale[:1], engine._guided[:1], engine._steps_max)
    finally:  # this graph must not count toward dynamo's recompile limit in later tests
        torch._dynamo.reset()
    shapes = re.findall(r"empty_strided_\w+\(\(([^)]*)\)", "\n".join(code))
    assert shapes, "no allocation found: inductor's output format changed"
    sizes = [math.prod(int(n) for n in shape.split(",") if n.strip()) for shape in shapes]
    # Writing through a view of one all-layers tensor, inductor allocated a whole layer's
    # (2*rows*heads*positions, head_dim) and copied the cache through it every step.
    assert max(sizes) < layer.numel() // 4, sorted(set(shapes))
    assert [t.data_ptr() for t in (*cache.self_k, *cache.self_v)] == addresses
    # The step wrote row 0's keys at position 0 of every layer, in place.
    assert all(bool(keys[0:2, :, 0].abs().sum() > 0) for keys in cache.self_k)
