"""Following a ``stream=True`` job's Redis Stream (``handle.stream()`` and its async form).

Both handles read the stream from its first entry (``XREAD`` from ``0-0``, blocking for new
ones), so a reader that starts late gets every chunk of the attempt from the start, and hand the
entries to a :class:`StreamFollower`, which turns them into chunks and says where an attempt
ended. What an end means for the job (its result, its error, or a retry that streams again under
the next attempt number) is decided against the job's own state, by the handle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.contract.streams import AudioChunk, StreamEnd, parse_entry
from pipeline.errors import InvalidRequest

#: Entries per XREAD: a late reader of a long job catches up in a few round trips.
READ_COUNT = 64
#: How long one XREAD blocks before the handle looks at the job's state (ended without a stream?).
BLOCK_S = 1.0


@dataclass
class StreamFollower:
    """Where a reader is in a job's stream, and the chunks the next entries hold."""

    last_id: bytes | str = "0-0"

    def take(self, entries: list[tuple[Any, Any]]) -> tuple[list[AudioChunk], StreamEnd | None]:
        """The chunks in ``entries`` (in order), up to and including an end entry, if any; the
        entries after an end (the next attempt's) are read again by the next XREAD."""
        chunks: list[AudioChunk] = []
        for entry_id, fields in entries:
            self.last_id = entry_id
            item = parse_entry(fields)
            if isinstance(item, StreamEnd):
                return chunks, item
            chunks.append(item)
        return chunks, None


def entries_of(reply: Any) -> list[tuple[Any, Any]]:
    """The entries of one key's ``XREAD`` reply (a list of ``[key, entries]``, or a dict in
    RESP3); none on a timeout."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(next(iter(reply.values()))[0]) if reply else []
    return list(reply[0][1])


def no_stream(job_id: str) -> InvalidRequest:
    """A job that ended with no stream to read."""
    return InvalidRequest(f"job {job_id} has no stream: it was not enqueued with stream=True, "
                          "or its stream expired", "stream")
