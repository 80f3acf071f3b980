"""How long loading and validating the production settings takes, and what Dynaconf costs.

    .venv/bin/python benchmarks/settings_load.py [--warm-runs 200] [--cold-runs 5] [--smoke]

"layered" is what a service calls: ``load_settings("production")`` (Dynaconf reads and merges
the layers twice, then ${VAR} substitution, the rules and pydantic). "baseline" does the least
that gives the same Settings: tomllib on the same files, a dict merge, substitution and
``Settings.model_validate``. Cold = a fresh process (interpreter start, imports, first load),
median of a few; warm = the median of many loads in one process. ``--smoke`` (CI): 5 warm
loads and one cold process, to prove the script runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Dummy but strong values: production's rules refuse weak secrets, and the layers read these.
DUMMY_ENV = {
    "MUSICGEN_ENV": "production",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "REDIS_PASSWORD": "bench-redis-0123456789abcdef",
    "DATABASE_URL": "postgresql+psycopg://musicgen@127.0.0.1:5432/musicgen",
    "FLOWER_PASSWORD": "bench-flower-0123456789abcdef",
}

LAYERED = """
import time
t = time.perf_counter()
from pipeline.config import load_settings
load_settings("production")
print(time.perf_counter() - t)
"""

BASELINE = """
import time
t = time.perf_counter()
import sys
sys.path.insert(0, {bench_dir!r})
from settings_load import baseline_load
baseline_load({files!r})
print(time.perf_counter() - t)
"""


def _merge(base: dict[str, Any], top: dict[str, Any]) -> None:
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def baseline_load(files: list[str], env: str = "production") -> Any:
    """tomllib + dict merge (each file: [default], then [env]) + substitution + pydantic."""
    import tomllib

    from pipeline.config.schema import Settings
    from pipeline.config.substitution import substitute

    tree: dict[str, Any] = {}
    for path in files:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        for section in ("default", env):
            _merge(tree, data.get(section, {}))
    tree.setdefault("app", {})["environment"] = env
    return Settings.model_validate(substitute(tree, os.environ))


def _cold(code: str, runs: int, cwd: str) -> tuple[float, float]:
    """Median (wall time of the whole process, time from first import to loaded) in seconds."""
    walls, inner = [], []
    env = {**os.environ, **DUMMY_ENV}
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                              text=True, check=True)
        walls.append(time.perf_counter() - start)
        inner.append(float(done.stdout.strip().splitlines()[-1]))
    return statistics.median(walls), statistics.median(inner)


def _warm(fn: Callable[[], object], runs: int,
          clock: Callable[[], float] = time.perf_counter) -> float:
    times: list[float] = []
    for _ in range(runs):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warm-runs", type=int, default=200)
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="5 warm loads, 1 cold process (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.warm_runs, args.cold_runs = 5, 1

    os.environ.update(DUMMY_ENV)
    workdir = tempfile.mkdtemp(prefix="settings-bench-")  # no settings.local.toml here
    os.chdir(workdir)
    from pipeline.config import load_layered, load_settings

    layered = load_layered("production")
    if layered.settings is None:
        sys.exit(f"production settings do not validate:\n{layered.report.text()}")
    files = [str(path) for _, path in layered.files]
    if baseline_load(files) != layered.settings:
        sys.exit("the baseline does not build the same Settings: the comparison would be unfair")

    bench_dir = str(Path(__file__).resolve().parent)
    start_wall, _ = _cold("print(0.0)", args.cold_runs, workdir)
    cold_layered = _cold(LAYERED, args.cold_runs, workdir)
    cold_base = _cold(BASELINE.format(bench_dir=bench_dir, files=files), args.cold_runs, workdir)
    warm_layered = _warm(lambda: load_settings("production"), args.warm_runs)
    warm_base = _warm(lambda: baseline_load(files), args.warm_runs)
    # CPU time is what a busy machine (other processes on the cores) does not inflate.
    cpu_layered = _warm(lambda: load_settings("production"), args.warm_runs, time.process_time)
    cpu_base = _warm(lambda: baseline_load(files), args.warm_runs, time.process_time)

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:8.1f} ms"

    rows = [
        (f"cold: process, median of {args.cold_runs}", cold_layered[0], cold_base[0]),
        ("cold: imports + first load (in process)", cold_layered[1], cold_base[1]),
        (f"warm: one load, median of {args.warm_runs}", warm_layered, warm_base),
        ("warm: CPU time of one load, median", cpu_layered, cpu_base),
    ]
    print(f"production layers: {', '.join(label for label, _ in layered.files)}")
    print(f"python {sys.version.split()[0]}; bare interpreter start {ms(start_wall).strip()}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print()
    print(f"{'':42}{'layered (Dynaconf)':>20}{'baseline (tomllib)':>20}{'Dynaconf costs':>16}")
    for name, a, b in rows:
        print(f"{name:42}{ms(a):>20}{ms(b):>20}{ms(a - b):>16}")
    budget = 0.100
    verdict = "OK" if warm_layered < budget else "OVER BUDGET"
    print(f"\nwarm load+validate {ms(warm_layered).strip()} vs budget {budget * 1000:.0f} ms: {verdict}")


if __name__ == "__main__":
    main()
