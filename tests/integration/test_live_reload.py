"""A running worker takes a settings change without a restart: from a file edit and from
`musicgen-pipeline settings reload`; an invalid or restart-only edit is refused and the worker
keeps serving with the settings it had. One real worker process (threads pool), real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.integration.conftest import (
    Worker,
    WorkerFactory,
    base_env,
    caller_output,
    run_caller,
    start_caller,
    wait_for,
)


def _edit(path: Path, rate: str, extra: str = "", poll: float = 0.2) -> None:
    path.write_text(f'[default.app]\nsettings_poll_interval = {poll}\n'
                    f'[default.rate_limit]\nrate = "{rate}"\n{extra}', encoding="utf-8")
    st = path.stat()  # two edits within one clock tick must still differ to the watcher
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def _logged(worker: Worker, text: str) -> None:
    wait_for(lambda: text in worker.log_text(), 60, repr(text))


def _reload_cli(workdir: Path, redis_url: str) -> tuple[int, dict[str, dict[str, object]]]:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "settings", "reload", "--json",
                           "--timeout", "3"], cwd=workdir, env=base_env(workdir, redis_url),
                          capture_output=True, text=True, timeout=120, check=False)
    return proc.returncode, json.loads(proc.stdout or "{}")


def _job(prompt: str) -> dict[str, object]:
    return {"prompt": prompt, "duration": 1, "model": "tiny", "format": "wav", "seed": 1}


def test_a_worker_reloads_live_and_refuses_bad_edits(workers: WorkerFactory, workdir: Path,
                                                     redis_url: str, tmp_path: Path) -> None:
    layer = tmp_path / "live.toml"
    _edit(layer, "100/minute")
    worker = workers.start(pool="threads", queues="musicgen.tiny",
                           MUSICGEN_SETTINGS_FILES=str(layer),
                           MUSICGEN_RATE_LIMIT__ENABLED="true")

    # 1. A file edit: the new rate applies to the next jobs (the second of two waits for it).
    _edit(layer, "1 per 20 seconds")
    _logged(worker, "rate_limit.rate: '100/minute' -> '1 per 20 seconds'")
    callers = [start_caller(workdir, redis_url, _job(f"live reload {i}"))
               for i in range(2)]
    _logged(worker, "global rate limit 1 per 20 seconds")
    for caller in callers:
        out = caller_output(caller)
        assert "result" in out, out

    # 2. An invalid edit is refused with the report; the worker serves on the old settings.
    _edit(layer, "lots")
    _logged(worker, "the new settings are invalid")
    out = run_caller(workdir, redis_url, _job("after a bad edit"))
    assert "result" in out, out

    # 3. Stop watching (itself a live change), then reload by command.
    _edit(layer, "1 per 20 seconds", poll=0)
    _logged(worker, "app.settings_poll_interval: 0.2 -> 0.0")
    _edit(layer, "1 per 21 seconds", poll=0)
    code, answers = _reload_cli(workdir, redis_url)
    assert code == 0, answers
    answer = answers[worker.name]
    assert answer["outcome"] == "applied", answer
    assert {"key": "rate_limit.rate", "old": "1 per 20 seconds",
            "new": "1 per 21 seconds"} in answer["changes"]  # type: ignore[operator]

    # 4. A key that needs a restart: refused whole, exit 1, and the worker still serves.
    _edit(layer, "1 per 22 seconds", '[default.model]\ncache_size = 3\n', poll=0)
    code, answers = _reload_cli(workdir, redis_url)
    assert code == 1
    answer = answers[worker.name]
    assert answer["outcome"] == "restart_required", answer
    assert "model.cache_size" in str(answer["message"])
    out = run_caller(workdir, redis_url, _job("after a refused edit"))
    assert "result" in out, out
    assert worker.proc.poll() is None


def test_a_prefork_worker_tells_its_pool_processes(workers: WorkerFactory, workdir: Path,
                                                   redis_url: str, tmp_path: Path) -> None:
    """The jobs of a prefork worker run in its pool processes: SIGHUP and the command reach
    the main process, which passes the word on (a signal would end a pool process)."""
    layer = tmp_path / "live.toml"
    _edit(layer, "100/minute", poll=0)
    worker = workers.start(pool="prefork", queues="musicgen.tiny",
                           MUSICGEN_SETTINGS_FILES=str(layer), MUSICGEN_RATE_LIMIT__ENABLED="true")
    _edit(layer, "5/minute", poll=0)
    worker.proc.send_signal(signal.SIGHUP)
    _logged(worker, "MainProcess] settings reload (SIGHUP): applied: rate_limit.rate")
    _logged(worker, "ForkPoolWorker-1] settings reload (told by the worker's main process): "
                    "applied: rate_limit.rate: '100/minute' -> '5/minute'")
    _edit(layer, "6/minute", poll=0)
    code, answers = _reload_cli(workdir, redis_url)
    assert code == 0 and answers[worker.name]["outcome"] == "applied", answers
    _logged(worker, "ForkPoolWorker-1] settings reload (told by the worker's main process): "
                    "applied: rate_limit.rate: '5/minute' -> '6/minute'")
    out = run_caller(workdir, redis_url, _job("prefork after two reloads"))
    assert "result" in out, out
    assert "exited with" not in worker.log_text()  # no pool process was ended by a reload
