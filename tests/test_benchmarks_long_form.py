"""benchmarks/long_form.py on the tiny model with a 2 s window: it runs and prints well-formed
figures. Only the shape and the counts are checked: the rest are timings."""

from __future__ import annotations

import re

import pytest

from benchmarks.long_form import main, split

pytestmark = pytest.mark.slow  # builds and runs the tiny model: ~10 s on a shared 2-core host


def test_split_cuts_a_long_job_into_window_sized_ones() -> None:
    assert split(75.0, 30.0) == [30.0, 30.0, 15.0]
    assert split(60.0, 30.0) == [30.0, 30.0]


def test_the_smallest_run_prints_both_cases_and_the_cost_per_window(
        capsys: pytest.CaptureFixture[str]) -> None:
    main(["--smoke"])  # 2 jobs of 5 s in 2 s windows 1.2 s apart
    out = capsys.readouterr().out
    # 5 s in 2 s windows 1.2 s apart: 4 calls in lockstep; as 2 + 2 + 1 s jobs, 2 at a time: 3.
    assert re.search(r"long-form \(4 windows\)\s+4\s+[\d.]+\s+[\d.]+", out), out
    assert re.search(r"independent 2 s jobs\s+3\s+[\d.]+\s+[\d.]+", out), out
    assert re.search(r"long-form / independent: x[\d.]+ audio s/s", out), out
    windows = re.findall(r"^\s+(\d)\s+[\d.]+\s+[\d.]+$", out, flags=re.MULTILINE)
    assert windows == ["1", "2", "3", "4"], out
    assert re.search(r"cost per extra window: -?[\d.]+ s \(1.2 s of new audio", out), out
