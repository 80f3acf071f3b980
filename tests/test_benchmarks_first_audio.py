"""benchmarks/first_audio.py --smoke runs through a real worker and prints the first chunk's
time beside the finished file's (timings: only their shape and order are checked)."""

from __future__ import annotations

import re

from tests.test_benchmarks_smoke import NUMBER, smoke


def test_first_audio_benchmark_smoke_prints_first_chunk_and_finished_file() -> None:
    out = smoke("first_audio.py", timeout=600)
    first = re.search(rf"^streamed: first chunk \(({NUMBER}) s of audio\)\s+({NUMBER})", out,
                      flags=re.M)
    end = re.search(rf"^streamed: finished file \(stream's end\)\s+({NUMBER})", out, flags=re.M)
    assert first is not None and end is not None, out
    assert float(first.group(1)) > 0
    # The first chunk cannot come after the stream's end: a stream that only arrives whole
    # would print them equal at best.
    assert float(first.group(2)) <= float(end.group(1)), out
    assert re.search(rf"^plain: finished file \(baseline\)\s+{NUMBER}", out, flags=re.M), out
