"""The wheel installs into a clean virtualenv and works from any directory.

Slow (a wheel build and a dependency install: about a minute here) but it runs in CI: it is the
one test that sees the package as a user gets it, without the repo's ``settings/`` beside it.
pip resolves the base dependencies from the configured indexes; if it cannot reach them the
test fails rather than skips.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

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
    """A clean venv with the wheel built from this checkout and its base dependencies only."""
    root = tmp_path_factory.mktemp("install")
    dist = root / "dist"
    _run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-w", str(dist)], cwd=root)
    [wheel] = dist.glob("musicgen_pipeline-*.whl")
    venv.EnvBuilder(with_pip=True, clear=True).create(root / "fresh")
    _run([str(root / "fresh" / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel)], cwd=root)
    return root / "fresh"


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
