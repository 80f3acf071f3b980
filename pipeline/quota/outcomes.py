"""A job's outcome written to the ledger: the one typed call both settlers make (the producer's
cancel of a queued job, and the worker's settler, workers/outcome.py)."""

from __future__ import annotations

from pipeline.contract.outcome import FinalStatus, Outcome
from pipeline.quota.store import QuotaStore

__all__ = ["record"]


def record(quota: QuotaStore, outcome: Outcome) -> bool:
    """Write ``outcome`` to the ledger; False (nothing changed) if the job had already ended.

    Raises what the store raises (``JobNotFound`` for a job without a row, database errors):
    the caller decides whether its own outcome stands without the record.
    """
    if outcome.status is not FinalStatus.SUCCEEDED or outcome.result is None:
        return quota.mark_finished(outcome.job_id, status=outcome.status,
                                   error_code=outcome.error_code,
                                   error_message=outcome.error_message)
    result = outcome.result
    # timings.generate is the wall time of the call the job shared with batch_size - 1
    # others: the job's own GPU time is its share.
    batch_size = int(result.get("batch_size") or 1)
    return quota.mark_finished(outcome.job_id, status=outcome.status,
                               produced_seconds=result["duration"],
                               gpu_seconds=result["timings"]["generate"] / batch_size,
                               batch_size=batch_size,
                               result=dict(result))  # the record outlives the result backend's
