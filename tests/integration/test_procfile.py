"""The Procfile, run as a process manager runs it: each line through a shell, in its own process
group, in a project directory, against a Redis database of our own; then SIGTERM to the group.

worker: comes up and consumes its model queue and the maintenance queue. flower: answers with
the password, refuses without it, never shows it, never imports torch. beat: sends both sweeps,
a worker runs them, and the old files are gone while the young ones stay.
"""

from __future__ import annotations

import ast
import base64
import os
import re
import secrets
import shelve
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import REPO, base_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROCFILE = REPO / "Procfile"
VENV_BIN = str(Path(sys.executable).parent)
HOUR, DAY = 3600.0, 86400.0


def procfile_entries() -> dict[str, str]:
    """``{process type: command}`` as Heroku, foreman and honcho read the file."""
    entries: dict[str, str] = {}
    for line in PROCFILE.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_-]+):\s*(.+)", line)
        assert match, f"not a Procfile line: {line!r}"
        entries[match[1]] = match[2].strip()
    return entries


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    """One Procfile line running in its own process group, its output in a log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def group(self) -> list[int]:
        """Every live process in the line's group: the shell, the program, its children."""
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if fields[0] != "Z" and int(fields[2]) == self.popen.pid:  # state, pgrp
                    pids.append(int(entry.name))
        return pids

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            if self.popen.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.popen.returncode} before {what}:\n"
                            f"{self.text()[-3000:]}")
            time.sleep(0.2)
        pytest.fail(f"{self.name}: no {what} after {timeout} s:\n{self.text()[-3000:]}")

    def terminate(self, timeout: float = 60) -> str:
        """SIGTERM to the whole group, as honcho, foreman and Heroku do; waits until every process
        of the group has exited and returns the line's output.

        ``/bin/sh -c`` (dash) does not exec the command, and the shell dies of the signal at
        once: the program's own exit code is not ours to read, so callers check its log.
        """
        os.killpg(self.popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.group() and time.monotonic() < deadline:
            time.sleep(0.2)
        left = self.group()
        if left:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        if left:
            pytest.fail(f"{self.name} still running {timeout} s after SIGTERM:\n{self.text()[-3000:]}")
        return self.text()


class Procfile:
    """Starts Procfile lines exactly as written and stops whatever is still running after a test."""

    def __init__(self, cwd: Path, logs: Path) -> None:
        self.cwd, self.logs = cwd, logs
        self.started: list[Proc] = []

    def start(self, name: str, env: dict[str, str]) -> Proc:
        command = procfile_entries()[name]
        log = self.logs / f"{name}-{len(self.started)}.log"
        env = {**env, "PATH": os.pathsep.join([VENV_BIN, env.get("PATH", "")])}
        with log.open("wb") as out:  # the child keeps its own copy of the descriptor
            popen = subprocess.Popen(command, shell=True, cwd=self.cwd, env=env, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        proc = Proc(name, popen, log)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.popen.poll() is None:
                os.killpg(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait()


@pytest.fixture
def procfile(workdir: Path, tmp_path: Path) -> Iterator[Procfile]:
    runner = Procfile(workdir, tmp_path)
    yield runner
    runner.stop_all()


def line_env(workdir: Path, redis_url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The tiny preset on our Redis database; this test's own storage and data folders."""
    return base_env(workdir, redis_url, MUSICGEN_STORAGE__OUTPUT_DIR=str(tmp_path / "outputs"),
                    MUSICGEN_STORAGE__TEMP_DIR=str(tmp_path / "tmp"),
                    MUSICGEN_APP__DATA_DIR=str(tmp_path / "data"),
                    # An idle worker waits out the whole soft-shutdown grace: keep it short here.
                    MUSICGEN_WORKER__SHUTDOWN_GRACE="2", **extra)


def flower_env(workdir: Path, redis_url: str, tmp_path: Path, password: str) -> dict[str, str]:
    """``line_env`` with Flower on a free port and basic auth for the user ``ops``."""
    return line_env(workdir, redis_url, tmp_path, MUSICGEN_MONITORING__FLOWER_PORT=str(free_port()),
                    MUSICGEN_MONITORING__FLOWER_USER="ops",
                    MUSICGEN_MONITORING__FLOWER_PASSWORD=password)


def http_get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        body = exc.read().decode(errors="replace")
        exc.close()
        return exc.code, body


def start_flower(procfile: Procfile, env: dict[str, str]) -> tuple[Proc, str]:
    """The Procfile's flower line, started and answering; returns it and its base URL."""
    flower = procfile.start("flower", env)
    base = f"http://127.0.0.1:{env['MUSICGEN_MONITORING__FLOWER_PORT']}"

    def healthy() -> bool:
        try:
            return http_get(f"{base}/healthcheck")[0] == 200
        except OSError:
            return False

    flower.wait_for("answer on /healthcheck", healthy)
    return flower, base


def loads_torch(pid: int) -> bool:
    """Whether the process has torch's shared libraries mapped (importing torch maps them)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def program_pid(proc: Proc, marker: str) -> int:
    """The pid in the line's group whose command line holds ``marker`` (e.g. ``flower``)."""
    for pid in proc.group():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if any(marker.encode() == arg for arg in argv):
            return pid
    pytest.fail(f"no process running {marker!r} in {proc.name}'s group")


def health_ping(node: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """docker/compose.yaml's health check: the light app (no torch) pings one node."""
    argv = [sys.executable, "-m", "celery", "-A", "pipeline.ops.monitor_app", "inspect", "ping",
            "-d", node, "--timeout", "10"]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_the_procfile_declares_worker_flower_beat_and_api_as_project_commands() -> None:
    entries = procfile_entries()
    assert set(entries) == {"worker", "flower", "beat", "api"}  # api: tests/integration/test_gateway.py
    for name, command in entries.items():
        assert command.split()[:2] == ["musicgen-pipeline", name]


def test_worker_line_comes_up_on_its_queues_and_exits_on_sigterm(
        procfile: Procfile, workdir: Path, redis_url: str, tmp_path: Path) -> None:
    env = line_env(workdir, redis_url, tmp_path)
    worker = procfile.start("worker", env)
    worker.wait_for('" ready."', lambda: " ready." in worker.text())
    node = re.search(r"(\S+@\S+) ready\.", worker.text())
    assert node, worker.text()[-2000:]
    ping = health_ping(node[1], env, workdir)
    assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr

    from celery import Celery

    probe = Celery("probe", broker=redis_url, set_as_current=False)
    try:
        queues = probe.control.inspect(destination=[node[1]], timeout=5).active_queues()
    finally:
        probe.close()
    assert queues, f"{node[1]} did not answer"
    assert {q["name"] for q in queues[node[1]]} == {"musicgen.tiny", "musicgen.maintenance",
                                                    "musicgen.webhooks"}

    out = worker.terminate()
    # `musicgen-pipeline worker` remaps SIGTERM to Celery's cold shutdown (after the soft one).
    assert "worker: Cold shutdown (MainProcess)" in out and "Traceback" not in out


def test_flower_line_needs_the_password_except_for_health_and_metrics(
        procfile: Procfile, workdir: Path, redis_url: str, tmp_path: Path) -> None:
    password = "pw-" + secrets.token_urlsafe(18)
    flower, base = start_flower(procfile, flower_env(workdir, redis_url, tmp_path, password))

    assert http_get(f"{base}/", ("ops", password))[0] == 200
    assert http_get(f"{base}/workers", ("ops", password))[0] == 200
    assert http_get(f"{base}/api/workers", ("ops", password))[0] == 200
    assert http_get(f"{base}/")[0] == 401
    assert http_get(f"{base}/", ("ops", password + "x"))[0] == 401
    assert http_get(f"{base}/api/workers")[0] == 401
    # Flower 2 leaves these two outside the password (documented in `flower --help` and docs/operations.md).
    status, metrics = http_get(f"{base}/metrics")
    assert status == 200 and "flower_events_total" in metrics
    assert password not in metrics

    flower_pid = program_pid(flower, "flower")
    assert not loads_torch(flower_pid), "Flower must not import the model runtime"
    for pid in flower.group():  # the password is in no process's argv (ps shows argv)
        assert password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert password.encode() in Path(f"/proc/{flower_pid}/environ").read_bytes()  # FLOWER_BASIC_AUTH

    out = flower.terminate()
    assert "15 detected, shutting down" in out and "Traceback" not in out
    assert password not in out


@pytest.mark.parametrize(("settings", "message"), [
    ({"MUSICGEN_ENV": "staging"}, "error: Flower needs basic auth in staging"),
    ({"MUSICGEN_MONITORING__FLOWER_ADDRESS": "0.0.0.0"}, "Flower without auth binds loopback only"),
    ({"MUSICGEN_MONITORING__FLOWER_PASSWORD": "pw-only-0123456789abc"}, "set both monitoring.flower_user"),
    ({"MUSICGEN_MONITORING__FLOWER_USER": "ops",
      "MUSICGEN_MONITORING__FLOWER_PASSWORD": "a,b-0123456789abcdef"}, "must not contain ','"),
    ({"MUSICGEN_BROKER__URL": ""}, "Flower needs a Redis broker"),
], ids=["staging-without-auth", "unauthenticated-off-loopback", "password-without-user",
        "comma-in-password", "embedded-broker"])
def test_flower_line_refuses_unsafe_settings_with_a_clear_message(
        procfile: Procfile, workdir: Path, redis_url: str, tmp_path: Path, settings: dict[str, str],
        message: str) -> None:
    env = line_env(workdir, redis_url, tmp_path, MUSICGEN_MONITORING__FLOWER_PORT=str(free_port()))
    env.update(settings)
    if not env["MUSICGEN_BROKER__URL"]:
        del env["MUSICGEN_BROKER__URL"]
    flower = procfile.start("flower", env)
    assert flower.popen.wait(60) == 1
    assert message in flower.text()
    assert "a,b-0123456789abcdef" not in flower.text() and "pw-only" not in flower.text()


def test_flower_line_runs_without_auth_on_loopback_in_development(
        procfile: Procfile, workdir: Path, redis_url: str, tmp_path: Path) -> None:
    env = line_env(workdir, redis_url, tmp_path, MUSICGEN_MONITORING__FLOWER_PORT=str(free_port()))
    flower, base = start_flower(procfile, env)
    assert "warning: Flower runs without authentication (development, loopback only)" in flower.text()
    assert http_get(f"{base}/")[0] == 200
    assert "15 detected, shutting down" in flower.terminate()


def _planted(root: Path, rel: str, age: float, size: int = 100) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    when = time.time() - age
    os.utime(path, (when, when))
    return path


SWEEPS = ("musicgen.maintenance.sweep_temp", "musicgen.maintenance.sweep_outputs")


def _returned(log: str, task: str) -> dict[str, int] | None:
    """What the worker logged as the task's return value, or None before it succeeded."""
    match = re.search(rf"Task {re.escape(task)}\[[-\w]+\] succeeded in [\d.]+s: (\{{.*\}})", log)
    return ast.literal_eval(match[1]) if match else None


def test_beat_line_sends_both_sweeps_and_the_worker_line_runs_them(
        procfile: Procfile, workdir: Path, redis_url: str, tmp_path: Path) -> None:
    crashed = _planted(tmp_path, "tmp/job-crashed/melody.wav", 2 * HOUR, 1000)
    os.utime(crashed.parent, (time.time() - 2 * HOUR,) * 2)
    live = _planted(tmp_path, "tmp/job-live/melody.wav", 60)
    expired = _planted(tmp_path, "outputs/expired.wav", 8 * DAY, 3000)
    expired_sidecar = _planted(tmp_path, "outputs/expired.wav.json", 8 * DAY, 50)
    recent = _planted(tmp_path, "outputs/recent.wav", DAY)
    env = line_env(workdir, redis_url, tmp_path)

    worker = procfile.start("worker", env)
    worker.wait_for('" ready."', lambda: " ready." in worker.text())
    beat = procfile.start("beat", env)
    beat.wait_for("start-up line", lambda: "beat: Starting..." in beat.text())
    # A fresh schedule file: both sweeps are due at once.
    beat.wait_for("both sweeps sent", lambda: all(f"Sending due task {t}" in beat.text() for t in SWEEPS))
    worker.wait_for("both sweeps run", lambda: all(_returned(worker.text(), t) for t in SWEEPS))

    assert _returned(worker.text(), SWEEPS[0]) == {"removed_files": 1, "removed_bytes": 1000,
                                                   "removed_dirs": 1, "errors": 0}
    assert _returned(worker.text(), SWEEPS[1]) == {"removed_files": 2, "removed_bytes": 3050,
                                                   "removed_dirs": 0, "errors": 0}
    assert not crashed.parent.exists() and not expired.exists() and not expired_sidecar.exists()
    assert live.is_file() and recent.is_file()
    assert not loads_torch(program_pid(beat, "beat")), "beat must not import the model runtime"
    ping = health_ping(f"celerybeat@{socket.gethostname()}", env, workdir)
    assert ping.returncode == 0 and "pong" in ping.stdout, ping.stdout + ping.stderr

    assert "Traceback" not in beat.terminate()
    # Beat saved when each entry ran: started again, it sends nothing until an interval passes.
    with shelve.open(str(tmp_path / "data" / "beat" / "celerybeat-schedule"), flag="r") as db:
        entries = db["entries"]
        for task in SWEEPS:
            assert entries[task].total_run_count == 1
            assert time.time() - entries[task].last_run_at.timestamp() < 120
    # At debug level beat logs "Waking up in ..." after each tick, once it has looked at every
    # entry and sent the due ones: a state to wait for, where a sleep might end before it looked.
    again = procfile.start("beat", {**env, "MUSICGEN_APP__LOG_LEVEL": "debug"})
    again.wait_for("its first tick", lambda: "beat: Waking up in" in again.text())
    assert "Sending due task" not in again.text()
    assert "Traceback" not in again.terminate()
    assert "worker: Cold shutdown (MainProcess)" in worker.terminate()
