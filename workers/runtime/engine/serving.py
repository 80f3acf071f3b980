"""Which engine serves each model in this worker process: the static engine once it has been
built, sized and has passed its self-check, else the HF path.

``EngineBuilder.build`` is the continuous loop's engine factory. It sizes the engine to the
device's memory (``sizing``), builds it, and runs the canary (``selfcheck``). A build that
raises, a model too large for one row, or a failed canary is logged in one line and remembered:
the model's jobs take the HF path (``EngineUnsupported``, which the loop takes as "this model
cannot be driven") and no later job builds, fails and logs a traceback again. A restart checks
afresh. Each verdict goes to ``on_verdict`` (the ``musicgen_engine`` gauge) and ``serving()``
(the worker's heartbeat, which ``musicgen-pipeline health`` reads).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import NoReturn

from workers.runtime.engine.engine import (
    DEFAULT_MAX_PROMPT_TOKENS,
    EngineUnsupported,
    StaticEngine,
)
from workers.runtime.engine.selfcheck import SelfCheck, one_line, self_check
from workers.runtime.engine.sizing import free_device_bytes, rows_for, shape_of
from workers.runtime.frames import max_new_tokens_for, window_frames
from workers.runtime.loaded import LoadedModel

log = logging.getLogger(__name__)

STATIC, HF = "static", "hf"

Verdict = Callable[[str, str], None]  # (model, engine serving it)


class EngineBuilder:
    """Builds checked static engines for one worker process and remembers the verdicts."""

    def __init__(self, *, compile: bool, memory_fraction: float,
                 on_verdict: Verdict | None = None,
                 check: Callable[[StaticEngine], SelfCheck] | None = self_check,
                 free_bytes: Callable[[str], int | None] = free_device_bytes) -> None:
        self.compile = compile
        self.memory_fraction = memory_fraction
        self._on_verdict = on_verdict
        self._check = check
        self._free_bytes = free_bytes
        self._lock = threading.Lock()
        self._serving: dict[str, str] = {}  # model -> STATIC or HF
        self._refused: dict[str, str] = {}  # model -> why its jobs take the HF path

    def serving(self) -> dict[str, str]:
        """Model -> the engine serving it (``static`` or ``hf``), for the models decided so far."""
        with self._lock:
            return dict(self._serving)

    def build(self, loaded: LoadedModel, rows: int, *, model: str) -> StaticEngine:
        """A static engine of at most ``rows`` rows for ``loaded`` (named ``model`` in logs and
        metrics), checked against HF; raises ``EngineUnsupported`` when HF must serve it."""
        with self._lock:
            refused = self._refused.get(model)
        if refused is not None:  # decided once per process: no rebuild, no second traceback
            raise EngineUnsupported(f"static engine refused: {refused}", field="model")
        if loaded.is_melody:  # the engine refuses every item of it anyway: nothing to check
            self._decide(model, HF, None)
            return StaticEngine(loaded, max_rows=rows)
        shape = shape_of(loaded, max_new_tokens_for(window_frames(loaded), loaded.delay_codebooks),
                         DEFAULT_MAX_PROMPT_TOKENS)
        try:
            sizing = rows_for(rows, shape, self._free_bytes(loaded.device), self.memory_fraction)
        except Exception as e:  # noqa: BLE001 - no memory reading: the engine is not trusted
            self._refuse(model, f"could not read free device memory ({e})", e)
        if sizing.rows < 1:
            self._refuse(model, f"not one row fits: {sizing.line()}")
        log.info("static engine for %s: %s", model, sizing.line())
        try:
            engine = StaticEngine(loaded, max_rows=sizing.rows, compile=self.compile)
        except Exception as e:  # noqa: BLE001 - any build failure means "serve with hf"
            self._refuse(model, f"building it failed ({type(e).__name__}: {e})", e)
        if self._check is None:
            log.info("static engine for %s serves unchecked (model.engine_self_check = false)",
                     model)
            self._decide(model, STATIC, None)
            return engine
        verdict = self._check(engine)
        if not verdict.passed:
            self._refuse(model, f"its self-check failed: {verdict.reason}")
        log.info("static engine for %s passed its self-check in %.2f s (%s, %s)", model,
                 verdict.seconds, loaded.device,
                 "compiled" if engine.compiled else "eager")
        self._decide(model, STATIC, None)
        return engine

    def _refuse(self, model: str, reason: str, cause: BaseException | None = None) -> NoReturn:
        reason = one_line(reason)
        log.warning("model %s is served by the hf path, not the static engine: %s", model,
                    reason)
        self._decide(model, HF, reason)
        raise EngineUnsupported(f"static engine refused: {reason}", field="model") from cause

    def _decide(self, model: str, engine: str, refused: str | None) -> None:
        with self._lock:
            self._serving[model] = engine
            if refused is not None:
                self._refused[model] = refused
        if self._on_verdict is not None:
            try:
                self._on_verdict(model, engine)
            except Exception:  # a metrics bug must not stop the worker serving
                log.exception("could not record which engine serves %s", model)
