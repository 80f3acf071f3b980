"""The documented examples run as written: the Python client's examples (docs/python-client.md;
tests/test_docs.py holds the README's copy of the first to it) against a real worker, and the README's offline quickstart
commands in a fresh directory."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, Worker, base_env, ffprobe

pytestmark = [pytest.mark.integration, pytest.mark.slow]

README = (REPO / "README.md").read_text()
PYTHON_CLIENT = (REPO / "docs" / "python-client.md").read_text()


def blocks(lang: str, after: str, text: str = README) -> list[str]:
    section = text.split(after, 1)[1]
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def test_call_it_from_your_service_example_runs(shared_worker: Worker, workdir: Path, redis_url: str) -> None:
    code = blocks("python", "# Calling it from Python", PYTHON_CLIENT)[0]
    env = base_env(workdir, redis_url, MUSICGEN_QUOTAS__DEFAULT_TIER="free")
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[1] in ("queued", "started")  # an idle worker may take it at once
    # Progress was shown: every line between the first and the last is the example's
    # "<percent>% <message>", and the percentages never go back.
    progress = [re.fullmatch(r"(\d{1,3})% (.*)", line) for line in lines[1:-1]]
    assert progress and all(progress), lines[1:-1]
    percents = [int(m[1]) for m in progress if m]
    assert percents == sorted(percents) and percents[-1] <= 100, lines[1:-1]
    path, duration, rate, lufs = lines[-1].split()
    assert Path(path).suffix == ".mp3" and float(duration) == pytest.approx(8.0, abs=0.01)
    probe = ffprobe(Path(path))
    assert probe["streams"][0]["codec_name"] == "mp3" and int(rate) == 32000
    assert float(lufs) == pytest.approx(-14.0, abs=0.5)  # the default loudness target


def test_the_asyncio_and_listing_example_runs(shared_worker: Worker, workdir: Path,
                                               redis_url: str) -> None:
    code = blocks("python", "# Calling it from Python", PYTHON_CLIENT)[1]
    env = base_env(workdir, redis_url)
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    uri = next(line for line in lines if line.startswith("file://"))
    assert lines[lines.index(uri) - 1] == "100% done"  # the last progress event
    listed = [line.split() for line in lines[lines.index(uri) + 1:]]
    # The newest is this job (just ended: the ledger may not have settled it yet).
    assert Path(uri.removeprefix("file://")).stem == listed[0][0]
    assert listed[0][1] in ("started", "succeeded")


def test_offline_demo_commands_run_as_written(tmp_path: Path) -> None:
    commands = [line.split("#")[0].strip() for line in blocks("bash", "## Quickstart: try it offline")[0].splitlines()]
    env = base_env(tmp_path, None)
    for key in ("MUSICGEN_MODEL__PRESET", "MUSICGEN_APP__DATA_DIR", "MUSICGEN_STORAGE__OUTPUT_DIR",
                "MUSICGEN_STORAGE__TEMP_DIR", "MUSICGEN_DATABASE__URL"):
        env.pop(key)  # exactly the defaults a new user has
    outputs = []
    for command in filter(None, commands):
        argv = shlex.split(command)
        argv[0] = str(REPO / argv[0])  # .venv/bin/musicgen-pipeline, relative to the checkout
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                              check=False)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    produced = Path(outputs[-1].strip().splitlines()[0])
    assert produced.is_file() and produced.suffix == ".mp3"
    assert produced.is_relative_to(tmp_path / ".musicgen" / "outputs")
    assert float(ffprobe(produced)["format"]["duration"]) == pytest.approx(4.0, abs=0.1)
