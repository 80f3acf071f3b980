"""Where one decode step of the static engine goes, and what its matrix products cost alone.

    .venv/bin/python benchmarks/step_profile.py [--model small@2] [--rows 1] [--steps 40]
        [--device auto] [--dtype fp32] [--smoke]

``benchmarks/gpu.py`` times whole calls (text encoding and EnCodec decode included) and sets
them against a memory floor. This script answers the next question, for one model: how long a
bare engine step takes (``StaticEngine.step`` with ``--rows`` jobs admitted, nothing else), which
operators take that time (torch.profiler, self time), and what the step's own matrix products
cost on their own, run over the model's own decoder weights (every linear a step applies, see
``gpu.step_weight_bytes``):

- ``F.linear`` on the step's rows (2 x ``--rows``: classifier-free guidance doubles them), the way
  both the engine and HF generate run them;
- ``F.linear`` on half the rows (no guidance);
- the same products with each weight stored transposed (``x @ Wt``), a layout some BLAS runs
  faster for few rows, and whether its results are bitwise equal to ``F.linear``'s: if not,
  adopting it would cost the engine its token-for-token equality with HF generate.

Medians over ``--steps`` runs each, after a warm-up. Figures are timings of this host: run it
on an idle one.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

from benchmarks.gpu import DTYPES, build
from workers.runtime import GenerationItem
from workers.runtime.device import resolve_device
from workers.runtime.engine import StaticEngine

WARMUP = 3


def step_linears(loaded: Any) -> list[torch.nn.Linear]:
    """Every linear one decode step applies, in order: per layer self-attention q/k/v/out,
    cross-attention q/out (its k/v run once per job), fc1, fc2; then the LM heads."""
    causal = loaded.model.decoder
    linears: list[torch.nn.Linear] = []
    for layer in causal.model.decoder.layers:
        linears += [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                    layer.self_attn.out_proj, layer.encoder_attn.q_proj,
                    layer.encoder_attn.out_proj, layer.fc1, layer.fc2]
    return linears + list(causal.lm_heads)


def median_ms(run: Callable[[], object], count: int, device: str) -> float:
    for _ in range(WARMUP):
        run()
    times = []
    for _ in range(count):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def products(loaded: Any, rows: int, count: int, device: str) -> dict[str, Any]:
    """The step's products alone: F.linear on ``rows`` and ``rows // 2`` rows, and on ``rows``
    with transposed weights (with whether that is bitwise F.linear's result)."""
    weights = [linear.weight.detach() for linear in step_linears(loaded)]
    stored_t = [w.t().contiguous() for w in weights]
    inputs = [torch.randn(rows, w.shape[1], dtype=w.dtype, device=device) for w in weights]
    with torch.inference_mode():
        equal = all(torch.equal(F.linear(x, w), x @ wt)
                    for x, w, wt in zip(inputs, weights, stored_t, strict=True))
        return {
            "weights_mb": sum(w.numel() * w.element_size() for w in weights) / 1e6,
            "linear_ms": median_ms(lambda: [F.linear(x, w) for x, w in zip(inputs, weights, strict=True)],
                                   count, device),
            "half_ms": median_ms(lambda: [F.linear(x[:max(rows // 2, 1)], w)
                                          for x, w in zip(inputs, weights, strict=True)], count, device),
            "transposed_ms": median_ms(lambda: [x @ wt for x, wt in zip(inputs, stored_t, strict=True)],
                                       count, device),
            "bitwise_equal": equal,
        }


def bare_step(loaded: Any, rows: int, count: int, device: str) -> tuple[float, str]:
    """The median ms of ``StaticEngine.step`` with ``rows`` long jobs admitted, and the profiler's
    table of one more round of steps."""
    engine = StaticEngine(loaded, max_rows=rows)
    # Long enough that no row finishes (and no EnCodec decode runs) within the measured steps.
    duration = min(loaded.max_duration_s, 20.0)
    needed = WARMUP + 2 * count
    if needed >= duration * loaded.frame_rate:
        raise SystemExit(f"--steps {count} is too many for a {duration:g} s job; lower it")
    for row in range(rows):
        engine.admit(GenerationItem(prompt=f"a long piece {row}", duration_s=duration, seed=row,
                                    temperature=1.0, top_k=250, guidance_scale=3.0), row)
    step_ms = median_ms(engine.step, count, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(count):
            engine.step()
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return step_ms, prof.key_averages().table(sort_by=sort, row_limit=8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small@2",
                        help="tiny, or small/medium/large with an optional @layers")
    parser.add_argument("--rows", type=int, default=1, help="jobs stepping together")
    parser.add_argument("--steps", type=int, default=40, help="timed runs of each measurement")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, 3 steps (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.steps = "tiny", 3
    device = resolve_device(args.device)
    if device == "cpu":
        torch.set_num_threads(1)  # as benchmarks/gpu.py runs on the CPU
    with tempfile.TemporaryDirectory() as folder:
        loaded = build(args.model, args.dtype, device, Path(folder))
        step_ms, table = bare_step(loaded, args.rows, args.steps, device)
        alone = products(loaded, 2 * args.rows, args.steps, device)
    print(f"{args.model} {args.dtype} on {device}, {args.rows} job(s) = {2 * args.rows} rows "
          f"with guidance, medians of {args.steps}")
    print(f"bare engine step: {step_ms:.2f} ms")
    print(table)
    print(f"the step's products alone ({len(step_linears(loaded))} linears, "
          f"{alone['weights_mb']:.1f} MB of weights):")
    print(f"  F.linear, {2 * args.rows} rows:           {alone['linear_ms']:.2f} ms "
          f"({alone['linear_ms'] / step_ms:.0%} of the step)")
    print(f"  F.linear, {args.rows} row(s) (no guidance): {alone['half_ms']:.2f} ms")
    print(f"  x @ Wt (weights stored transposed), {2 * args.rows} rows: "
          f"{alone['transposed_ms']:.2f} ms, bitwise equal to F.linear: "
          f"{'yes' if alone['bitwise_equal'] else 'no'}")
    print(f"so no loop that runs these products as F.linear steps faster than "
          f"{alone['linear_ms']:.2f} ms here")


if __name__ == "__main__":
    main()
