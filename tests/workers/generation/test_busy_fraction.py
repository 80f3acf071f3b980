"""The generation loop's busy fraction (the gauge ``musicgen_generation_busy_fraction`` and
benchmarks/throughput.py's "loop busy") stays within [0, 1] under a full queue, where the
static engine's jobs overlap: each job's generate runs from its admission to its last step,
beside the rows that joined after it."""

from __future__ import annotations

import time
from concurrent.futures import Future

from benchmarks.throughput import union_seconds
from workers.generation import BatchStats, EngineLoop, HfLoop
from workers.runtime.batch import GeneratedAudio, GenerationItem
from workers.runtime.engine import StaticEngine
from workers.runtime.loaded import LoadedModel
from workers.runtime.musicgen import generate

WAIT = 120.0  # a bound on waiting for the jobs, not a measured duration
# Uneven lengths: rows free at different steps and waiting jobs join the running ones.
DURATIONS = [1.6, 0.4, 0.8, 0.3, 1.2, 0.5, 0.7, 0.3, 0.9, 0.4]


def test_busy_fraction_stays_within_0_and_1_under_a_full_queue(tiny_model: LoadedModel) -> None:
    stats: list[BatchStats] = []
    finished: dict[int, float] = {}
    loop = EngineLoop(lambda model, rows: StaticEngine(model, max_rows=rows),
                             HfLoop(generate, max_batch_size=4, batch_wait_s=0.0),
                             max_batch_size=4, on_batch=stats.append)
    assert loop.prepare(tiny_model)
    started = time.monotonic()
    tickets = [loop.submit(tiny_model, GenerationItem(prompt=f"job {i}", duration_s=d, seed=i), "k")
               for i, d in enumerate(DURATIONS)]  # all at once: a full queue

    def note_finish(i: int) -> None:
        def done(_: Future[GeneratedAudio]) -> None:
            finished[i] = time.monotonic()
        tickets[i].future.add_done_callback(done)

    for i in range(len(tickets)):
        note_finish(i)
    audio = [t.future.result(WAIT) for t in tickets]
    wall = max(finished.values()) - started

    assert max(a.batch_size for a in audio) == 4 and len(stats) > 0
    assert all(0.0 <= s.busy_fraction <= 1.0 for s in stats), [s.busy_fraction for s in stats]
    assert stats[-1].busy_fraction > 0.5  # the queue was full: the loop hardly waited
    # The benchmark's figure: the union of the jobs' generate intervals, within the wall time;
    # the old sum of generate / batch_size counted the overlap of later rows twice.
    generating = [(finished[i] - a.generate_seconds, finished[i]) for i, a in enumerate(audio)]
    assert union_seconds(generating) <= wall
    assert sum(a.generate_seconds / a.batch_size for a in audio) > union_seconds(generating)


def test_union_seconds_counts_overlapping_time_once() -> None:
    assert union_seconds([]) == 0.0
    assert union_seconds([(0.0, 10.0), (1.0, 3.0), (2.0, 12.0), (20.0, 21.0)]) == 13.0
    assert union_seconds([(5.0, 6.0), (0.0, 1.0)]) == 2.0
