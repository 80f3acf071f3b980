"""Fault injection for worker processes under test (loaded with `worker --include`).

It wraps the model call of the real worker (``workers.job_runner.generate``) and reacts to
markers in the prompt, so a test can make a real worker process hang, ignore its soft limit,
die, or fail like a sick GPU, and then watch the real Celery machinery deal with it. Every
attempt is appended to ``$FAULTS_DIR/attempts.log`` as ``<time> <job prompt>``, and every slot
the global rate limiter grants as ``<time> ADMIT <queue>``.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

import workers.job_runner as job_runner
from pipeline.policies.rate_limit import GlobalRateLimit
from pipeline.errors import GpuOutOfMemory, InvalidRequest, ModelRuntimeError

_real_generate = job_runner.generate
_seen: dict[str, int] = {}


def _log(prompt: str) -> None:
    with (Path(os.environ["FAULTS_DIR"]) / "attempts.log").open("a") as fh:
        fh.write(f"{time.time():.3f} {prompt}\n")


def _restarted_worker() -> bool:
    """True once any earlier worker process has logged an attempt of the slow job."""
    log = Path(os.environ["FAULTS_DIR"]) / "attempts.log"
    return log.exists() and log.read_text().count("FAULT:slow-first") > 1


def generate(loaded: Any, items: list[Any], progress: Any = None) -> list[Any]:
    prompt = items[0].prompt
    _log(prompt)
    _seen[prompt] = _seen.get(prompt, 0) + 1
    if "FAULT:oom-twice" in prompt and _seen[prompt] <= 2:
        raise GpuOutOfMemory("CUDA out of memory (injected)")
    if "FAULT:permanent" in prompt:
        raise InvalidRequest("the prompt asks for something no model can do (injected)", "prompt")
    if "FAULT:model-error" in prompt:
        raise ModelRuntimeError("the model produced NaNs (injected)")
    if "FAULT:hang" in prompt:
        time.sleep(3600)  # the soft limit interrupts this
    if "FAULT:ignore-soft" in prompt:
        while True:  # swallows the soft limit: only the hard limit ends it
            try:
                time.sleep(3600)
            except SoftTimeLimitExceeded:
                continue
    if "FAULT:slow-first" in prompt and not _restarted_worker():
        time.sleep(3600)  # long enough that only a shutdown ends it
    if "FAULT:crash" in prompt:
        os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-job
    return _real_generate(loaded, items, progress)


job_runner.generate = generate

_real_try_acquire = GlobalRateLimit.try_acquire


def try_acquire(self: GlobalRateLimit, key: str) -> float:
    """The real limiter; each slot it grants is logged as ``<time> ADMIT <key>``."""
    wait = _real_try_acquire(self, key)
    if wait == 0.0:
        _log(f"ADMIT {key}")
    return wait


GlobalRateLimit.try_acquire = try_acquire  # type: ignore[method-assign]
