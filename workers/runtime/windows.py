"""The windows of a clip longer than the model's window (audiocraft's ``extend_stride`` loop), in
codec frames: pure arithmetic, shared by the length rules (``frames``) and the windowed
generation itself (``longform``)."""

from __future__ import annotations

from dataclasses import dataclass

# A long item's total frames are rounded up to a multiple of this (then trimmed), so clips a
# few seconds apart share a call; a fixed step rather than the in-window buckets' quarter
# octave, which would generate up to a quarter more of a five-minute clip for nothing.
LONG_BUCKET_FRAMES = 128


@dataclass(frozen=True)
class Window:
    """One model call of a long clip, in codec frames."""

    index: int
    start: int  # the clip's frame this window's prompt starts at
    prompt: int  # frames of the previous window's codes fed in as the prompt
    new: int  # frames this window adds to the clip


def plan_windows(total: int, window: int, stride: int, prompt: int = 0) -> list[Window]:
    """The windows that cover ``total`` frames, audiocraft's loop: window ``i`` starts at
    ``i * stride``, is prompted with what the previous one generated past that point and
    generates up to ``window`` frames in all (prompt included). One window when it fits.

    ``prompt`` frames at the clip's start are given (a continuation's codes): the first window
    is prompted with them and generates the rest of its window.
    """
    if total < 1 or window < 1:
        raise ValueError(f"total and window must be positive, got {total} and {window}")
    if not 0 <= prompt < min(total, window):
        raise ValueError(f"a prompt of {prompt} frames leaves nothing to generate in "
                         f"{min(total, window)}")
    if total <= window:
        return [Window(0, 0, prompt, total - prompt)]
    if not 0 < stride < window:
        raise ValueError(f"stride must be in (0, {window}) frames, got {stride}")
    windows: list[Window] = []
    start = 0
    while start + prompt < total:
        length = min(total - start, window)
        windows.append(Window(len(windows), start, prompt, length - prompt))
        prompt, start = length - stride, start + stride
    return windows


def long_frames(frames: int, window: int, stride: int, prompt: int = 0) -> int:
    """Frames generated for a long item needing ``frames`` (bucketed, trimmed afterwards).

    Rounded up to ``LONG_BUCKET_FRAMES``, but never past what the item's last window holds:
    rounding must not add a window (a prompt and a few frames) that nobody asked for. Changing
    the step changes the audio of a seed: keep it fixed.
    """
    last = plan_windows(frames, window, stride, prompt)[-1]
    return min(-(-frames // LONG_BUCKET_FRAMES) * LONG_BUCKET_FRAMES, last.start + window)
