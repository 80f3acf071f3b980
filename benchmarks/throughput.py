"""Jobs per second through the real queue with the batching worker at batch 1, 4 and 8.

    .venv/bin/python benchmarks/throughput.py [--jobs 32] [--duration 2.0] [--batch-sizes 1 4 8]
        [--batch-wait-ms 50] [--format wav] [--normalization lufs] [--engine hf] [--smoke]

Everything is real: the Redis on 127.0.0.1:6379 (an empty database of its own, claimed like the
integration tests' ``redis_url`` fixture, and only its keys deleted afterwards), a temp project
directory with the tiny models and a migrated SQLite ledger, and for each batch size B one
``musicgen-pipeline worker --pool threads`` process with ``generation.max_batch_size = B``
(default concurrency 2*B, model preloaded, one torch thread, CPU). ``--engine`` is
``model.engine``; it defaults to ``hf``, the batcher whose ``model.generate`` calls the calls
columns count (with ``static`` a result's batch_size is the rows stepping when it was admitted,
and those columns are only indicative: ``benchmarks/gpu.py`` compares the two engines). After a warm-up job, --jobs
jobs of --duration seconds with mixed prompts and seeds are enqueued at once (a full queue) and
waited for. Per batch size it prints:

- jobs/s and audio s/s end to end: from the first enqueue to the last job's finish;
- p50 / p95 latency: enqueue to finish per job (the result's queue_wait + total);
- calls and rows/call: how many ``model.generate`` calls ran and their mean size;
- loop audio s/s: the generation loop's own rate, audio over the time it spent generating;
- loop busy: that generating time over the end-to-end wall time, at most 100%.

The generating time is the union of the jobs' generation intervals (each ends where the job's
post-processing starts and lasts its timings.generate), so time during which several jobs
generated together counts once. With hf a call's jobs share one interval, which is the summed
call time; with static a job's generate runs from its admission to its last step, overlapping
the rows that joined after it, so summing generate / batch_size counted that overlap twice
(the "loop busy 131.9%" at batch 8 before this).

Finish times come from the worker's own clock (enqueued_at in each job's sidecar + queue_wait +
total), not from this process's polling, so the figures do not depend on how often we poll.
Below the table: each batch size against batch 1 and the issue's targets, PASS or MISS (figures
only: a miss never makes the exit status non-zero; a job that fails does, the run is void).
Numbers depend on the machine; run it on an idle one. ``--smoke`` (CI): 4 jobs of 0.5 s at
batch 1 and 2, to prove the script runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

import pipeline
from pipeline import GenerationRequest, Producer

REDIS = "redis://127.0.0.1:6379"
OWNER_KEY = "musicgen-bench:owner"  # marks a database as claimed by this run
PROMPTS = ["calm piano", "loud rock drums with distorted guitars", "jazz trio", "ambient pads",
           "lo-fi beat with vinyl crackle", "orchestral strings swelling"]
FORMATS = ["wav", "mp3", "flac", "ogg", "opus"]
NORMALIZATIONS = ["none", "peak", "rms", "lufs"]
# The targets, for reference next to the figures.
TARGET_BATCH = 8
TARGET_LOOP_SPEEDUP = 3.0
TARGET_JOBS_SPEEDUP = 2.5
TARGET_BUSY = 0.90
READY_TIMEOUT_S = 300  # model preload on a busy 2-core host


class BenchmarkError(RuntimeError):
    """The benchmark could not run (no Redis database, a worker or a job failed): no figures."""


@dataclass(frozen=True)
class Row:
    batch: int
    jobs: int
    wall_s: float
    audio_s: float
    calls: float  # number of model.generate calls: sum of 1 / batch_size over the jobs
    generate_s: float  # the loop's generating time: the union of the jobs' generate intervals
    latencies: list[float]

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.wall_s

    @property
    def audio_per_s(self) -> float:
        return self.audio_s / self.wall_s

    @property
    def loop_audio_per_s(self) -> float:
        return self.audio_s / self.generate_s

    @property
    def busy(self) -> float:
        return self.generate_s / self.wall_s


def union_seconds(intervals: Sequence[tuple[float, float]]) -> float:
    """The time covered by at least one of the ``(start, end)`` intervals."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


def pct(values: Sequence[float], q: float) -> float:
    """The nearest-rank quantile (the house benchmarks' definition, see job_overhead.py)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@contextmanager
def claimed_redis_db() -> Iterator[str]:
    """An empty database on the shared Redis, claimed with an owner key set with NX so two runs
    (or a test session) never share one; on exit its keys are deleted, all of them ours since it
    was empty when claimed, and only while the owner key still says so."""
    token = uuid.uuid4().hex
    for db in range(1, 15):  # 0 is everyone's default: never claimed
        client = redis.Redis.from_url(f"{REDIS}/{db}")
        if client.dbsize() == 0 and client.set(OWNER_KEY, token, nx=True):
            break
        client.close()
    else:
        raise BenchmarkError(f"no empty Redis database in 1..14 on {REDIS} to claim")
    try:
        yield f"{REDIS}/{db}"
    finally:
        if client.get(OWNER_KEY) == token.encode():
            keys = list(client.scan_iter(count=1000))
            if keys:
                client.delete(*keys)
        client.close()


def base_env(work: Path, broker: str, **extra: str) -> dict[str, str]:
    """This environment without any MUSICGEN_* of the caller's, plus the run's own settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSICGEN_")}
    env.update({
        "MUSICGEN_ENV": "development",
        "MUSICGEN_BROKER__URL": broker,
        "MUSICGEN_MODEL__PRESET": "tiny",
        "MUSICGEN_MODEL__PRELOAD": "true",  # model load stays out of the figures
        # The host has 2 cores; one torch thread per worker process, as runtime_batch.py uses.
        "MUSICGEN_MODEL__NUM_THREADS": "1",
        "MUSICGEN_APP__DATA_DIR": str(work / ".musicgen"),
        "MUSICGEN_STORAGE__OUTPUT_DIR": str(work / "outputs"),
        "MUSICGEN_STORAGE__TEMP_DIR": str(work / "tmp"),
        "MUSICGEN_DATABASE__URL": f"sqlite:///{work}/quota.db",
        "MUSICGEN_RATE_LIMIT__ENABLED": "false",
        "MUSICGEN_QUOTAS__DEFAULT_TIER": "enterprise",  # no quota between us and the queue
        "MUSICGEN_MONITORING__BACKLOG_THRESHOLD": "0",  # --jobs above 50 must not be refused
        "MUSICGEN_MONITORING__METRICS_PORT": "0",  # other workers may run on this host
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra)
    return env


def run_cli(args: list[str], work: Path, env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        raise BenchmarkError(f"`musicgen-pipeline {' '.join(args)}` failed:\n{proc.stderr[-2000:]}")


class Worker:
    """One real worker process, started the way an operator starts one."""

    def __init__(self, work: Path, env: dict[str, str], batch: int) -> None:
        self.log = work / f"worker-b{batch}.log"
        argv = [sys.executable, "-m", "pipeline.cli", "worker", "-Q", "musicgen.tiny",
                "--pool", "threads", "-n", f"bench-{batch}@%h", "--loglevel", "info"]
        with self.log.open("wb") as out:  # the child keeps its own copy of the descriptor
            # Its own session: a Ctrl-C meant for the benchmark reaches the worker only through
            # stop(), and a stuck worker can be killed with its whole group.
            self.proc = subprocess.Popen(argv, cwd=work, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while " ready." not in self.text():
            if self.proc.poll() is not None:
                raise BenchmarkError(f"worker exited with {self.proc.returncode}:\n{self.text()[-3000:]}")
            if time.monotonic() > deadline:
                raise BenchmarkError(f"worker not ready after {READY_TIMEOUT_S} s:\n{self.text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM (the worker's cold shutdown) and wait; SIGKILL its group if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def make_requests(args: argparse.Namespace) -> list[GenerationRequest]:
    rng = random.Random(0)  # the same jobs at every batch size
    return [GenerationRequest(prompt=f"{rng.choice(PROMPTS)} {i}", duration=args.duration,
                              seed=rng.randrange(2**31), format=args.format,
                              normalization=args.normalization)
            for i in range(args.jobs)]


def measure(producer: Producer, args: argparse.Namespace, batch: int, timeout: float) -> Row:
    """Enqueue every job at once, wait for all, and reduce their results to one row."""
    warm = producer.enqueue(GenerationRequest(prompt="warm-up", duration=args.duration, seed=1,
                                              format=args.format, normalization=args.normalization))
    warm.wait(timeout)  # first-call allocations and the first render are not the steady state
    handles = producer.enqueue_many(make_requests(args))
    results = [handle.wait(timeout, poll=0.05) for handle in handles]
    finishes, starts, latencies = [], [], []
    generating: list[tuple[float, float]] = []
    for result in results:
        # The spec's enqueued_at (the producer's clock, this host) is in the job's sidecar.
        enqueued = float(json.loads(Path(result.sidecar_path).read_text())["request"]["enqueued_at"])
        latency = result.timings.queue_wait + result.timings.total
        starts.append(enqueued)
        finishes.append(enqueued + latency)
        latencies.append(latency)
        generated = enqueued + latency - result.timings.postprocess  # render follows generate
        generating.append((generated - result.timings.generate, generated))
    # Every call or step of the run holds only these jobs (the warm-up finished before they
    # were queued), so the union of their intervals is the loop's generating time.
    return Row(batch=batch, jobs=len(results), wall_s=max(finishes) - min(starts),
               audio_s=sum(r.duration for r in results),
               calls=sum(1 / r.batch_size for r in results),
               generate_s=union_seconds(generating),
               latencies=latencies)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(rows: list[Row], args: argparse.Namespace) -> None:
    print(f"\n{args.jobs} jobs of {args.duration:g} s ({args.format}, {args.normalization}), tiny model, "
          f"CPU, 1 torch thread, --pool threads (concurrency 2*B), engine {args.engine}, "
          f"batch wait {args.batch_wait_ms} ms, "
          f"all enqueued at once")
    print(f"{'batch':>5} {'calls':>6} {'rows/call':>9} {'wall s':>8} {'jobs/s':>7} {'audio s/s':>9}"
          f" {'p50 s':>7} {'p95 s':>7} {'loop audio s/s':>14} {'loop busy':>9}")
    for r in rows:
        print(f"{r.batch:>5} {r.calls:>6.0f} {r.jobs / r.calls:>9.2f} {r.wall_s:>8.2f}"
              f" {r.jobs_per_s:>7.2f} {r.audio_per_s:>9.2f} {statistics.median(r.latencies):>7.2f}"
              f" {pct(r.latencies, 0.95):>7.2f} {r.loop_audio_per_s:>14.2f} {r.busy:>9.1%}")
    base = next((r for r in rows if r.batch == 1), None)
    if base is None:
        print("\nno batch 1 run: no ratios, no targets")
        return
    print("\nagainst batch 1:")
    for r in rows:
        if r is not base:
            print(f"  batch {r.batch}: jobs/s x{r.jobs_per_s / base.jobs_per_s:.2f}, "
                  f"loop audio s/s x{r.loop_audio_per_s / base.loop_audio_per_s:.2f}")
    print(f"\ntargets (the issue's, at batch {TARGET_BATCH}; figures only):")
    target = next((r for r in rows if r.batch == TARGET_BATCH), None)
    if target is None:
        print(f"  batch {TARGET_BATCH} not run")
    else:
        loop = target.loop_audio_per_s / base.loop_audio_per_s
        jobs = target.jobs_per_s / base.jobs_per_s
        print(f"  loop audio s/s >= {TARGET_LOOP_SPEEDUP:g}x batch 1: x{loop:.2f} "
              f"{verdict(loop >= TARGET_LOOP_SPEEDUP)}")
        print(f"  end-to-end jobs/s >= {TARGET_JOBS_SPEEDUP:g}x batch 1: x{jobs:.2f} "
              f"{verdict(jobs >= TARGET_JOBS_SPEEDUP)}")
    # Under a full queue the loop should never wait for work, whatever the batch size.
    busy = ", ".join(f"batch {r.batch} {r.busy:.1%} {verdict(r.busy >= TARGET_BUSY)}" for r in rows)
    print(f"  loop busy >= {TARGET_BUSY:.0%} under a full queue: {busy}")


def run(args: argparse.Namespace) -> list[Row]:
    with claimed_redis_db() as broker, tempfile.TemporaryDirectory(prefix="mgp-throughput-") as tmp:
        work = Path(tmp)
        print(f"using Redis database {broker}", file=sys.stderr)
        env = base_env(work, broker)
        run_cli(["models", "make-tiny", ".musicgen/models"], work, env)
        run_cli(["db", "upgrade"], work, env)  # the ledger exists before any producer
        # The producer runs in this process with the same settings as the workers.
        for name in [n for n in os.environ if n.startswith("MUSICGEN_")]:
            del os.environ[name]
        os.environ.update(env)
        producer = Producer(pipeline.load_settings(cwd=work))
        # Bounds a failure only: a job that has not finished by then means a stuck run.
        timeout = 600 + 10 * args.jobs * args.duration
        rows = []
        for batch in args.batch_sizes:
            worker = Worker(work, base_env(work, broker, **{
                "MUSICGEN_GENERATION__MAX_BATCH_SIZE": str(batch),
                "MUSICGEN_GENERATION__BATCH_WAIT_MS": str(args.batch_wait_ms),
                "MUSICGEN_MODEL__ENGINE": args.engine,
                # --pool alone does not reach settings.worker.pool, which decides whether the
                # model is preloaded in the main process (workers/signals.py): say it here too.
                "MUSICGEN_WORKER__POOL": "threads",
            }), batch)
            try:
                worker.wait_ready()
                rows.append(measure(producer, args, batch, timeout))
            except pipeline.PipelineError as exc:
                raise BenchmarkError(f"batch {batch}: {exc}\nworker log:\n{worker.text()[-3000:]}") from exc
            finally:
                worker.stop()
            print(f"batch {batch}: done in {rows[-1].wall_s:.1f} s", file=sys.stderr)
        return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=32)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds of audio per job")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--batch-wait-ms", type=int, default=50)
    parser.add_argument("--format", choices=FORMATS, default="wav")
    parser.add_argument("--normalization", choices=NORMALIZATIONS, default="lufs")
    parser.add_argument("--engine", choices=["hf", "static"], default="hf",
                        help="model.engine of the workers (hf: the batcher these columns count)")
    parser.add_argument("--smoke", action="store_true", help="4 jobs of 0.5 s at batch 1 and 2 (CI)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.jobs, args.duration, args.batch_sizes = 4, 0.5, [1, 2]
    if args.jobs < 1 or any(b < 1 for b in args.batch_sizes):
        parser.error("--jobs and every batch size must be at least 1")
    try:
        rows = run(args)
    except BenchmarkError as exc:
        sys.exit(f"throughput: {exc}")
    report(rows, args)


if __name__ == "__main__":
    main()
