"""JSON logs: the formatter and the job fields in one process, and the gateway's log as it runs
(`musicgen-pipeline api` on the embedded broker: every line JSON). The worker's log is parsed in
tests/integration/test_worker_health.py."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from pipeline.infra import log_format


def test_a_jobs_records_carry_its_fields_and_others_do_not() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("test.log_format")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        log_format.use_json([logger])
        logger.warning("before")
        token = log_format.start_job("job-1", "user-42", "musicgen.tiny", 2)
        logger.warning("inside %s", "the job")
        log_format.end_job(token)
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
    before, inside, after = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["message"] == "inside the job" and inside["level"] == "WARNING"
    assert (inside["job_id"], inside["queue"], inside["attempt"]) == ("job-1", "musicgen.tiny", 2)
    assert inside["user"] == log_format.user_hash("user-42") != "user-42"
    assert "job_id" not in before and "job_id" not in after


def test_the_gateway_writes_json_lines(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSICGEN_")}
    env.update({"MUSICGEN_ENV": "development", "MUSICGEN_LOGGING__FORMAT": "json",
                "MUSICGEN_APP__DATA_DIR": str(tmp_path / "state"),
                "MUSICGEN_DATABASE__URL": f"sqlite:///{tmp_path}/quota.db",
                "MUSICGEN_API__AUTH": "false", "MUSICGEN_API__PORT": str(port)})
    cli = [sys.executable, "-m", "pipeline.cli"]
    subprocess.run([*cli, "db", "upgrade"], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=120)
    log = tmp_path / "api.log"
    with log.open("w") as out, subprocess.Popen([*cli, "api"], cwd=tmp_path, env=env, stdout=out,
                                                stderr=subprocess.STDOUT) as proc:
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5):
                        break
                except OSError:
                    assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                    time.sleep(0.1)
        finally:
            proc.terminate()
            proc.wait(30)
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert any(r["logger"] == "pipeline.gateway.access" and "/readyz" in r["message"]
               for r in records)
    assert any("API keys are off" in r["message"] for r in records)
    assert not any("color_message" in r for r in records)
