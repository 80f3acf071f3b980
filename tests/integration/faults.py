"""Fault injection for worker processes under test (loaded with `worker --include`).

It wraps the model call of the real worker (``workers.job_runner.generate``) and reacts to
markers in the prompt, so a test can make a real worker process hang, ignore its soft limit,
die, or fail like a sick GPU, and then watch the real Celery machinery deal with it. Every
attempt is appended to ``$FAULTS_DIR/attempts.log`` as ``<time> <job prompt>``, and every slot
the global rate limiter grants as ``<time> ADMIT <queue> <time before the grant>``.

Holds make a job's position a state the test waits for instead of a race against a fast tiny
job: ``FAULT:hold=NAME`` stops the job at the model boundary, ``FAULT:hold-progress=NAME``
just after its first generation step has been reported; either creates ``$FAULTS_DIR/NAME.held``
and waits until the test creates ``$FAULTS_DIR/NAME.release`` (``hold`` holds every attempt
until then; an attempt after the release passes straight through).

With ``model.engine = "static"`` the same markers act on the decode engine instead (see
``FaultyEngine`` at the end): the job is at the model boundary when it is admitted into a row,
and a fault of "the call" is a fault of the steps it shares with its neighbours.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

import workers.job_runner as job_runner
from pipeline.errors import GpuOutOfMemory, InvalidRequest, ModelRuntimeError, UnsupportedOption
from pipeline.policies.rate_limit import GlobalRateLimit
from workers.job_runner import WAIT_POLL_S
from workers.tasks import PROGRESS_INTERVAL_S

_real_generate = job_runner.generate
_seen: dict[str, int] = {}


def _log(prompt: str) -> None:
    with (Path(os.environ["FAULTS_DIR"]) / "attempts.log").open("a") as fh:
        fh.write(f"{time.time():.3f} {prompt}\n")


def _restarted_worker() -> bool:
    """True once any earlier worker process has logged an attempt of the slow job."""
    log = Path(os.environ["FAULTS_DIR"]) / "attempts.log"
    return log.exists() and log.read_text().count("FAULT:slow-first") > 1


def _hold(name: str) -> None:
    """Say that the job got here, then wait for the test to let it go on."""
    folder = Path(os.environ["FAULTS_DIR"])
    (folder / f"{name}.held").touch()
    while not (folder / f"{name}.release").exists():
        time.sleep(0.02)


def _holding_progress(progress: Callable[[float, str], None], name: str) -> Callable[[float, str], None]:
    """Report the first generation step for sure, hold there, then report it again."""
    held = [False]

    def report(fraction: float, message: str) -> None:
        if held[0] or not 0.0 < fraction < 1.0:
            progress(fraction, message)
            return
        held[0] = True
        # The task drops reports closer together than its interval: wait it out so this step is
        # stored, and again after the hold so the step after it (where a cancel is seen) is too.
        time.sleep(PROGRESS_INTERVAL_S)
        progress(fraction, message)
        _hold(name)
        time.sleep(PROGRESS_INTERVAL_S)
        progress(fraction, message)

    return report


def generate(loaded: Any, items: list[Any], progress: Any = None,
             on_window: Any = None) -> list[Any]:
    """One generate call of the engine: a batch of one job or more.

    Every job's prompt is logged; a marker in any prompt of the batch acts on the whole call,
    as a real fault of the model would.
    """
    prompts = [item.prompt for item in items]
    for prompt in prompts:
        _log(prompt)
    everything = "\n".join(prompts)
    if hold := re.search(r"FAULT:hold=(\S+)", everything):
        _hold(hold.group(1))
    if (hold := re.search(r"FAULT:hold-progress=(\S+)", everything)) and progress is not None:
        progress = _holding_progress(progress, hold.group(1))
    for prompt in prompts:
        _seen[prompt] = _seen.get(prompt, 0) + 1
    if any("FAULT:oom-twice" in p and _seen[p] <= 2 for p in prompts):
        raise GpuOutOfMemory("CUDA out of memory (injected)")
    if "FAULT:oom-batch" in everything and len(items) > 1:
        raise GpuOutOfMemory(f"CUDA out of memory with a batch of {len(items)} (injected)")
    if "FAULT:permanent" in everything:
        raise InvalidRequest("the prompt asks for something no model can do (injected)", "prompt")
    if "FAULT:model-error" in everything:
        raise ModelRuntimeError("the model produced NaNs (injected)")
    if "FAULT:hang" in everything:
        while True:  # a generation that never ends but still steps: dropping its jobs stops it
            if progress is not None:
                progress(0.5, "hanging")
            time.sleep(0.05)
    if "FAULT:ignore-soft" in everything:
        while True:  # a hung kernel: no step, nothing to interrupt; only the hard limit ends it
            try:
                time.sleep(3600)
            except SoftTimeLimitExceeded:
                continue
    if "FAULT:slow-first" in everything and not _restarted_worker():
        time.sleep(3600)  # long enough that only a shutdown ends it
    if "FAULT:crash" in everything:
        os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-job
    return _real_generate(loaded, items, progress, on_window)


job_runner.generate = generate

_real_validate_items = job_runner.validate_items


def validate_items(items: list[Any], **limits: Any) -> None:
    """``FAULT:unsupported``: the worker's own per-job check refuses the job, as it refuses a
    duration past the model's window, before the job can join a batch."""
    if any("FAULT:unsupported" in item.prompt for item in items):
        raise UnsupportedOption("this model cannot do what the prompt asks (injected)", "prompt")
    _real_validate_items(items, **limits)


job_runner.validate_items = validate_items

_real_try_acquire = GlobalRateLimit.try_acquire


def try_acquire(self: GlobalRateLimit, key: str) -> float:
    """The real limiter; each slot it grants is logged as ``<after> ADMIT <key> <before>``.

    The limiter stamps a slot with a clock read somewhere inside the call, so the test gets both
    ends: the stamp lies between ``before`` and ``after`` (a log time alone is late by a few ms,
    enough to make a correct limiter look as if it granted early).
    """
    before = time.time()
    wait = _real_try_acquire(self, key)
    if wait == 0.0:
        _log(f"ADMIT {key} {before:.3f}")
    return wait


GlobalRateLimit.try_acquire = try_acquire  # type: ignore[method-assign]


# --- a kill during encoding -------------------------------------------------------------------
# ``FAULT:hold-encoding``: the first attempt stops right after ffmpeg has written its ``.part``
# file beside the output, creates ``$FAULTS_DIR/encoding.held`` and waits there (for a kill -9);
# any later attempt, in this worker or another, passes through.
import workers.audio.postprocess as postprocess  # noqa: E402

_job_prompt = [""]
_generate_before_encoding_hold = job_runner.generate
_real_encode = postprocess._encode


def _generate_noting_prompt(loaded: Any, items: list[Any], progress: Any = None,
                            on_window: Any = None) -> list[Any]:
    _job_prompt[0] = items[0].prompt  # the encoder is not told which job it encodes
    return _generate_before_encoding_hold(loaded, items, progress, on_window)


def _encode_then_hold(*args: Any, **kwargs: Any) -> str:
    stderr = _real_encode(*args, **kwargs)
    held = Path(os.environ["FAULTS_DIR"]) / "encoding.held"
    if "FAULT:hold-encoding" in _job_prompt[0] and not held.exists():
        held.touch()
        time.sleep(3600)  # only the test's kill -9 ends this attempt
    return stderr


job_runner.generate = _generate_noting_prompt
postprocess._encode = _encode_then_hold


# --- the static decode engine -------------------------------------------------------------------
# ``JobRunner`` builds its engine through ``_engine``; a FaultyEngine wraps each one it builds, so
# the markers above act on the continuous loop as they act on HF generate. One more marker is
# the engine's own: ``FAULT:hold-alone=NAME`` lets the job take its first step, then stalls it
# (no step, the loop keeps admitting) for as long as it is the only row, until the test creates
# ``NAME.release``: a short job admitted beside it finishes while it is certainly still running.
# ``FAULT:hold-after=NAME:STEPS`` stalls the job the same way once it has taken STEPS steps
# (a streaming job has published chunks by then), until ``NAME.release``.
from workers.job_runner import JobRunner  # noqa: E402

_real_make_engine = JobRunner._engine
STALL_S = 0.02  # a stalled step's pause, so a stalled loop does not spin a core


class FaultyEngine:
    """A ``StaticEngine`` whose admissions and steps obey the prompts' fault markers."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self._rows: dict[int, str] = {}  # row -> its job's prompt
        self._steps: dict[int, int] = {}  # row -> steps it has taken
        self._held: set[int] = set()  # rows whose hold-progress hold is over
        self._grace: dict[int, float] = {}  # row -> until when it stays stalled after its hold

    def __getattr__(self, name: str) -> Any:  # max_rows, supports, free_rows, active, progress
        return getattr(self._engine, name)

    def admit(self, item: Any, seed: int) -> int:
        prompt = item.prompt
        _log(prompt)
        _job_prompt[0] = prompt  # for FAULT:hold-encoding
        if hold := re.search(r"FAULT:hold=(\S+)", prompt):
            _hold(hold.group(1))
        _seen[prompt] = _seen.get(prompt, 0) + 1
        if "FAULT:oom-twice" in prompt and _seen[prompt] <= 2:
            raise GpuOutOfMemory("CUDA out of memory (injected)")
        if "FAULT:permanent" in prompt:
            raise InvalidRequest("the prompt asks for something no model can do (injected)", "prompt")
        if "FAULT:model-error" in prompt:
            raise ModelRuntimeError("the model produced NaNs (injected)")
        if "FAULT:slow-first" in prompt and not _restarted_worker():
            time.sleep(3600)  # long enough that only a shutdown ends it
        row: int = self._engine.admit(item, seed)
        self._rows[row], self._steps[row] = prompt, 0
        return row

    def release(self, row: int) -> None:
        self._forget(row)
        self._engine.release(row)

    def step(self) -> list[tuple[int, Any]]:
        everything = "\n".join(self._rows.values())
        if "FAULT:crash" in everything:
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-job
        if "FAULT:ignore-soft" in everything:
            while True:  # a hung kernel: only the hard-limit watchdog ends the process
                time.sleep(3600)
        if "FAULT:oom-batch" in everything and len(self._rows) > 1:
            raise GpuOutOfMemory(f"CUDA out of memory with {len(self._rows)} rows (injected)")
        if "FAULT:hang" in everything or self._stalled():
            time.sleep(STALL_S)  # no step: the loop goes round, releasing what was dropped
            return []
        finished: list[tuple[int, Any]] = self._engine.step()
        for row in self._rows:
            self._steps[row] += 1
        for row, _ in finished:
            self._forget(row)
        return finished

    def _stalled(self) -> bool:
        """Whether this step waits: a hold-progress row held once its first step was reported
        (and paused a little after, so its task thread sees a cancel before it steps on), or a
        hold-alone row that is alone."""
        for row, prompt in self._rows.items():
            if self._steps[row] < 1:
                continue
            if (hold := re.search(r"FAULT:hold-progress=(\S+)", prompt)) and row not in self._held:
                # The loop put the first step's progress on the ticket after that step: the
                # task thread publishes it during the hold.
                _hold(hold.group(1))
                self._held.add(row)
                self._grace[row] = time.monotonic() + 2 * (PROGRESS_INTERVAL_S + WAIT_POLL_S)
            if time.monotonic() < self._grace.get(row, 0.0):
                return True
            after = re.search(r"FAULT:hold-after=(\S+):(\d+)", prompt)
            if after and self._steps[row] >= int(after.group(2)):
                folder = Path(os.environ["FAULTS_DIR"])
                if not (folder / f"{after.group(1)}.release").exists():
                    (folder / f"{after.group(1)}.held").touch()
                    return True
            hold = re.search(r"FAULT:hold-alone=(\S+)", prompt)
            if hold and len(self._rows) == 1:
                folder = Path(os.environ["FAULTS_DIR"])
                if not (folder / f"{hold.group(1)}.release").exists():
                    (folder / f"{hold.group(1)}.held").touch()
                    return True
        return False

    def _forget(self, row: int) -> None:
        for table in (self._rows, self._steps, self._grace):
            table.pop(row, None)
        self._held.discard(row)


def _faulty_engine(self: JobRunner, loaded: Any, rows: int) -> FaultyEngine:
    return FaultyEngine(_real_make_engine(self, loaded, rows))


JobRunner._engine = _faulty_engine  # type: ignore[method-assign]


# ``FAULTS_ENGINE_BROKEN=1`` in the worker's environment: every StaticEngine step raises, as a
# step past its cache would (issue 22, defect 1), so the engine fails its self-check at preload
# and the worker serves its model with hf.
if os.environ.get("FAULTS_ENGINE_BROKEN") == "1":
    from workers.runtime.engine import StaticEngine

    def _broken_step(self: StaticEngine) -> Any:
        raise IndexError("index 24048 is out of bounds (injected)")

    StaticEngine.step = _broken_step  # type: ignore[method-assign]

# --- a hold before admission --------------------------------------------------------------------
# ``FAULT:hold-admit=NAME``: the job has started (its cancel flag read, its state STARTED) and
# stops just before the rate limit and the circuit breaker admit it, until ``NAME.release``: a
# test can take Redis away at exactly the point where issue 27's jobs ended FAILED.
import workers.tasks as tasks  # noqa: E402

_real_admit = tasks._admit


def _admit_after_hold(task: Any, spec: Any, policies: Any) -> Any:
    if hold := re.search(r"FAULT:hold-admit=(\S+)", spec.prompt):
        _hold(hold.group(1))
    return _real_admit(task, spec, policies)


tasks._admit = _admit_after_hold
