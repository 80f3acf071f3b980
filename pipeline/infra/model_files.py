"""A preset's checkpoint files on this node: downloaded from the Hugging Face Hub, or imported
from a folder, into the Hub cache that workers read with ``model.offline = true``.

Both land in the Hub's own cache layout (``models--org--name/snapshots/<rev>/`` and
``refs/main``) under ``model.cache_dir``, so a worker's ``from_pretrained(source,
local_files_only=True)`` finds them exactly as if it had downloaded them itself. Downloads are
``huggingface_hub.snapshot_download``: resumable (a partial file is continued), and it honours
``HF_ENDPOINT`` (a mirror) and ``HF_HUB_CACHE`` as the library documents. Torch is not needed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.config.presets import model_settings_for
from pipeline.config.schema import ModelSettings, Settings
from pipeline.errors import ModelNotFound, ServiceUnavailable

__all__ = ["Snapshot", "download", "import_folder", "import_from", "verify"]

_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Snapshot:
    """Where a preset's files are, and how many there are."""

    preset: str
    source: str
    path: Path
    files: int


def _hub_source(preset: str, model: ModelSettings) -> str:
    source = model.source
    if "/" not in source or source.startswith((".", "/", "~")) or Path(source).exists():
        raise ModelNotFound(f"preset {preset!r} loads a local folder ({source}), not a Hub "
                            "checkpoint: there is nothing to download or import", "model.source")
    return source


def _cache_dir(model: ModelSettings) -> Path:
    if model.cache_dir is not None:
        return Path(model.cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def verify(path: Path) -> list[str]:
    """What is wrong with the checkpoint folder ``path`` (empty: nothing): a readable
    ``config.json`` and the weights, every shard a sharded index names, none empty."""
    problems = []
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problems.append(f"config.json is missing or unreadable ({type(exc).__name__})")
    needed = [name for name in _WEIGHTS if (path / name).is_file()]
    for index in _INDEXES:
        try:
            shards = json.loads((path / index).read_text(encoding="utf-8"))["weight_map"].values()
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, AttributeError):
            problems.append(f"{index} is unreadable")
            continue
        needed.extend(sorted(set(shards)))
    if not needed:
        problems.append(f"no weights: none of {', '.join(_WEIGHTS + _INDEXES)}")
    for name in needed:
        target = path / name
        if not target.is_file() or target.stat().st_size == 0:
            problems.append(f"{name} is missing or empty")
    return problems


def _checked(preset: str, source: str, path: Path) -> Snapshot:
    problems = verify(path)
    if problems:
        raise ModelNotFound(f"preset {preset!r}: the files at {path} are incomplete: "
                            + "; ".join(problems), "model.source", {"problems": problems})
    files = sum(1 for p in path.rglob("*") if p.is_file())
    return Snapshot(preset, source, path, files)


def download(settings: Settings, preset: str) -> Snapshot:
    """Download ``preset``'s checkpoint into the Hub cache (``model.cache_dir``), or complete a
    partial download, and verify it. ``model.hub_token`` (or ``HF_TOKEN``) for gated repos."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    model = model_settings_for(settings, preset)
    source = _hub_source(preset, model)
    token = model.hub_token.get_secret_value() if model.hub_token is not None else None
    try:
        path = snapshot_download(source, cache_dir=_cache_dir(model), token=token,
                                 etag_timeout=model.download_timeout)
    except LocalEntryNotFoundError as exc:  # the Hub was unreachable and nothing is cached
        raise ServiceUnavailable(f"cannot reach the Hugging Face Hub for {source} "
                                 f"({type(exc).__name__}); set HF_ENDPOINT to a mirror, or "
                                 "`musicgen-pipeline models import` the files", "model.source",
                                 {"retry_after": 30}) from exc
    except HfHubHTTPError as exc:
        raise ModelNotFound(f"the Hub refused {source}: {exc}", "model.source") from exc
    return _checked(preset, source, Path(path))


def import_folder(settings: Settings, preset: str, folder: Path) -> Snapshot:
    """Copy a checkpoint folder (what ``snapshot_download`` or ``save_pretrained`` wrote) into
    the Hub cache as ``preset``'s source, for nodes without Hub access. Verified before
    anything is copied; the revision is a hash of the files, so importing the same files again
    changes nothing."""
    model = model_settings_for(settings, preset)
    source = _hub_source(preset, model)
    folder = folder.expanduser()
    problems = verify(folder)
    if problems:
        raise ModelNotFound(f"{folder} is not a complete checkpoint: " + "; ".join(problems),
                            "path", {"problems": problems})
    files = sorted(p for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts)
    digest = hashlib.sha1()
    for file in files:
        digest.update(file.relative_to(folder).as_posix().encode() + b"\0")
        with file.open("rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    revision = digest.hexdigest()
    repo = _cache_dir(model) / ("models--" + source.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    if not snapshot.is_dir():
        draft = repo / "snapshots" / f".{revision}.partial"
        shutil.rmtree(draft, ignore_errors=True)
        for file in files:
            target = draft / file.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)
        draft.rename(snapshot)  # whole, or not there: a worker never reads half an import
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return _checked(preset, source, snapshot)


def _fetch_s3(uri: str, settings: Settings, dest: Path) -> None:
    """Every object under the ``s3://bucket/prefix`` folder ``uri`` into ``dest``, with the
    deployment's storage credentials and endpoint (``storage.*``)."""
    from pipeline.infra.storage_backends import s3_client

    parts = urlsplit(uri)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    prefix = f"{prefix}/" if prefix else ""
    client = s3_client(settings.storage)
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
        for key in keys:
            relative = key[len(prefix):]
            if not relative or relative.endswith("/") or ".." in Path(relative).parts:
                continue  # a folder marker, or a key that would leave dest
            target = dest / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
    except Exception as exc:  # botocore's errors: the bucket is the deployment's, not a bug
        raise ServiceUnavailable(f"cannot read {uri} ({type(exc).__name__})", "path",
                                 {"retry_after": 30}) from exc


def import_from(settings: Settings, preset: str, source: str) -> Snapshot:
    """``import_folder`` from a local folder or an ``s3://bucket/prefix`` folder (the
    deployment's bucket: fetched to a temporary folder first, with ``storage.*``)."""
    if not source.startswith("s3://"):
        return import_folder(settings, preset, Path(source))
    with tempfile.TemporaryDirectory(prefix="musicgen-import-") as scratch:
        _fetch_s3(source, settings, Path(scratch))
        return import_folder(settings, preset, Path(scratch))
