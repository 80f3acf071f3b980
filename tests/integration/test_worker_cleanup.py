"""A job leaves only its own final file and sidecar, whatever happened to earlier attempts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import GenerationRequest

from .conftest import WorkerFactory
from .test_failures import FAST, producer, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def files_of(folder: Path, job_id: str) -> list[str]:
    """Every entry naming the job, hidden temp files included (a plain glob skips those)."""
    return sorted(p.name for p in folder.iterdir() if job_id in p.name) if folder.is_dir() else []


def test_kill_9_while_encoding_leaves_no_part_file_after_the_redelivered_run(
        workers: WorkerFactory, workdir: Path, redis_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    prod = producer(workdir, redis_url, monkeypatch, **FAST)
    first = workers.start(faults=True, **FAST)
    handle = prod.enqueue(GenerationRequest(prompt="FAULT:hold-encoding", duration=1.0,
                                            format="wav"))
    out, tmp = workdir / "outputs", workdir / "tmp"
    wait_for((workers.tmp / "encoding.held").exists, 180, "the job to be encoding")
    left = files_of(out, handle.id)
    assert len(left) == 1 and left[0].startswith(f".{handle.id}.wav.") \
        and left[0].endswith(".part"), left  # ffmpeg wrote the .part: the state we kill in
    assert (tmp / handle.id).is_dir()
    first.kill9()  # no finally, no cleanup: the .part and the temp folder stay behind
    workers.start(faults=True, **FAST)  # redelivered after the visibility timeout
    result = handle.wait(240)
    assert result.job_id == handle.id
    assert files_of(out, handle.id) == [f"{handle.id}.wav", f"{handle.id}.wav.json"]
    assert not (tmp / handle.id).exists()
