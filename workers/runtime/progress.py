"""Progress of a generation call, counted in decoding steps while ``model.generate`` runs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import LogitsProcessor

ProgressCallback = Callable[[float, str], None]

# Token steps fill [0, DECODE_SPAN]; the rest is the EnCodec decode and the trim, reported at 1.0.
DECODE_SPAN = 0.95


class ProgressReporter:
    """Turns decoding steps into monotone fractions for a ``progress(fraction, message)`` callback.

    The callback usually writes to the result backend, so it is throttled to one call per
    ``min_delta`` of progress (a 30 s clip is 1503 steps); the last step and ``finish`` always
    report.
    An exception raised by the callback (a cancellation, say) propagates and stops generation.
    """

    def __init__(self, callback: ProgressCallback | None, total_steps: int, *,
                 min_delta: float = 0.01) -> None:
        self._callback = callback
        self._total = max(total_steps, 1)
        self._min_delta = min_delta
        self._done = 0
        self._last = -1.0
        self.stage = ""  # what the steps belong to, e.g. "window 3 of 7" for a long clip

    @property
    def steps_done(self) -> int:
        """How many decoding steps have been counted so far."""
        return self._done

    def step(self) -> None:
        """Count one decoding step of one ``model.generate`` call."""
        self._done = min(self._done + 1, self._total)
        fraction = DECODE_SPAN * self._done / self._total
        if self._done == self._total or fraction - self._last >= self._min_delta:
            where = f"{self.stage}: " if self.stage else ""
            self._report(fraction, f"{where}generating {self._done}/{self._total} steps")

    def finish(self, message: str = "done") -> None:
        """Report completion (1.0) once the audio is decoded."""
        self._report(1.0, message)

    def _report(self, fraction: float, message: str) -> None:
        if fraction <= self._last:
            return
        self._last = fraction
        if self._callback is not None:
            self._callback(fraction, message)


class StepCounter(LogitsProcessor):
    """A no-op logits processor that counts decoding steps.

    A logits processor rather than a streamer: transformers 5.23's
    ``MusicgenForConditionalGeneration.generate`` puts only the prompt on a streamer and never
    hands it the sampling loop's steps, while logits processors run once per step in every
    MusicGen variant.
    """

    def __init__(self, reporter: ProgressReporter) -> None:
        self._reporter = reporter

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._reporter.step()
        return scores
