"""`musicgen-pipeline models download` and `models import`, run as an operator runs them, put a
preset's checkpoint where an offline worker looks: the tiny model served by a stand-in Hub
(through HF_ENDPOINT, in the Hub's layout), then imported from a folder."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.config.schema import Settings, StorageSettings
from pipeline.errors import ModelNotFound
from pipeline.infra.model_files import download, import_folder
from pipeline.infra.storage_backends import s3_client

from .conftest import base_env
from .fakehub import FakeHub

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

REPO_ID = "facebook/musicgen-small"  # the preset's source; the files are the tiny model's


@pytest.fixture
def hub(workdir: Path) -> Iterator[FakeHub]:
    server = FakeHub({REPO_ID: workdir / ".musicgen/models/tiny"})
    yield server
    server.stop()


def models(workdir: Path, cache: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = base_env(workdir, None, MUSICGEN_MODEL__CACHE_DIR=str(cache), **env)
    full.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "models", *args], cwd=workdir,
                          env=full, capture_output=True, text=True, timeout=120, check=False)


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    theirs = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    return names == theirs and filecmp.cmpfiles(a, b, names, shallow=False)[0] == names


def test_download_fetches_a_preset_through_hf_endpoint_into_the_hub_cache(
        workdir: Path, hub: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub import try_to_load_from_cache

    cache = tmp_path / "hub"
    done = models(workdir, cache, "download", "musicgen-small", HF_ENDPOINT=hub.url)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "verified" in done.stdout
    # Where from_pretrained(..., local_files_only=True) looks: an offline worker finds it.
    config = try_to_load_from_cache(REPO_ID, "config.json", cache_dir=cache)
    assert isinstance(config, str)
    assert same_files(workdir / ".musicgen/models/tiny", Path(config).parent)
    served = sum(r.startswith("GET /facebook/") for r in hub.requests)
    again = models(workdir, cache, "download", "musicgen-small", HF_ENDPOINT=hub.url)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sum(r.startswith("GET /facebook/") for r in hub.requests) == served  # nothing again

    # A preset that loads a local folder has nothing to download, and says so.
    with pytest.raises(ModelNotFound, match="local folder"):
        download(Settings(), "tiny")


def test_import_puts_a_folder_where_offline_workers_look(workdir: Path, tmp_path: Path) -> None:
    from huggingface_hub import try_to_load_from_cache

    cache = tmp_path / "hub"
    tiny = workdir / ".musicgen/models/tiny"
    done = models(workdir, cache, "import", "musicgen-small", str(tiny))
    assert done.returncode == 0, done.stderr[-3000:]
    config = try_to_load_from_cache(REPO_ID, "config.json", cache_dir=cache)
    assert isinstance(config, str) and same_files(tiny, Path(config).parent)
    again = models(workdir, cache, "import", "musicgen-small", str(tiny))  # same files: same rev
    assert again.returncode == 0 and again.stdout == done.stdout

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match="no weights"):  # refused before anything is copied
        import_folder(Settings(model={"cache_dir": str(tmp_path / "other")}), "musicgen-small",
                      broken)
    assert not (tmp_path / "other").exists()


def test_import_reads_a_folder_from_the_deployments_bucket(
        workdir: Path, tmp_path: Path, s3_storage: StorageSettings) -> None:
    from huggingface_hub import try_to_load_from_cache

    tiny = workdir / ".musicgen/models/tiny"
    bucket = (s3_storage.url or "").removeprefix("s3://").split("/")[0]
    client = s3_client(s3_storage)
    for file in (p for p in tiny.rglob("*") if p.is_file()):
        client.upload_file(str(file), bucket, f"checkpoints/small/{file.relative_to(tiny).as_posix()}")
    secret = s3_storage.secret_access_key.get_secret_value() if s3_storage.secret_access_key else ""
    cache = tmp_path / "hub"
    done = models(workdir, cache, "import", "musicgen-small", f"s3://{bucket}/checkpoints/small",
                  MUSICGEN_STORAGE__URL=s3_storage.url or "",
                  MUSICGEN_STORAGE__ENDPOINT_URL=s3_storage.endpoint_url or "",
                  MUSICGEN_STORAGE__REGION="us-east-1", MUSICGEN_STORAGE__ADDRESSING_STYLE="path",
                  MUSICGEN_STORAGE__ACCESS_KEY_ID=s3_storage.access_key_id or "",
                  MUSICGEN_STORAGE__SECRET_ACCESS_KEY=secret)
    assert done.returncode == 0, done.stderr[-3000:]
    config = try_to_load_from_cache(REPO_ID, "config.json", cache_dir=cache)
    assert isinstance(config, str) and same_files(tiny, Path(config).parent)
