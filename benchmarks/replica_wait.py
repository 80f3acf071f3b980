"""What ``broker.wait_replicas = 1`` costs an enqueue: its latency with and without the WAIT for
one replica, side by side, on a real Sentinel topology.

    .venv/bin/python benchmarks/replica_wait.py [--enqueues 300] [--timeout-ms 250] [--smoke]

The topology is tests/integration/sentinel.py's (a master, a replica and three sentinels,
redis-server processes of its own on free loopback ports, removed afterwards). The producer is
the real one on the ``sentinel://`` URL with a migrated SQLite ledger in a temp folder: each
enqueue is the whole path (validation, id claim, breaker and backlog checks, the quota
reservation, the QUEUED state, the publish), then with the setting on the fence write and
``WAIT 1 <timeout>``. No worker runs: the jobs stay queued. The two settings alternate in
blocks of 10 so that drift in the machine's load hits both alike. On the loopback a replica
acknowledges in well under a millisecond; across hosts add one network round trip.
``--smoke`` runs 20 enqueues per setting (the suite runs it to keep the script working).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ is not installed; the topology is the tests' own

BLOCK = 10


def producer(url: str, folder: Path, wait_replicas: int, timeout_ms: int) -> object:
    import pipeline
    from pipeline.quota.configured import prepare_database

    settings = pipeline.load_settings(overrides={
        "broker": {"url": url, "wait_replicas": wait_replicas, "wait_timeout_ms": timeout_ms},
        "database": {"url": f"sqlite:///{folder}/ledger.db"},
        "quotas": {"default_tier": "enterprise"}, "rate_limit": {"enabled": False},
        "monitoring": {"backlog_threshold": 0}})
    prepare_database(settings)
    return pipeline.Producer(settings)


def enqueue_confirmed(prod: object, request: object) -> int:
    """Enqueue as a caller must with the replica wait: a refusal (the replica confirmed nothing
    within the timeout, e.g. on a loaded host) leaves the job queued and asks for the same
    ``job_id`` again, which returns that job once a replica has it. Returns the refusals."""
    import pipeline

    for refused in range(100):
        try:
            prod.enqueue(request)  # type: ignore[attr-defined]
            return refused
        except pipeline.ServiceUnavailable:
            continue
    raise RuntimeError("no replica confirmed a job in 100 tries")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--enqueues", type=int, default=300, help="per setting")
    parser.add_argument("--timeout-ms", type=int, default=250)
    parser.add_argument("--smoke", action="store_true", help="20 enqueues per setting")
    args = parser.parse_args(argv)
    count = 20 if args.smoke else args.enqueues
    for name in [n for n in os.environ if n.startswith("MUSICGEN_")]:
        del os.environ[name]

    from pipeline import GenerationRequest
    from tests.integration.sentinel import SentinelTopology

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        topo = SentinelTopology(folder)
        try:
            topo.start()
            prods = {0: producer(topo.url, folder, 0, args.timeout_ms),
                     1: producer(topo.url, folder, 1, args.timeout_ms)}
            times: dict[int, list[float]] = {0: [], 1: []}
            refusals = 0
            for prod in prods.values():  # connections, sentinel lookups, first SQL: not measured
                enqueue_confirmed(prod, GenerationRequest(prompt="warm-up", duration=1.0,
                                                          job_id=uuid.uuid4().hex))
            while len(times[1]) < count:
                for setting, prod in prods.items():
                    for _ in range(min(BLOCK, count - len(times[setting]))):
                        started = time.perf_counter()
                        refusals += enqueue_confirmed(prod, GenerationRequest(
                            prompt="bench", duration=1.0, job_id=uuid.uuid4().hex))
                        times[setting].append((time.perf_counter() - started) * 1000)
        finally:
            topo.stop()

    def row(label: str, ms: list[float]) -> str:
        ms = sorted(ms)
        p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
        return f"{label:<22}{len(ms):>6}{statistics.median(ms):>10.2f}{p95:>10.2f}{statistics.fmean(ms):>10.2f}"

    print(f"enqueue latency, ms, on a loopback Sentinel topology (1 master, 1 replica); "
          f"WAIT timeout {args.timeout_ms} ms")
    print(f"{'setting':<22}{'n':>6}{'p50':>10}{'p95':>10}{'mean':>10}")
    print(row("wait_replicas = 0", times[0]))
    print(row("wait_replicas = 1", times[1]))
    cost = statistics.median(times[1]) - statistics.median(times[0])
    print(f"cost of waiting for one replica: {cost:+.2f} ms at p50")
    print(f"refused (replica later than the timeout; enqueued again with the same job_id): {refusals}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
