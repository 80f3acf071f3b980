"""Redis Sentinel fails over while jobs are queued and running: no accepted job is lost, none runs
twice, each is charged once, and an enqueue during the switch is refused with a typed
``service_unavailable`` and a retry hint.

One topology for the module (tests/integration/sentinel.py: a master, a replica and three
sentinels on loopback ports), one real worker (threads pool, the production default, with
tests/integration/faults.py loaded so jobs can be held at the model boundary) and a producer,
both on the ``sentinel://`` URL. Each test fails the master over one way, then waits for the
topology to be whole again so the next test starts from a master with a replica. Every wait is
on a state; the bounds only fail a broken run.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import pipeline
from pipeline import GenerationRequest, JobHandle
from workers.heartbeat import HeartbeatStore

from .conftest import Worker, WorkerFactory, base_env, held, release, settled_ledger, wait_for
from .sentinel import SentinelTopology

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HELD_JOBS = 2  # running, held at the model, when the master goes
ADMIT_JOBS = 2  # started, held just before the breaker admits them: admitted during the outage
QUEUED_JOBS = 2  # still in the queue
SLOTS = HELD_JOBS + ADMIT_JOBS
SWITCH_BOUND_S = 60  # a failover with down-after 1 s takes a few seconds; this only fails a hang
JOB_BOUND_S = 180
# A hard limit well past the hold, and the production visibility timeout: nothing here may rely on
# the broker handing a job back after a shortened timeout.
LIMITS = {"MUSICGEN_WORKER__SOFT_TIME_LIMIT": "120", "MUSICGEN_WORKER__HARD_TIME_LIMIT": "150",
          "MUSICGEN_WORKER__TIME_LIMIT_PER_SECOND": "0"}
# One slot per held job and a prefetch of one per slot: once the held jobs fill the slots the
# worker asks the broker for nothing, so the kill cannot fall between kombu's BRPOP of a message
# and its write of that message to the unacked set (two commands: a kill between them loses the
# message; docs/operations.md "What is promised when things fail" says so).
WORKER = {"MUSICGEN_WORKER__CONCURRENCY": str(SLOTS), "MUSICGEN_WORKER__PREFETCH_MULTIPLIER": "1",
          "MUSICGEN_GENERATION__MAX_BATCH_SIZE": str(HELD_JOBS),
          "MUSICGEN_RECOVERY__HEARTBEAT_INTERVAL": "0.5"}


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    topo = SentinelTopology(tmp_path_factory.mktemp("sentinel"))
    try:
        topo.start()
        yield topo
    finally:
        topo.stop()


@pytest.fixture(scope="module")
def sentinel_worker(topology: SentinelTopology, workdir: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Worker, Path]]:
    folder = tmp_path_factory.mktemp("sentinel-worker")
    factory = WorkerFactory(workdir, topology.url, folder)
    try:
        yield factory.start(pool="threads", faults=True, broker=topology.url, **LIMITS, **WORKER), folder
    finally:
        factory.stop_all()


@pytest.fixture(autouse=True)
def producer_env(topology: SentinelTopology, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in base_env(workdir, topology.url, **LIMITS).items():
        if key.startswith("MUSICGEN_"):
            monkeypatch.setenv(key, value)


@pytest.fixture
def producer(producer_env: None, workdir: Path) -> pipeline.Producer:
    return pipeline.Producer(pipeline.load_settings(cwd=workdir))


def held_by_worker(topology: SentinelTopology, worker: Worker) -> set[str]:
    """The job ids in the worker's heartbeat record (the messages it holds)."""
    with topology.master_client() as client:
        _, records = HeartbeatStore(client, ttl=60).records()
    return {job for r in records if r.hostname == worker.name for job in r.held.values()}


def enqueue_through_switch(producer: pipeline.Producer, topology: SentinelTopology, old: int,
                           tag: str) -> tuple[dict[str, JobHandle], list[pipeline.ServiceUnavailable], float]:
    """Enqueue again and again until one is accepted by the new master; every refusal must be a
    typed ``service_unavailable`` with a retry hint (anything else fails the test). Returns the
    accepted handles by prompt, the refusals and the seconds until the first acceptance on the
    new master. A refused job may still be queued (the replica wait refuses after the publish),
    so every try has a prompt of its own.
    """
    accepted: dict[str, JobHandle] = {}
    refusals: list[pipeline.ServiceUnavailable] = []
    started = time.monotonic()
    while True:
        assert time.monotonic() - started < SWITCH_BOUND_S, f"no enqueue accepted; {refusals[-3:]}"
        try:
            prompt = f"{tag} switch {len(accepted) + len(refusals)}"
            accepted[prompt] = producer.enqueue(
                GenerationRequest(prompt=prompt, duration=0.5, format="wav"))
        except pipeline.ServiceUnavailable as refused:
            assert refused.code == "service_unavailable", refused  # not backpressure: paced
            assert float((refused.details or {}).get("retry_after") or 0) > 0, refused.to_dict()
            refusals.append(refused)
        else:
            if topology.master_port() != old:
                return accepted, refusals, time.monotonic() - started
        # A caller's pacing between tries (not a wait for a state): ten a second stays far
        # below the backlog limit however long the sentinels take to name the new master.
        time.sleep(0.1)


def enqueue_jobs(producer: pipeline.Producer, prompt: str, count: int) -> dict[str, JobHandle]:
    """Enqueue ``count`` jobs before the failover, as a caller should: with the replica wait, a
    replica that lags past ``broker.wait_timeout_ms`` (a loaded CI host) refuses an enqueue whose
    job is already queued, and the refusal says to enqueue again with the same ``job_id``; that
    returns the same job once a replica has it, never a second one."""
    handles: dict[str, JobHandle] = {}
    for i in range(count):
        request = GenerationRequest(prompt=f"{prompt} {i}", duration=0.5, format="wav",
                                    job_id=uuid.uuid4().hex)
        started = time.monotonic()
        while f"{prompt} {i}" not in handles:
            try:
                handles[f"{prompt} {i}"] = producer.enqueue(request)
            except pipeline.ServiceUnavailable as refused:
                assert refused.details and request.job_id in refused.details["job_ids"], refused
                assert time.monotonic() - started < SWITCH_BOUND_S, refused
                time.sleep(float(refused.details.get("retry_after") or 1))
        assert handles[f"{prompt} {i}"].id == request.job_id
    return handles


def run_failover(producer: pipeline.Producer, topology: SentinelTopology, worker: tuple[Worker, Path],
                 how: str, record_property: object) -> None:
    _, folder = worker
    hold = f"{how}-hold"
    wait_for(topology.healthy, SWITCH_BOUND_S, "a master with a replica the sentinels can promote")
    admit_hold = f"{how}-admit"
    running = enqueue_jobs(producer, f"{how} running FAULT:hold={hold}", HELD_JOBS)
    admitting = enqueue_jobs(producer, f"{how} admitting FAULT:hold-admit={admit_hold}", ADMIT_JOBS)
    wait_for(lambda: held(folder, hold) and held(folder, admit_hold), JOB_BOUND_S,
             "jobs to be held at the model and before admission")
    wait_for(lambda: held_by_worker(topology, worker[0]) == {h.id for h in [*running.values(), *admitting.values()]},
             JOB_BOUND_S, "the worker to hold every held job (its slots and prefetch full)")
    queued = enqueue_jobs(producer, f"{how} queued", QUEUED_JOBS)

    old = topology.kill9_master() if how == "kill9" else topology.sentinel_failover()
    # While there is no master the running jobs end, and the started ones go on to their
    # breaker admission and delivery count (issue 27: there they ended FAILED).
    release(folder, hold)
    release(folder, admit_hold)
    during, refusals, switch_s = enqueue_through_switch(producer, topology, old, how)
    print(f"{how}: enqueue refused {len(refusals)} times, accepted again after {switch_s:.1f} s")
    record_property(f"enqueue_unavailable_s[{how}]", round(switch_s, 2))  # type: ignore[operator]

    by_prompt = {**running, **admitting, **queued, **during}
    accepted = list(by_prompt.values())
    # The ledger (SQL) and the files are the worker's record of what ran; the result backend's
    # state is what a caller's wait() reads, and a failover can lose it (below).
    rows = settled_ledger(producer.quota, [h.id for h in accepted], timeout=JOB_BOUND_S)
    assert {r["status"] for r in rows.values()} == {"succeeded"}, rows  # each charged once
    assert all(r["attempts"] == 1 for r in rows.values()), rows  # none started twice
    made = [line.split(" ", 1)[1] for line in (folder / "attempts.log").read_text().splitlines()]
    made = [prompt for prompt in made if prompt.startswith(how)]
    assert len(made) == len(set(made)), made  # no job generated twice
    assert set(by_prompt) <= set(made), made  # every accepted job generated
    outputs = Path(producer.settings.storage.output_dir)
    assert all((outputs / f"{h.id}.wav.json").is_file() for h in accepted)
    lost = [h.id for h in accepted if h.result() is None]
    record_property(f"results_lost[{how}]", len(lost))  # type: ignore[operator]
    print(f"{how}: {len(accepted)} jobs accepted, all made once; results lost: {len(lost)}")
    if how == "kill9":
        # A killed master takes no write after its death: every result is on the new master.
        assert lost == [], lost
    # SENTINEL FAILOVER is not coordinated: the old master takes writes between the replica's
    # promotion and its own demotion, then resyncs them away. A job that finishes in that window
    # loses its SUCCESS state and its ack (the file, the sidecar and the ledger stay); its
    # message comes back (when kombu reconnects, or after the visibility timeout), and that
    # delivery restores the state from the sidecar (workers/outage.py). When it comes back is
    # not a state this test can wait on, so results_lost only counts it (docs/operations.md says so).
    if how == "kill9":
        # The outage outlasted redis-py's own retries: workers/outage.py's waits carried the
        # admissions through it (before them, such a job ended FAILED).
        assert "cannot reach Redis for the circuit breaker of tiny" in worker[0].log_text()
        topology.rejoin(old)


def test_no_accepted_job_is_lost_when_the_master_is_killed(
        topology: SentinelTopology, sentinel_worker: tuple[Worker, Path],
        producer: pipeline.Producer, record_property: object) -> None:
    run_failover(producer, topology, sentinel_worker, "kill9", record_property)


def test_no_accepted_job_is_lost_in_a_sentinel_failover_with_the_replica_wait(
        topology: SentinelTopology, sentinel_worker: tuple[Worker, Path], workdir: Path,
        monkeypatch: pytest.MonkeyPatch, record_property: object) -> None:
    """SENTINEL FAILOVER is not coordinated: the old master takes writes between the promotion
    and its demotion and then drops them, so an enqueue it accepts then is lost (one run here
    queued 50 on it). With broker.wait_replicas = 1 it has no replica left to confirm them, and
    the producer refuses them (retryable): every job it accepts survives."""
    monkeypatch.setenv("MUSICGEN_BROKER__WAIT_REPLICAS", "1")
    prod = pipeline.Producer(pipeline.load_settings(cwd=workdir))
    assert prod.settings.broker.wait_replicas == 1
    run_failover(prod, topology, sentinel_worker, "failover", record_property)
