"""The wire format of a streaming job's chunks (``GenerationRequest(stream=True)``, issue 25).

A worker publishes each chunk of a job's audio as one entry of the job's Redis Stream
(``pipeline.infra.keys.stream_key``), and one last entry that ends the attempt; a caller reads
them back with ``handle.stream()``. Both sides build and parse entries here, so the field names
live in one place. Every value is bytes on the wire; ``pcm`` is the chunk's samples as float32
little-endian, interleaved by channel (``(samples, channels)``, as in a WAV file), so a reader
needs no numpy to receive it (``AudioChunk.to_numpy`` uses it when it is installed).

Each attempt of a job (a redelivery after a worker died) streams again from chunk 0 under its own
``attempt`` number: the worker deletes the stream when an attempt starts, so a reader that starts
later sees only the newest attempt, and a reader that was part-way through sees the attempt
number change and index 0 again (``handle.stream`` starts over, see there).
"""

from __future__ import annotations

import array
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import PipelineError

END_OK = "ok"
END_ERROR = "error"


@dataclass(frozen=True)
class AudioChunk:
    """One chunk of a streaming job's audio, in order: ``index`` 0, 1, 2... within ``attempt``.

    ``start_s`` is where it starts in the clip; ``pcm`` holds ``samples * channels`` float32
    values, interleaved by channel. The chunks of one attempt joined end to end are the clip
    before post-processing (no loudness normalization): the same sample count as the model's
    one-call decode, equal to it but for float rounding at the seams.
    """

    attempt: int
    index: int
    start_s: float
    sample_rate: int
    channels: int
    pcm: bytes

    @property
    def samples(self) -> int:
        """Samples per channel in this chunk."""
        return len(self.pcm) // (4 * self.channels)

    @property
    def duration_s(self) -> float:
        return self.samples / self.sample_rate

    def floats(self) -> array.array[float]:
        """The interleaved samples as an ``array('f')`` (no numpy needed)."""
        values = array.array("f")
        values.frombytes(self.pcm)
        if sys.byteorder != "little":
            values.byteswap()
        return values

    def to_numpy(self) -> Any:
        """``(channels, samples)`` float32; needs numpy (not a dependency of the producer)."""
        import numpy as np

        return np.frombuffer(self.pcm, dtype="<f4").reshape(-1, self.channels).T


@dataclass(frozen=True)
class StreamEnd:
    """The last entry of an attempt: ``ok``, or the error that ended it (code and message)."""

    attempt: int
    ok: bool
    code: str | None = None
    message: str | None = None
    field: str | None = None


def chunk_fields(chunk: AudioChunk) -> dict[str, bytes | str]:
    """A chunk as the fields of one stream entry."""
    return {"attempt": str(chunk.attempt), "index": str(chunk.index),
            "start": repr(chunk.start_s), "sample_rate": str(chunk.sample_rate),
            "channels": str(chunk.channels), "pcm": chunk.pcm}


def end_fields(end: StreamEnd) -> dict[str, bytes | str]:
    """The end of an attempt as the fields of one stream entry."""
    fields: dict[str, bytes | str] = {"attempt": str(end.attempt),
                                      "end": END_OK if end.ok else END_ERROR}
    if not end.ok:
        fields["code"] = end.code or "error"
        fields["message"] = end.message or ""
        if end.field:
            fields["field"] = end.field
    return fields


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_entry(fields: Mapping[Any, Any]) -> AudioChunk | StreamEnd:
    """One stream entry (field names and values as Redis returns them: bytes) back as a chunk or
    an end; a ``PipelineError`` for an entry this version cannot read."""
    got = {_text(key): value for key, value in fields.items()}
    try:
        attempt = int(_text(got["attempt"]))
        if "end" in got:
            ok = _text(got["end"]) == END_OK
            if ok:
                return StreamEnd(attempt, True)
            return StreamEnd(attempt, False, _text(got.get("code", b"error")),
                             _text(got.get("message", b"")),
                             _text(got["field"]) if "field" in got else None)
        pcm = got["pcm"]
        return AudioChunk(attempt=attempt, index=int(_text(got["index"])),
                          start_s=float(_text(got["start"])),
                          sample_rate=int(_text(got["sample_rate"])),
                          channels=int(_text(got["channels"])),
                          pcm=pcm if isinstance(pcm, bytes) else bytes(pcm, "latin-1"))
    except (KeyError, ValueError) as exc:
        raise PipelineError(f"unreadable stream entry ({exc!r}): fields {sorted(got)}") from exc


def end_error(end: StreamEnd) -> PipelineError:
    """The typed error an attempt ended with (the most specific class its code names)."""
    return PipelineError.from_dict({"code": end.code or "error", "message": end.message or "",
                                    "field": end.field})
