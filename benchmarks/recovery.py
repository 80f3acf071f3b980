"""Time from kill -9 of the worker running a job to that job finishing on another worker.

    .venv/bin/python benchmarks/recovery.py [--broker rabbitmq,redis] [--runs 3] [--give-up 120]
        [--smoke]

Production default settings: nothing shortens the visibility timeout or any other timeout (only
the tiny model and a local SQLite ledger stand in for the real ones). For each broker named:

- a private redis-server for results (and, for ``redis``, the broker too); for ``rabbitmq`` a
  vhost of its own on the RabbitMQ at 127.0.0.1:5672 (guest/guest), deleted afterwards;
- worker A (`musicgen-pipeline worker`, prefork, the tiny preset, with tests/integration/faults.py
  loaded) takes a job that holds at the model boundary (``FAULT:hold``); worker B starts idle;
- A is killed with SIGKILL (its whole process group, as a node dying would), the hold released,
  and the clock runs until the job's result is stored by B.

``redis`` runs with the heartbeat recovery (workers/recovery.py, on by default);
``redis-no-heartbeat`` is the baseline: its unacked message comes back only after
broker.visibility_timeout (3,900 s by default), so the run gives up after --give-up seconds and
says so. Each broker's median over --runs is printed beside the others. Other cases add
themselves to CASES with the env they need. ``--smoke`` (CI): one run on redis, to prove the
script runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration import rabbitmq  # noqa: E402  (the vhost helpers the tests use)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def private_redis(work: Path) -> Iterator[str]:
    port = free_port()
    subprocess.run(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "yes",
                    "--save", "", "--appendonly", "no", "--dir", str(work),
                    "--logfile", str(work / "redis.log")], check=True)
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True)


@contextmanager
def rabbitmq_broker(results: str) -> Iterator[dict[str, str]]:
    vhost = rabbitmq.add_vhost("mg-bench")
    try:
        yield {"MUSICGEN_BROKER__URL": rabbitmq.amqp_url(vhost),
               "MUSICGEN_BROKER__PASSWORD": rabbitmq.PASSWORD,
               "MUSICGEN_BROKER__RESULT_BACKEND": f"{results}/1"}
    finally:
        rabbitmq.delete_vhost(vhost)


@contextmanager
def redis_broker(results: str) -> Iterator[dict[str, str]]:
    yield {"MUSICGEN_BROKER__URL": f"{results}/2"}


@contextmanager
def redis_visibility_broker(results: str) -> Iterator[dict[str, str]]:
    """Redis without the heartbeat recovery (workers/recovery.py): the broker alone, whose
    unacked message comes back after broker.visibility_timeout. The baseline."""
    yield {"MUSICGEN_BROKER__URL": f"{results}/3", "MUSICGEN_RECOVERY__ENABLED": "false"}


#: broker name -> a context manager giving the MUSICGEN_* env of that broker (the results Redis
#: URL, without a database, as its argument).
CASES: dict[str, Callable[[str], AbstractContextManager[dict[str, str]]]] = {
    "rabbitmq": rabbitmq_broker,
    "redis": redis_broker,
    "redis-no-heartbeat": redis_visibility_broker,
}


class Worker:
    def __init__(self, name: str, work: Path, env: dict[str, str]) -> None:
        self.log = work / f"{name}-{uuid.uuid4().hex[:6]}.log"
        argv = [sys.executable, "-m", "pipeline.cli", "worker", "-Q", "musicgen.tiny", "--pool",
                "prefork", "-n", f"{name}-{uuid.uuid4().hex[:6]}@bench", "--loglevel", "info",
                "--include", "tests.integration.faults"]
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(argv, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 180
        while " ready." not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"worker failed to start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def one_run(work: Path, env: dict[str, str], give_up: float) -> float | None:
    """Seconds from kill -9 to the job's result, or None past ``give_up``."""
    import pipeline

    faults = work / f"faults-{uuid.uuid4().hex[:6]}"
    faults.mkdir()
    env = {**env, "FAULTS_DIR": str(faults)}
    for key in [k for k in os.environ if k.startswith("MUSICGEN_")]:
        del os.environ[key]
    os.environ.update({k: v for k, v in env.items() if k.startswith("MUSICGEN_")})
    producer = pipeline.Producer(pipeline.load_settings(cwd=work))
    first = Worker("a", work, env)
    second: Worker | None = None
    try:
        handle = producer.enqueue(pipeline.GenerationRequest(
            prompt="FAULT:hold=bench survive a dead node", duration=1.0, format="wav"))
        deadline = time.monotonic() + 180
        while not (faults / "bench.held").exists():
            if time.monotonic() > deadline:
                sys.exit(f"the job never reached worker A:\n{first.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        second = Worker("b", work, env)  # idle, ready to take over
        first.kill9()
        killed = time.monotonic()
        (faults / "bench.release").touch()
        try:
            handle.wait(give_up, poll=0.05)
        except pipeline.JobTimeout:
            return None
        return time.monotonic() - killed
    finally:
        first.stop()
        if second is not None:
            second.stop()
        producer.app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default="rabbitmq,redis",
                        help=f"comma-separated, of: {', '.join(CASES)}")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--give-up", type=float, default=120.0,
                        help="seconds to wait for a recovery before calling it lost for the run")
    parser.add_argument("--smoke", action="store_true", help="one run on redis (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.broker, args.runs = "redis", 1
    names = [n.strip() for n in args.broker.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown broker {', '.join(unknown)}: use {', '.join(CASES)}")

    work = Path(tempfile.mkdtemp(prefix="mgp-recovery-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSICGEN_")}
    env.update({"MUSICGEN_ENV": "development", "MUSICGEN_MODEL__PRESET": "tiny",
                "MUSICGEN_APP__DATA_DIR": str(work / ".musicgen"),
                "MUSICGEN_STORAGE__OUTPUT_DIR": str(work / "out"),
                "MUSICGEN_STORAGE__TEMP_DIR": str(work / "tmp"),
                "MUSICGEN_DATABASE__URL": f"sqlite:///{work}/ledger.db",
                "MUSICGEN_RATE_LIMIT__ENABLED": "false", "MUSICGEN_QUOTAS__DEFAULT_TIER": "enterprise",
                "MUSICGEN_MONITORING__METRICS_PORT": "0", "PYTHONPATH": str(REPO)})
    for argv in (["models", "make-tiny", ".musicgen/models"], ["db", "upgrade"]):
        subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], cwd=work, env=env, check=True,
                       capture_output=True)
    os.chdir(work)
    figures: dict[str, list[float | None]] = {}
    with private_redis(work) as results:
        for name in names:
            with CASES[name](results) as broker_env:
                figures[name] = [one_run(work, {**env, **broker_env}, args.give_up)
                                 for _ in range(args.runs)]
                print(f"{name}: " + ", ".join("lost" if s is None else f"{s:.1f} s" for s in figures[name]),
                      flush=True)

    print(f"\nkill -9 of the worker running a job -> the job done on another worker "
          f"(production defaults, tiny model, {args.runs} runs; gave up after {args.give_up:g} s)")
    print(f"{'broker':<20}{'median s':>10}{'max s':>10}{'recovered':>11}")
    for name, runs in figures.items():
        done = [s for s in runs if s is not None]
        median = f"{statistics.median(done):.1f}" if done else "-"
        worst = f"{max(done):.1f}" if done else "-"
        print(f"{name:<20}{median:>10}{worst:>10}{f'{len(done)}/{len(runs)}':>11}")
    for name in ("redis", "redis-no-heartbeat"):
        if name in figures and not any(s is not None for s in figures[name]):
            print(f"{name}: not recovered within the wait; its unacked message comes back after "
                  "broker.visibility_timeout (3900 s by default)")


if __name__ == "__main__":
    main()
