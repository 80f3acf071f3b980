"""A list of items through a static engine in the calling thread, for what has no worker loop
around it: the engine's self-check, tests and benchmarks.

It is ``workers.runtime.musicgen.generate``'s contract (items in, audio in their order out, one
failed item fails the call) over the same admission rule as the worker's engine loop
(``scheduler.admissions``, oldest first into free rows); the items the engine does not run go
to HF generate first. The worker itself never calls it: its ``EngineLoop`` also handles drops,
several models, out-of-memory and the hard limit.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from pipeline.errors import PipelineError
from workers.generation.scheduler import admissions, without
from workers.generation.ticket import Ticket
from workers.runtime.batch import GeneratedAudio, GenerationItem, seed_of, validate_items
from workers.runtime.conditioning import GENERATE_LOCK
from workers.runtime.engine import StaticEngine
from workers.runtime.frames import item_frames, max_new_tokens_for
from workers.runtime.musicgen import generate as hf_generate
from workers.runtime.progress import ProgressCallback, ProgressReporter

log = logging.getLogger(__name__)


def generate_on(engine: StaticEngine, items: list[GenerationItem],
                progress: ProgressCallback | None = None) -> list[GeneratedAudio]:
    """Generate ``items`` with ``engine`` (rows admitted as they free up); results in order.

    Seeds are the items' own or drawn (``seed_of``), as on the HF path; items ``supports``
    refuses run through HF generate, before the engine's. Progress is one monotone fraction
    over both parts, HF's share first.
    """
    loaded = engine.loaded
    validate_items(items, max_duration_s=loaded.max_duration_s,
                   sampling_rate=loaded.sampling_rate, melody_supported=loaded.is_melody)
    # An item keeps its identity when it has a seed; one without gets a copy with its drawn seed.
    seeded = [item if item.seed is not None else replace(item, seed=seed_of(item))
              for item in items]
    here = [i for i, item in enumerate(seeded) if engine.supports(item)]
    elsewhere = [i for i in range(len(seeded)) if i not in set(here)]
    results: list[GeneratedAudio | None] = [None] * len(items)

    def steps_of(indices: list[int]) -> int:
        return sum(max_new_tokens_for(item_frames(seeded[i], loaded), loaded.delay_codebooks)
                   for i in indices)

    share = steps_of(elsewhere) / max(steps_of(elsewhere) + steps_of(here), 1)
    if elsewhere:
        log.info("%d item(s) the static engine does not run go to HF generate", len(elsewhere))
        hf_progress = None if progress is None else _scaled(progress, 0.0, share)
        for index, audio in zip(elsewhere, hf_generate(loaded, [seeded[i] for i in elsewhere],
                                                       hf_progress), strict=True):
            results[index] = audio
    reporter = ProgressReporter(
        None if progress is None else _scaled(progress, share, 1.0 - share), steps_of(here))
    waiting = [Ticket(loaded=loaded, item=seeded[i], key=None) for i in here]
    index_of = {id(ticket): index for ticket, index in zip(waiting, here, strict=True)}
    rows: dict[int, Ticket] = {}
    with GENERATE_LOCK:
        try:
            while waiting or rows:
                taken = admissions(waiting, loaded, engine.free_rows())
                waiting = without(waiting, taken)
                for ticket in taken:
                    assert ticket.item.seed is not None  # seeded above
                    rows[engine.admit(ticket.item, ticket.item.seed)] = ticket
                advancing = len(rows)  # each active row takes one step
                failed: list[PipelineError] = []
                for row, outcome in engine.step():
                    done = rows.pop(row)  # off ``rows`` first, failed or not: the step freed it
                    if isinstance(outcome, PipelineError):
                        failed.append(outcome)
                    else:
                        results[index_of[id(done)]] = outcome
                if failed:  # the batch contract: one failed item fails the call
                    raise failed[0]
                for _ in range(advancing):
                    reporter.step()
        finally:
            for row in rows:
                engine.release(row)
    reporter.finish(f"generated {len(items)} item(s)")
    return [r for r in results if r is not None]


def _scaled(progress: ProgressCallback, start: float, span: float) -> ProgressCallback:
    def report(fraction: float, message: str) -> None:
        progress(start + span * fraction, message)

    return report
