"""The wheel installs into a clean virtualenv and works from any directory.

Slow (a wheel build and a dependency install: about a minute here) but it runs in CI: it is the
one test that sees the package as a user gets it, without the repo's ``settings/`` beside it.
The base dependencies come from the registry pinned by ``requirements.lock`` (the same
constraints the docker images use); if it cannot reach them the test fails rather than skips.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UV = Path(sys.executable).parent / "uv"  # installed into the dev venv by .ci/install

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _run(cmd: list[str], *, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # No MUSICGEN_* or PYTHONPATH from the developer's shell: the fresh venv stands alone.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSICGEN_") and k != "PYTHONPATH"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean venv with the wheel built from this checkout and its base dependencies only,
    at the versions requirements.lock pins."""
    root = tmp_path_factory.mktemp("install")
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-w", str(dist)], cwd=root)
    [wheel] = dist.glob("musicgen_pipeline-*.whl")
    venv.EnvBuilder(with_pip=False, clear=True).create(root / "fresh")
    _run([str(UV), "pip", "install", "--quiet", "--python", str(root / "fresh" / "bin" / "python"),
          "--constraint", str(REPO / "requirements.lock"), str(wheel)], cwd=root)
    return root / "fresh"


def _locked_pins() -> dict[str, str]:
    pins = re.findall(r"^([A-Za-z0-9._-]+)==([^\s;]+)", (REPO / "requirements.lock").read_text(), re.M)
    return {name.lower().replace("_", "-"): version for name, version in pins}


def test_base_install_takes_the_locked_versions_and_no_worker_packages(fresh: Path, tmp_path: Path) -> None:
    listed = _run([str(UV), "pip", "list", "--format", "json", "--python", str(fresh / "bin" / "python")],
                  cwd=tmp_path)
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(listed.stdout)}
    pins = _locked_pins()
    assert {"celery", "kombu", "redis", "pydantic", "sqlalchemy"} <= installed.keys()
    unpinned = sorted(set(installed) - set(pins) - {"musicgen-pipeline"})
    assert unpinned == [], f"installed but not in requirements.lock: {unpinned}"
    moved = {name: (version, pins[name]) for name, version in installed.items()
             if name in pins and version != pins[name]}
    assert moved == {}, f"installed versions differ from the lock: {moved}"
    # The producer side stays light: none of the worker extra's packages come with it.
    assert not {"torch", "transformers", "ffmpeg-python", "soundfile"} & installed.keys()


def test_console_script_validates_from_another_directory(fresh: Path, tmp_path: Path) -> None:
    done = _run([str(fresh / "bin" / "musicgen-pipeline"), "settings", "validate"], cwd=tmp_path)
    assert "environment: development; layers: settings.toml, preset musicgen-small" in done.stdout
    assert "Settings are valid." in done.stdout
    listed = _run([str(fresh / "bin" / "musicgen-pipeline"), "settings", "list"], cwd=tmp_path)
    assert "musicgen-large" in listed.stdout and "low_latency" in listed.stdout


def test_import_finds_the_packaged_settings_without_heavy_imports(fresh: Path, tmp_path: Path) -> None:
    code = (
        "import sys, pipeline\n"
        "from pipeline.config.layers import settings_dir\n"
        "s = pipeline.load_settings()\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'ffmpeg', 'soundfile') if m in sys.modules)\n"
        "print(s.model.preset, s.model.source, settings_dir(), pipeline.__file__, heavy, sep='\\n')\n"
    )
    done = _run([str(fresh / "bin" / "python"), "-c", code], cwd=tmp_path)
    preset, source, settings_dir, package_file, heavy = done.stdout.splitlines()
    assert (preset, source) == ("musicgen-small", "facebook/musicgen-small")
    site = fresh / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert Path(settings_dir) == site / "pipeline" / "_settings"  # shipped in the wheel
    assert Path(package_file).is_relative_to(site)  # the installed copy, not this checkout
    assert heavy == "[]"
