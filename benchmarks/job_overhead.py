"""Per-job overhead of the pipeline against a bare Celery task over the same Redis.

    .venv/bin/python benchmarks/job_overhead.py [--jobs 20] [--duration 0.5] [--smoke]

In one run it starts a private redis-server, builds the tiny models, starts a pipeline worker
(`musicgen-pipeline worker`, prefork, the tiny preset) and a bare Celery worker
(benchmarks/bare_tasks.py), then times, side by side:

- bare: `apply_async` -> `get` of a task that returns its argument (the floor: Celery + Redis);
- pipeline: `pipeline.enqueue` -> `wait` of a 0.5 s tiny job, and the job's own time split
  (queue wait, model load, generate, post-process) from its result;
- pipeline overhead: end to end minus the job's generate + post-process + load, i.e. what
  validation, quota, policies, progress reporting and result handling add to one job.

Numbers depend on the machine; run it on an idle one. Medians and p95 over --jobs jobs.
``--smoke`` (CI) runs 3 jobs of 0.5 s (the shortest job): it proves the script runs from a fresh clone, not a figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(log: Path, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while " ready." not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"worker failed to start:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def row(name: str, values: list[float]) -> str:
    return f"{name:<34}{statistics.median(values) * 1000:>10.1f}{pct(values, 0.95) * 1000:>10.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--duration", type=float, default=0.5)
    parser.add_argument("--smoke", action="store_true", help="3 jobs of 0.5 s (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.jobs, args.duration = 3, 0.5

    work = Path(tempfile.mkdtemp(prefix="mgp-bench-"))
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    subprocess.run(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--daemonize", "yes",
                    "--save", "", "--appendonly", "no", "--dir", str(work),
                    "--logfile", str(work / "redis.log")], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSICGEN_")}
    env.update({"MUSICGEN_BROKER__URL": url, "MUSICGEN_MODEL__PRESET": "tiny",
                "MUSICGEN_APP__DATA_DIR": str(work / ".musicgen"),
                "MUSICGEN_STORAGE__OUTPUT_DIR": str(work / "out"), "MUSICGEN_STORAGE__TEMP_DIR": str(work / "tmp"),
                "MUSICGEN_DATABASE__URL": f"sqlite:///{work}/ledger.db", "MUSICGEN_RATE_LIMIT__ENABLED": "false",
                "MUSICGEN_QUOTAS__DEFAULT_TIER": "enterprise", "BENCH_REDIS_URL": url,
                "PYTHONPATH": str(REPO)})
    procs: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run([sys.executable, "-m", "pipeline.cli", "models", "make-tiny", ".musicgen/models"],
                       cwd=work, env=env, check=True, capture_output=True)
        # The quota ledger's schema: a producer refuses jobs without it (a fresh clone has none).
        subprocess.run([sys.executable, "-m", "pipeline.cli", "db", "upgrade"],
                       cwd=work, env=env, check=True, capture_output=True)
        logs = []
        for argv, name in (
            ([sys.executable, "-m", "pipeline.cli", "worker", "-n", "bench@%h"], "pipeline"),
            ([sys.executable, "-m", "celery", "-A", "benchmarks.bare_tasks", "worker", "-Q", "bare",
              "--pool", "prefork", "-c", "1", "-n", "bare@%h", "--loglevel", "INFO"], "bare"),
        ):
            logs.append(work / f"{name}.log")
            with logs[-1].open("wb") as out:
                procs.append(subprocess.Popen(argv, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT))
        for log, proc in zip(logs, procs, strict=True):  # both start at once: nothing is timed yet
            wait_ready(log, proc)

        os.environ.update(env)
        os.chdir(work)
        sys.path.insert(0, str(REPO))
        import pipeline
        from benchmarks.bare_tasks import echo

        producer = pipeline.Producer(pipeline.load_settings())
        request = dict(prompt="benchmark loop", duration=args.duration, format="wav", seed=1)
        producer.enqueue(pipeline.GenerationRequest(**request)).wait(300)  # warm: model loaded
        echo.delay({"warm": True}).get(timeout=60)

        bare, e2e, overhead = [], [], []
        split: dict[str, list[float]] = {"queue_wait": [], "model_load": [], "generate": [], "postprocess": []}
        for i in range(args.jobs):
            started = time.perf_counter()
            echo.delay({"i": i, **request}).get(timeout=60)
            bare.append(time.perf_counter() - started)

            started = time.perf_counter()
            result = producer.enqueue(pipeline.GenerationRequest(**request)).wait(300, poll=0.01)
            total = time.perf_counter() - started
            e2e.append(total)
            t = result.timings
            for key in split:
                split[key].append(getattr(t, key))
            overhead.append(total - t.generate - t.postprocess - t.model_load)

        print(f"\n{args.jobs} jobs of {args.duration} s tiny audio, one prefork worker each, private Redis")
        print(f"{'':<34}{'median ms':>10}{'p95 ms':>10}")
        print(row("bare Celery task (enqueue->get)", bare))
        print(row("pipeline job (enqueue->wait)", e2e))
        print(row("  pipeline overhead (minus work)", overhead))
        for key, values in split.items():
            print(row(f"  job {key}", values))
        ratio = statistics.median(overhead) / statistics.median(bare)
        print(f"\npipeline overhead is {ratio:.1f}x a bare Celery round trip "
              f"({(statistics.median(overhead) - statistics.median(bare)) * 1000:.1f} ms more per job)")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        subprocess.run(["redis-cli", "-p", str(port), "shutdown"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
