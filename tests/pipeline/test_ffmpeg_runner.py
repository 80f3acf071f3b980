"""The one ffmpeg runner: missing binary, non-zero exit, signal and timeout, each typed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import PostProcessFailed, ServiceUnavailable
from pipeline.infra.ffmpeg_runner import STDERR_TAIL_CHARS, exec_ffmpeg, run_ffmpeg


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "ffmpeg"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_success_returns_stderr(tmp_path: Path) -> None:
    assert run_ffmpeg([script(tmp_path, "echo measured >&2")], what="x", timeout_s=10) == "measured\n"


def test_non_zero_exit_is_retryable_with_the_stderr_tail(tmp_path: Path) -> None:
    noisy = script(tmp_path, f"head -c {STDERR_TAIL_CHARS + 500} /dev/zero | tr '\\0' a >&2; "
                             "echo broken >&2; exit 3")
    with pytest.raises(PostProcessFailed) as raised:
        run_ffmpeg([noisy, "-i", "x"], what="encoding mp3", timeout_s=10)
    err = raised.value
    assert err.retryable and "exited with status 3 while encoding mp3" in err.message
    assert err.details["returncode"] == 3 and err.details["argv"] == [noisy, "-i", "x"]
    assert len(err.details["stderr_tail"]) == STDERR_TAIL_CHARS
    assert err.details["stderr_tail"].endswith("broken\n")


def test_signal_is_retryable(tmp_path: Path) -> None:
    with pytest.raises(PostProcessFailed, match="killed by signal 9"):
        run_ffmpeg([script(tmp_path, "kill -9 $$")], what="x", timeout_s=10)


def test_timeout_is_retryable_and_the_child_is_gone(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    slow = script(tmp_path, f"echo $$ > {pid_file}; echo started >&2; exec sleep 30")
    with pytest.raises(PostProcessFailed) as raised:
        exec_ffmpeg([slow], what="measuring", timeout_s=0.5)
    assert "timed out after 0.5 s while measuring" in raised.value.message
    assert raised.value.details["timeout_s"] == 0.5
    pid = pid_file.read_text().strip()
    # subprocess.run killed and reaped it: no such process remains.
    assert subprocess.run(["kill", "-0", pid], capture_output=True, check=False).returncode != 0


def test_missing_binary_is_service_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ServiceUnavailable) as raised:
        exec_ffmpeg([str(tmp_path / "nope")], what="x", timeout_s=10)
    assert raised.value.details == {"binary": str(tmp_path / "nope")}


def test_runner_module_is_stdlib_only() -> None:
    code = ("import sys, pipeline.infra.ffmpeg_runner\n"
            "print(sorted({'numpy', 'ffmpeg', 'torch', 'soundfile'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=60, check=True)
    assert out.stdout.strip() == "[]"
