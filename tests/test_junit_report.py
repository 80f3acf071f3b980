"""``pytest --junitxml`` (what CI systems pass) works with this project's pytest settings.

The failure suite records recovery times with ``record_property``, which the default junit
family (xunit2) rejects at setup: this runs one such test in a child pytest, under the
project's own ``pyproject.toml``, with and without ``--junitxml``.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

RECORDING_TEST = '''
def test_records_a_figure(record_property):
    record_property("recovery_s", 1.25)
'''


@pytest.mark.parametrize("junit", [True, False], ids=["junitxml", "plain"])
def test_record_property_passes_with_and_without_junitxml(tmp_path: Path, junit: bool) -> None:
    (tmp_path / "test_recording.py").write_text(RECORDING_TEST)
    report = tmp_path / "report.xml"
    argv = [sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"),
            "--rootdir", str(tmp_path), "-p", "no:cacheprovider", "-q",
            str(tmp_path / "test_recording.py")]
    if junit:
        argv.append(f"--junitxml={report}")
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 passed" in proc.stdout and "error" not in proc.stdout.lower()
    if junit:
        case = ET.parse(report).getroot().find(".//testcase")
        assert case is not None
        recorded = {p.get("name"): p.get("value") for p in case.iter("property")}
        assert recorded == {"recovery_s": "1.25"}  # the figure reaches the report
