"""The heartbeat record on real Redis: beats stamped by Redis's clock, held tags, claims.

Each test uses worker ids of its own in a Redis database claimed for this session
(tests/integration/conftest.py's ``redis_url``), so tests never see each other's workers.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from pipeline.infra import keys
from tests.integration.conftest import redis_url, wait_for  # noqa: F401 (the fixture)
from workers.heartbeat import Heartbeat, HeartbeatStore, new_worker_id


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:  # noqa: F811 (the imported fixture)
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def store(client: redis.Redis) -> HeartbeatStore:
    return HeartbeatStore(client, ttl=3900)


def wid() -> str:
    return new_worker_id(f"test-{uuid.uuid4().hex[:6]}@host")


def test_a_beat_records_the_held_jobs_with_redis_time(store: HeartbeatStore,
                                                      client: redis.Redis) -> None:
    worker = wid()
    before = store.now()
    beat = store.beat(worker, hostname="w1@host", held={"tag-1": "job-1", "tag-2": "job-2"},
                      beat_local=1234.5)
    assert before <= beat <= store.now()
    _, records = store.records()
    mine = next(r for r in records if r.worker_id == worker)
    assert mine.hostname == "w1@host" and mine.beat == pytest.approx(beat)
    assert mine.held == {"tag-1": "job-1", "tag-2": "job-2"} and mine.beat_local == 1234.5
    assert 0 < client.ttl(keys.worker_key(worker)) <= 3900  # a dead worker's record goes away
    store.beat(worker, hostname="w1@host", held={"tag-2": "job-2"}, beat_local=1235.0)
    mine = next(r for r in store.records()[1] if r.worker_id == worker)
    assert mine.held == {"tag-2": "job-2"}  # each beat replaces the held set: acked jobs leave it
    store.forget(worker)
    assert worker not in [r.worker_id for r in store.records()[1]]
    assert not client.exists(keys.worker_key(worker))


def test_a_beat_records_which_engine_serves_each_model(store: HeartbeatStore) -> None:
    worker = wid()
    serving = {"tiny": "static"}
    beat = Heartbeat(store, worker, hostname="w1@host", interval=60, held=dict,
                     engines=lambda: serving)
    beat.beat_once()
    assert next(r for r in store.records()[1] if r.worker_id == worker).engines == serving
    serving = {"tiny": "static", "tiny-melody": "hf"}  # a second model, decided later
    beat.beat_once()
    mine = next(r for r in store.records()[1] if r.worker_id == worker)
    assert mine.engines == {"tiny": "static", "tiny-melody": "hf"}

    def broken() -> dict[str, str]:
        raise RuntimeError("runner gone")

    Heartbeat(store, worker, hostname="w1@host", interval=60, held=dict,
              engines=broken).beat_once()  # the beat goes on, with nothing to say
    assert next(r for r in store.records()[1] if r.worker_id == worker).engines == {}
    store.forget(worker)


def test_a_new_process_under_the_same_name_is_another_worker() -> None:
    # A worker restarted by systemd keeps its node name; the dead one's record must survive it.
    assert new_worker_id("w1@host") != new_worker_id("w1@host")
    assert new_worker_id("w1@host").startswith("w1@host/")


def test_only_a_silent_worker_is_claimed_and_only_once(store: HeartbeatStore) -> None:
    silent, beating = wid(), wid()
    store.beat(silent, hostname="a", held={"t": "job-a"}, beat_local=time.time())
    wait_for(lambda: silent in store.silent(0.2), 10, "the first worker to be silent 0.2 s")
    store.beat(beating, hostname="b", held={"u": "job-b"}, beat_local=time.time())
    assert store.claim(beating, 0.2) is None  # it just beat
    results: list[object] = []
    barrier = threading.Barrier(4)

    def claim() -> None:
        barrier.wait()
        results.append(store.claim(silent, 0.2))

    threads = [threading.Thread(target=claim) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    won = [r for r in results if r is not None]
    assert len(results) == 4 and len(won) == 1  # four live workers raced: one got it
    record, silent_for = won[0]  # type: ignore[misc]
    assert record.held == {"t": "job-a"} and silent_for > 0.2
    assert silent not in [r.worker_id for r in store.records()[1]]
    assert store.claim(beating, -1) is not None  # the operator's --force: whatever its last beat


def test_the_beat_goes_on_while_the_process_is_busy(store: HeartbeatStore) -> None:
    """A worker in a long job is not silent: the beat has its own thread."""
    worker = wid()
    held = {"tag": "long-job"}
    beat = Heartbeat(store, worker, hostname="busy", interval=0.5, held=lambda: held)
    beat.start()
    try:
        def last_beat() -> float:
            return next(r.beat for r in store.records()[1] if r.worker_id == worker)

        # The "job": pure Python holding the interpreter, until three intervals have been beaten.
        # Each beat is seen while the loop runs: what is checked is that they kept coming, not
        # how recent the last one is (a loaded host may delay a beat, never stop them).
        seen = {last_beat()}
        n, deadline = 0, time.monotonic() + 60
        while max(seen) - min(seen) < 1.5:
            assert time.monotonic() < deadline, "the heartbeat stopped while the process was busy"
            n = sum(i * i for i in range(20000)) + n % 7
            seen.add(last_beat())
        assert len(seen) >= 3  # the first beat and more of them, not one late jump
        assert next(r.held for r in store.records()[1] if r.worker_id == worker) == held
    finally:
        beat.stop()
    assert worker not in [r.worker_id for r in store.records()[1]]  # a clean stop forgets it


def test_a_poke_records_a_new_job_before_the_next_interval(store: HeartbeatStore) -> None:
    worker = wid()
    held: dict[str, str] = {}
    beat = Heartbeat(store, worker, hostname="w", interval=300, held=lambda: dict(held))
    beat.start()
    try:
        held["tag-new"] = "job-new"
        beat.poke()  # what task_received does in the worker
        wait_for(lambda: next(r.held for r in store.records()[1] if r.worker_id == worker)
                 == {"tag-new": "job-new"}, 10, "the poked beat to record the new job")
    finally:
        beat.stop()
