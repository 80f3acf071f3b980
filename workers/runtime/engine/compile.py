"""The compiled step: ``torch.compile`` over a few fixed row counts, or the eager step.

Shapes stay static so the compiled graphs (and on CUDA the graphs ``reduce-overhead`` captures)
are reused: a step runs over the first ``b`` rows for ``b`` the next row bucket at or above the
highest active row, and reads ``n`` self-attention positions for ``n`` the next length bucket at
or above the furthest row's position plus one (256, 512, 1024, then the whole window: a step of
10 s clips reads 512 positions, not 1503; issue 22, defect 3). The eager step reads up to the
furthest row in finer steps, a length that would be a new graph every 64 steps. One graph per
(row bucket, length bucket). Compilation is lazy, so every pair is run at construction; whatever
goes wrong there means "run eagerly", never a failed job.

Dynamo caches compiled graphs per code object, and every engine's step is the same code
(``DecoderStep.forward``): by default one engine at 64 rows (7 buckets) leaves room for one more
graph under dynamo's recompile limit (8), and a second engine (two models, or a rebuild at a new
``max_rows``) would pass it, after which dynamo runs the step eagerly with only a log warning
while ``compiled`` still said True. So each engine's compile is a region of its own
(``isolate_recompiles``) with room for its own graphs, and ``fullgraph`` turns a limit that is
still hit (or a graph break) into an exception, which ``compile_step`` or the engine's step
answers by running eagerly with ``compiled = False``: compiled or honestly not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

StepFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int],
                        torch.Tensor]


def row_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, ... below ``max_rows``, then ``max_rows``: few graphs, at most 2x padding."""
    buckets, size = [], 1
    while size < max_rows:
        buckets.append(size)
        size *= 2
    return [*buckets, max_rows]


def bucket_of(rows: int, buckets: list[int]) -> int:
    """The smallest bucket that holds ``rows`` rows."""
    return next(bucket for bucket in buckets if bucket >= rows)


DEFAULT_LENGTHS = (256, 512, 1024)


def length_buckets(window: int, lengths: Sequence[int] | None = None) -> list[int]:
    """The self-attention lengths a compiled step reads: each of ``lengths`` (by default
    ``DEFAULT_LENGTHS``) below ``window``, in order, then ``window`` itself."""
    chosen = DEFAULT_LENGTHS if lengths is None else lengths
    return [*sorted({n for n in chosen if 0 < n < window}), window]


def recompile_limit(graphs: int) -> int:
    """Graphs one engine's step may compile: one per (row, length) bucket, and as many again for
    guards that fail once (e.g. a first call inside and outside inference mode) before it
    settles."""
    return 2 * graphs


def compile_step(step: torch.nn.Module, shapes: list[tuple[int, int]], device: torch.device,
                 warm_up: Callable[[StepFunction, int, int], None]) -> StepFunction | None:
    """``step`` compiled and run once per ``(rows, length)`` of ``shapes`` by ``warm_up``; None
    if any of it failed.

    ``reduce-overhead`` on CUDA (CUDA graphs replay the whole step: no per-kernel launch cost),
    the default mode elsewhere (CUDA graphs do not exist there).
    """
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    try:
        # torch 2.13's typing overloads of compile() omit the last two (its implementation
        # takes them, as documented).
        compiled: StepFunction = torch.compile(  # type: ignore[call-overload]
            step, mode=mode, dynamic=False, fullgraph=True, isolate_recompiles=True,
            recompile_limit=recompile_limit(len(shapes)))
        for rows, length in shapes:
            warm_up(compiled, rows, length)
    except Exception as e:  # noqa: BLE001 - any compiler failure means "run eagerly"
        log.warning("torch.compile of the decode step failed (%s: %s); running it eagerly",
                    type(e).__name__, e)
        return None
    return compiled
