"""benchmarks/gpu.py's smoke run (what CI runs): the tiny model and small's shapes at 2 layers on
the CPU, HF generate and the engine side by side. Only the shape of the tables and the counts
are checked: the rest are timings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from benchmarks.gpu import batcher_batches, jobs, main
from workers.runtime.musicgen import load_model
from workers.runtime.tiny import make_tiny

pytestmark = pytest.mark.slow  # builds and runs two models on both paths: ~45 s of CPU

NUMBER = r"\d+(?:\.\d+)?"


def test_mixed_jobs_reach_hf_in_the_batching_workers_batches(tmp_path: Path) -> None:
    loaded = load_model(str(make_tiny(tmp_path / "tiny")), device="cpu", dtype="float32",
                        offline=True)
    # 1 s is 50 frames (bucket 56), 2 s is 100 (bucket 112): two keys, oldest first, <= 2 a call.
    items = jobs(5, [1.0, 2.0, 1.0, 1.0, 2.0])
    batches = batcher_batches(loaded, items, 2)
    assert [[items.index(i) for i in b] for b in batches] == [[0, 2], [1, 4], [3]]


def test_the_smoke_run_prints_both_paths_for_every_configuration(
        capsys: pytest.CaptureFixture[str]) -> None:
    report = main(["--smoke"])
    out = capsys.readouterr().out
    row = (r"^(tiny|small@2)\s+fp32\s+off\s+([12])" + rf"\s+({NUMBER})" * 2 + rf"\s+x({NUMBER})"
           + rf"\s+({NUMBER})" * 2 + rf"\s+x({NUMBER})" + rf"\s+({NUMBER})" * 2 + r"$")
    rows = re.findall(row, out, flags=re.MULTILINE)
    assert [(r[0], r[1]) for r in rows] == [("tiny", "1"), ("tiny", "2"), ("small@2", "1"),
                                            ("small@2", "2")], out
    for cells in rows:  # tokens/s and audio s/s of both paths, and both ratios, are positive
        assert all(float(v) > 0 for v in cells[2:8]), cells
    assert "skipped" not in out, out
    mixed = re.findall(rf"^(tiny|small@2)\s+fp32\s+off\s+2\s+{NUMBER}\s+{NUMBER}\s+x{NUMBER}$",
                       out, flags=re.MULTILINE)
    assert mixed == ["tiny", "small@2"], out
    assert len(report.ttfa) == 2 and all(r.hf and r.engine for r in report.ttfa)
    assert re.search(r"^device: cpu \(.+\); torch \S+", out, flags=re.MULTILINE), out
    assert "peak memory: peak RSS" in out or "peak memory: growth of ru_maxrss" in out, out
    verdicts = re.findall(r"^  CPU .+: (?:\d+\.\d+) (MET|NOT MET)$", out, flags=re.MULTILINE)
    assert len(verdicts) == 4, out  # 2x tokens/s at batch 1 and 1.5x mixed, for each model
    assert re.search(r"GPU targets .+ not measured, no CUDA here", out), out
