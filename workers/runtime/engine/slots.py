"""What the engine keeps per row on the host: the job, its length and how far it has come."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from workers.runtime.batch import GenerationItem
from workers.runtime.sampling import JobSampling


@dataclass
class Row:
    """One admitted job.

    ``steps`` is its bucket's ``max_new_tokens`` (what the HF path runs it for), ``frames`` the
    codec frames those steps produce, ``done`` the steps taken so far (also its position: the
    cache entries it has written). ``batch_size`` is the number of active rows, itself included,
    when it was admitted. ``prompt_frames`` is the frames of a continuation's clip the row is
    prompted with (0: none): admission runs them through the decoder at once, so the row starts
with ``done`` at that many steps.
    """

    item: GenerationItem
    seed: int
    steps: int
    frames: int
    batch_size: int
    sampling: JobSampling
    generator: torch.Generator | None
    prompt_frames: int = 0
    done: int = 0
    admitted_at: float = field(default_factory=time.perf_counter)

    @property
    def finished(self) -> bool:
        """Whether the row has taken all its steps."""
        return self.done >= self.steps


class Slots:
    """Which engine rows are taken. The lowest free row is handed out first, so active rows stay
    packed at the front and a step covers as few rows as it can."""

    def __init__(self, count: int) -> None:
        self.rows: list[Row | None] = [None] * count

    def free(self) -> int:
        """How many rows are free."""
        return sum(row is None for row in self.rows)

    def active(self) -> list[int]:
        """The taken rows' ids, in order."""
        return [index for index, row in enumerate(self.rows) if row is not None]

    def take(self, row: Row) -> int:
        """Put ``row`` in the lowest free slot and return its id (RuntimeError when none is)."""
        for index, current in enumerate(self.rows):
            if current is None:
                self.rows[index] = row
                return index
        raise RuntimeError(f"no free row: all {len(self.rows)} are generating")

    def get(self, index: int) -> Row:
        """The job in row ``index`` (KeyError when the row is free or out of range)."""
        row = self.rows[index] if 0 <= index < len(self.rows) else None
        if row is None:
            raise KeyError(f"row {index} is not generating")
        return row

    def drop(self, index: int) -> None:
        """Free row ``index``."""
        self.get(index)
        self.rows[index] = None
