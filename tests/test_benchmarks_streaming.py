"""benchmarks/streaming.py --smoke runs, to Redis and to the in-process stand-in (--redis none),
and prints both cases' audio s/s, the cost and the seam check (its figures are timings: only
their shape is checked, and that the seams matched)."""

from __future__ import annotations

import re

from tests.test_benchmarks_smoke import NUMBER, smoke


def test_streaming_benchmark_smoke_prints_both_cases_and_the_seams() -> None:
    out = smoke("streaming.py", timeout=300)
    for case in ("no streaming", "streaming"):
        assert re.search(rf"^  {case}\s+: +{NUMBER} audio s/s", out, flags=re.M), out
    assert re.search(rf"cost\s+: +{NUMBER} % of audio s/s \(best rounds\); {NUMBER} % \(median", out), out
    assert re.search(r"^target of issue 25: streaming costs at most 10 % of the audio s/s at "
                     r"batch 8: (MET|NOT MET) \(", out, flags=re.M), out
    seam = re.search(r"max abs diff (\S+) against the one-call decode", out)
    assert seam is not None and float(seam.group(1)) < 1e-4, out


def test_streaming_benchmark_runs_without_a_redis_server_through_the_stand_in() -> None:
    # --redis none: the in-process stand-in the GPU machines use (no Redis server there); the
    # seam check reads the chunks back from it, so they were published whole and in order.
    out = smoke("streaming.py", "--redis", "none", timeout=300)
    for case in ("no streaming", "streaming"):
        assert re.search(rf"^  {case}\s+: +{NUMBER} audio s/s", out, flags=re.M), out
    assert re.search(rf"first chunk\s+: {NUMBER}\.\.{NUMBER} s after submission", out), out
    assert re.search(r"decode calls : [1-9]\d* for [1-9]\d* chunks", out), out
    assert "(streams to the in-process Redis stand-in: no server round trips)" in out, out
    assert re.search(r"^target of issue 25: streaming costs at most 10 % of the audio s/s at "
                     r"batch 8: (MET|NOT MET) \(", out, flags=re.M), out
    seam = re.search(r"seams +: (\d+) chunks, max abs diff (\S+) against the one-call decode", out)
    assert seam is not None and int(seam.group(1)) >= 2 and float(seam.group(2)) < 1e-4, out
