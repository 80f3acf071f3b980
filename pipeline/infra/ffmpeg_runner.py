"""The one way this project runs the ffmpeg and ffprobe binaries.

Standard library only, so the producer (melody probing) and the workers (decode, render) share
it without the producer importing ffmpeg-python. What a failure means is decided once, here:

* the binary is missing or not executable -> ``ServiceUnavailable`` (nothing on this host can
  run it; not the caller's fault);
* the run passes ``timeout_s`` -> retryable ``PostProcessFailed`` (the child is killed);
* with :func:`run_ffmpeg` also a non-zero exit or a signal -> retryable ``PostProcessFailed``.

Callers for whom a failed run can be the *input's* fault (decoding or probing an uploaded
melody) use :func:`exec_ffmpeg`, which leaves the exit status to them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from pipeline.errors import PostProcessFailed, ServiceUnavailable

STDERR_TAIL_CHARS = 2000


def stderr_tail(stderr: bytes | None) -> str:
    """The last ``STDERR_TAIL_CHARS`` characters of a run's stderr, decoded leniently."""
    return (stderr or b"").decode("utf-8", "replace")[-STDERR_TAIL_CHARS:]


def exec_ffmpeg(argv: Sequence[str], *, what: str, timeout_s: float,
                input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` (``input`` on its stdin, stdout and stderr captured); return it whatever
    its exit status.

    Raises ``ServiceUnavailable`` when ``argv[0]`` cannot be executed and the retryable
    ``PostProcessFailed`` (details: ``stderr_tail``, ``argv``, ``timeout_s``) on a timeout.
    """
    try:
        return subprocess.run(list(argv), input=input, capture_output=True, timeout=timeout_s,
                              check=False)
    except (FileNotFoundError, PermissionError, NotADirectoryError) as e:
        raise ServiceUnavailable(
            f"{argv[0]} not found or not executable: install ffmpeg 5+ (which ships ffprobe) on "
            "this host or point the ffmpeg/ffprobe setting at it",
            details={"binary": argv[0]}) from e
    except subprocess.TimeoutExpired as e:
        raise PostProcessFailed(f"{argv[0]} timed out after {timeout_s:g} s while {what}",
                                details={"stderr_tail": stderr_tail(e.stderr), "argv": list(argv),
                                         "timeout_s": timeout_s}) from e


def failure(proc: subprocess.CompletedProcess[bytes], *, what: str) -> PostProcessFailed:
    """The retryable error for a run that exited non-zero or was killed by a signal."""
    how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
           else f"exited with status {proc.returncode}")
    argv = [str(a) for a in proc.args]
    return PostProcessFailed(f"{argv[0] if argv else 'ffmpeg'} {how} while {what}",
                             details={"returncode": proc.returncode, "argv": argv,
                                      "stderr_tail": stderr_tail(proc.stderr)})


def run_checked(argv: Sequence[str], *, what: str, timeout_s: float,
                input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """:func:`exec_ffmpeg`, and a non-zero exit or a signal raises ``PostProcessFailed``."""
    proc = exec_ffmpeg(argv, what=what, timeout_s=timeout_s, input=input)
    if proc.returncode != 0:
        raise failure(proc, what=what)
    return proc


def run_ffmpeg(argv: Sequence[str], *, what: str, timeout_s: float) -> str:
    """Run an ffmpeg command line and return its stderr (where ffmpeg logs and filters report).

    A missing binary raises ``ServiceUnavailable`` (nothing on this node can post-process); a
    non-zero exit, a signal or a timeout raises the retryable ``PostProcessFailed`` with the tail
    of stderr in ``details``.
    """
    return run_checked(argv, what=what, timeout_s=timeout_s).stderr.decode("utf-8", "replace")
