"""What the HTTP gateway adds: requests per second and p50/p99 latency of ``POST /v1/jobs``
beside a bare endpoint that returns 200, in the same app, under the same load.

    .venv/bin/python benchmarks/api.py [--requests 2000] [--concurrency 8] [--warmup 50] [--smoke]

Everything but the GPU is real: the gateway (``create_app``) under uvicorn in its own process,
with one extra route, ``GET /bench/bare`` (no auth, no body, 200); a claimed empty database on
the Redis at 127.0.0.1:6379 as the broker (only its keys are deleted afterwards); a migrated
SQLite ledger in a temp folder; a real API key. Each ``POST /v1/jobs`` goes the whole way a
job's request goes: body read and validated, key looked up (then cached for 10 s, as in
production), the per-key rate limit in Redis (set high enough never to refuse), the producer's
validation, id claim, breaker and backlog checks, the quota reservation in SQLite and the
publish to Redis. No worker runs: the jobs stay queued (no generation is measured).

The load generator is --concurrency threads in this process, each with its own keep-alive
``httpx.Client``, sending --requests requests per endpoint in all; latency is per request from
send to the whole response. The gateway's access log is off (it logs at INFO, not configured
here). Numbers depend on the machine; run it on an idle one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks/ is not installed: share throughput.py's helpers

from benchmarks.throughput import claimed_redis_db, pct  # noqa: E402

BARE = "/bench/bare"
BODY = {"prompt": "benchmark: warm lo-fi piano", "duration": 1.0, "model": "tiny"}


def serve(port: int) -> None:
    """The child: the gateway from this environment's settings, plus the bare route."""
    import uvicorn
    from fastapi import Response

    from pipeline.config import load_settings
    from pipeline.gateway.app import create_app

    app = create_app(load_settings())

    def bare() -> Response:
        return Response(status_code=200)

    app.add_api_route(BARE, bare, methods=["GET"], include_in_schema=False)
    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_level="warning")


@dataclass
class Row:
    name: str
    requests: int
    concurrency: int
    wall_s: float
    latencies_ms: list[float]

    @property
    def per_s(self) -> float:
        return self.requests / self.wall_s


def load(base: str, method: str, path: str, headers: dict[str, str], body: Any, requests: int,
         concurrency: int, expect: int) -> tuple[float, list[float]]:
    """(wall seconds, latency ms of each request): ``requests`` over ``concurrency`` threads."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    shares = [requests // concurrency + (1 if i < requests % concurrency else 0)
              for i in range(concurrency)]
    start_line = threading.Barrier(concurrency + 1)

    def worker(count: int) -> None:
        mine: list[float] = []
        with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
            start_line.wait()
            for _ in range(count):
                t0 = time.perf_counter()
                response = client.request(method, path, json=body)
                mine.append((time.perf_counter() - t0) * 1000)
                if response.status_code != expect:
                    with lock:
                        failures.append(f"{response.status_code} {response.text[:200]}")
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(n,)) for n in shares]
    for thread in threads:
        thread.start()
    start_line.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - t0
    if failures:
        raise SystemExit(f"{method} {path}: {len(failures)} unexpected answers, e.g. {failures[0]}")
    return wall, latencies


def report(rows: list[Row]) -> None:
    print(f"{'endpoint':<18} {'requests':>8} {'conc':>5} {'req/s':>9} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'mean ms':>8}")
    for row in rows:
        lat = row.latencies_ms
        print(f"{row.name:<18} {row.requests:>8} {row.concurrency:>5} {row.per_s:>9.1f} "
              f"{pct(lat, 0.50):>8.2f} {pct(lat, 0.99):>8.2f} {statistics.fmean(lat):>8.2f}")
    print()
    bare, post = rows
    print(f"POST /v1/jobs adds {pct(post.latencies_ms, 0.5) - pct(bare.latencies_ms, 0.5):.2f} ms "
          f"at p50 over the bare endpoint and serves {post.per_s / bare.per_s:.0%} of its "
          "requests per second")


def run(args: argparse.Namespace) -> list[Row]:
    from pipeline.config import load_settings
    from pipeline.gateway.keystore import ApiKeyStore
    from pipeline.quota import make_engine
    from pipeline.quota.configured import prepare_database

    with claimed_redis_db() as broker, tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        print(f"using Redis database {broker}", file=sys.stderr)
        port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MUSICGEN_")}
        env.update({
            "MUSICGEN_ENV": "development", "MUSICGEN_BROKER__URL": broker,
            "MUSICGEN_DATABASE__URL": f"sqlite:///{tmp}/quota.db",
            "MUSICGEN_APP__DATA_DIR": f"{tmp}/data", "MUSICGEN_STORAGE__OUTPUT_DIR": f"{tmp}/out",
            "MUSICGEN_STORAGE__TEMP_DIR": f"{tmp}/tmp",
            "MUSICGEN_QUOTAS__DEFAULT_TIER": "enterprise",  # unlimited: nothing is refused
            "MUSICGEN_MONITORING__BACKLOG_THRESHOLD": "1000000000",  # checked, never reached
            "MUSICGEN_API__RATE": "1000000/second",  # counted in Redis, never reached
        })
        os.environ.update({k: v for k, v in env.items() if k.startswith("MUSICGEN_")})
        settings = load_settings()
        prepare_database(settings)
        engine = make_engine(settings.database.url)
        key = ApiKeyStore(engine).create("bench").key
        engine.dispose()
        child = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], env=env,
                                 cwd=tmp)
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_up(base, child)
            auth = {"Authorization": f"Bearer {key}"}
            cases = [("GET " + BARE, "GET", BARE, {}, None, 200),
                     ("POST /v1/jobs", "POST", "/v1/jobs", auth, BODY, 202)]
            rows = []
            for name, method, path, headers, body, expect in cases:
                load(base, method, path, headers, body, args.warmup, args.concurrency, expect)
                wall, latencies = load(base, method, path, headers, body, args.requests,
                                       args.concurrency, expect)
                rows.append(Row(name, args.requests, args.concurrency, wall, latencies))
            return rows
        finally:
            child.terminate()
            child.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_up(base: str, child: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise SystemExit(f"the gateway exited with {child.returncode}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"the gateway did not answer within {timeout} s")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000, help="per endpoint")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads")
    parser.add_argument("--warmup", type=int, default=50, help="requests per endpoint first")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="12 requests, 2 threads (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.concurrency, args.warmup = 12, 2, 2
    if args.serve is not None:
        serve(args.serve)
        return
    if args.requests < 1 or args.concurrency < 1 or args.warmup < 1:
        parser.error("--requests, --concurrency and --warmup must be at least 1")
    report(run(args))


if __name__ == "__main__":
    main()
