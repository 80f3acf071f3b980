"""A job's time limits, scaled with the audio it asks for.

A 120 s clip takes about twelve times the decoding steps of a 10 s one, so one fixed limit
either kills long jobs or lets a hung short one run for many minutes. Each job gets the
configured limit (``worker.soft_time_limit``, the base) plus ``worker.time_limit_per_second``
for every second of audio, capped at ``worker.time_limit_cap``; the hard limit stays the same
distance above the soft one. The producer stamps them on the job's message (Celery enforces
them in a prefork child), the job runner and the batcher's watchdog read them per job.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config.schema import WorkerSettings


@dataclass(frozen=True)
class TimeLimits:
    """One job's soft limit (the job fails with JobTimeout) and hard limit (the process ends)."""

    soft: float
    hard: float


def job_time_limits(worker: WorkerSettings, duration_s: float) -> TimeLimits:
    """The limits of a job generating ``duration_s`` seconds of audio."""
    soft = min(float(worker.time_limit_cap),
               worker.soft_time_limit + worker.time_limit_per_second * max(0.0, duration_s))
    soft = max(soft, float(worker.soft_time_limit))  # a cap below the base never shortens it
    return TimeLimits(soft=soft, hard=soft + (worker.hard_time_limit - worker.soft_time_limit))
