"""deploy/prometheus: the rules load (`promtool check rules`) and each alert fires on the series
that should fire it and on no other (`promtool test rules`, deploy/prometheus/rules_test.yaml)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

PROMETHEUS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool (Debian's prometheus) is installed by .ci/install"
    return subprocess.run([tool, *args], cwd=PROMETHEUS, capture_output=True, text=True,
                          timeout=60, check=False)


def test_rules_are_valid() -> None:
    out = promtool("check", "rules", "rules.yaml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_has_a_unit_test_and_they_pass() -> None:
    rules = yaml.safe_load((PROMETHEUS / "rules.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROMETHEUS / "rules_test.yaml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", [])}
    assert alerts == tested
    out = promtool("test", "rules", "rules_test.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
