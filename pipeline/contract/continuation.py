"""The span of a continuation clip that the model continues, and the output length it implies.

One set of rules for both sides: the producer applies them when it can probe the clip (bytes or
a path), the worker always (a clip by URI is only seen there). Plain numbers, no audio.

Lengths: with ``continuation_included`` the output is the clip's span followed by the new audio
and ``duration`` is the whole output's length, so it must be longer than the span; without it the
output is the new audio only, ``duration`` seconds of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.contract.jobs import JobSpec
from pipeline.errors import InvalidRequest

#: The least of the model's window a continuation must leave for new audio, in seconds.
MIN_ROOM_S = 1.0
#: How far ``continuation_end`` may pass the clip's measured end and still mean its end: ffprobe's
#: duration and the samples the worker decodes (resampled) differ by a sample or so, and an end
#: the producer accepted must not be refused by the worker.
END_SLACK_S = 0.02


@dataclass(frozen=True)
class ContinuationSpan:
    """The part of the clip used, in seconds into the clip, and the output it leads to."""

    start_s: float
    end_s: float
    included: bool

    @property
    def length_s(self) -> float:
        return self.end_s - self.start_s

    def total_s(self, duration_s: float) -> float:
        """The clip's span plus the new audio: what the model's windows must cover."""
        return duration_s if self.included else self.length_s + duration_s

    def new_s(self, duration_s: float) -> float:
        """Seconds of new audio the job asks for."""
        return duration_s - self.length_s if self.included else duration_s


def continuation_span(*, start_s: float | None, end_s: float | None, clip_s: float,
                      window_s: float, duration_s: float, included: bool) -> ContinuationSpan:
    """The span used of a ``clip_s``-second clip, or ``InvalidRequest`` naming the field at fault:
    ``continuation_start`` / ``continuation_end`` past the clip or out of order, ``continuation``
    when the span leaves less than ``MIN_ROOM_S`` of the model's ``window_s``, ``duration`` when
    an included clip leaves no new audio."""
    start = start_s or 0.0
    if start >= clip_s:
        raise InvalidRequest(f"continuation_start {start:g} s is at or past the clip's end "
                             f"({clip_s:.3f} s)", "continuation_start",
                             {"rule": "within_clip", "value": start, "limit": clip_s})
    if end_s is not None and end_s > clip_s + END_SLACK_S:
        raise InvalidRequest(f"continuation_end {end_s:g} s is past the clip's end "
                             f"({clip_s:.3f} s)", "continuation_end",
                             {"rule": "within_clip", "value": end_s, "limit": clip_s})
    end = clip_s if end_s is None else min(end_s, clip_s)
    if end <= start:
        raise InvalidRequest(f"continuation_end ({end:g} s) must be after continuation_start "
                             f"({start:g} s)", "continuation_end",
                             {"rule": "end_after_start", "start": start, "end": end})
    span = ContinuationSpan(start, end, included)
    room = window_s - MIN_ROOM_S
    if span.length_s > room:
        raise InvalidRequest(f"the continuation used is {span.length_s:.3f} s; the model's "
                             f"{window_s:g} s window leaves room for at most {room:g} s (set "
                             "continuation_start/continuation_end to a shorter part)",
                             "continuation", {"rule": "max_duration_s", "value": span.length_s,
                                              "limit": room})
    if included and duration_s <= span.length_s:
        raise InvalidRequest(f"duration {duration_s:g} s is the whole output, clip included: it "
                             f"must be longer than the {span.length_s:.3f} s of the continuation "
                             "(or set continuation_included to false)", "duration",
                             {"rule": "longer_than_continuation", "value": duration_s,
                              "limit": span.length_s})
    return span


def generated_s(spec: JobSpec, window_s: float) -> float:
    """Seconds of audio the model's windows cover for ``spec``, for its time limits: a clip left
    out of the output is generated (well, prompted) all the same. A span not known before the
    worker reads the clip (by URI, no ``continuation_end``) counts as the most a window allows."""
    if spec.continuation is None or spec.continuation_included:
        return spec.duration
    if spec.continuation_end is not None:
        return spec.duration + spec.continuation_end - spec.continuation_start
    return spec.duration + max(0.0, window_s - MIN_ROOM_S)


#: The spec's continuation fields: left out of the broker message of a job without one.
SPEC_FIELDS = frozenset({"continuation", "continuation_start", "continuation_end",
                         "continuation_included"})


def wire_form(spec: JobSpec) -> dict[str, Any]:
    """The spec as the broker carries it: without continuation fields when it has none, so a
    worker of a release before continuations (``extra="forbid"``) still takes every other job
    during a rolling upgrade; a worker of this release reads their defaults."""
    return spec.model_dump(mode="json", exclude=None if spec.continuation else set(SPEC_FIELDS))
