"""A job's final outcome: the one status every record of it speaks, and its ledger write.

Every way a job ends for good is a :class:`FinalStatus`. The ledger (``pipeline.quota``: its
``TERMINAL_STATUSES`` are these), the job-end webhook (``pipeline.webhooks``: ``job.<status>``)
and the worker's ``musicgen_jobs`` metric all name the end with it. :class:`Outcome` is what a
settler knows of one end; ``pipeline.quota.outcomes.record`` writes it to the ledger with one
typed call.

Two sides settle outcomes, and this module is what they share (it imports nothing heavy):

* the producer side: ``JobHandle.cancel`` of a queued job records it cancelled at once, since
  no worker will run it (a worker announces its webhook when the revoked message reaches it);
  a list that fails part-way cancels the jobs already sent the same way;
* the worker side: ``workers/outcome.py`` settles every other end, in the order it states.

A refused enqueue is no outcome: the producer gives its reservation back
(``QuotaStore.release``) so the job never was, and it gets no status, webhook or metric.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = ["FinalStatus", "Outcome"]


class FinalStatus(str, Enum):
    """How a job ended for good; ``timeout`` is a failure that the records keep apart."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"

    @classmethod
    def of_error(cls, code: str) -> FinalStatus:
        """The status of a job that ended in error ``code``."""
        return cls.TIMEOUT if code == "timeout" else cls.FAILED


@dataclass(frozen=True)
class Outcome:
    """One job's end: its status, and its result (succeeded) or error (every other end)."""

    job_id: str
    status: FinalStatus
    result: Mapping[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None

    @classmethod
    def succeeded(cls, job_id: str, result: Mapping[str, Any]) -> Outcome:
        """A job that made its file; ``result`` is its ``JobResult`` as JSON."""
        return cls(job_id, FinalStatus.SUCCEEDED, result=result)

    @classmethod
    def failed(cls, job_id: str, code: str, message: str) -> Outcome:
        """A job that ended in error ``code`` (a ``timeout`` code ends it as a timeout)."""
        return cls(job_id, FinalStatus.of_error(code), error_code=code, error_message=message)

    @classmethod
    def cancelled(cls, job_id: str) -> Outcome:
        """A job its caller cancelled, queued or running."""
        return cls(job_id, FinalStatus.CANCELLED, error_code="cancelled")
