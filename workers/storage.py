"""Output storage: finished files and their JSON sidecars appear atomically or not at all.

Everything is written to a hidden temp file in the destination's own directory (so the final
``os.replace`` never crosses a filesystem and is atomic), flushed to disk, then renamed over the
destination. A crash, an exception or a cancelled job leaves at most a ``.part`` file, never a
truncated output under the real name; ``remove_partial`` sweeps those up. On object storage
the pair is rendered in the job's temp folder and uploaded (``upload_pair``), each object
whole or not at all (pipeline/infra/storage_backends.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import date, datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.infra.storage_backends import StorageBackend

log = logging.getLogger(__name__)

PART_SUFFIX = ".part"


def part_path(dest: Path) -> Path:
    """A fresh temp path next to ``dest``: ``.<name>.<random>.part`` (hidden, unique)."""
    return dest.with_name(f".{dest.name}.{secrets.token_hex(6)}{PART_SUFFIX}")


def sidecar_path(dest: Path) -> Path:
    """Where ``dest``'s metadata lives: ``<dest>.json`` (``song.mp3`` -> ``song.mp3.json``)."""
    return dest.with_name(dest.name + ".json")


@contextmanager
def atomic_write_path(dest: Path) -> Iterator[Path]:
    """Yield a temp path to write; on a clean exit it replaces ``dest`` atomically.

    The temp file is fsynced before the rename and the directory after it, so a power cut
    cannot leave a renamed but empty file. On any exception (``KeyboardInterrupt`` and a Celery
    hard-time-limit included) the temp file is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = part_path(dest)
    try:
        yield tmp
        if not tmp.is_file():
            raise FileNotFoundError(f"nothing was written to {tmp} for {dest}")
        _fsync_file(tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


def write_sidecar(dest: Path, metadata: dict[str, Any]) -> Path:
    """Write ``metadata`` as ``<dest>.json`` atomically (sorted keys, indent 2); return its path.

    Paths, enums and datetimes are written as strings; anything else that JSON cannot hold
    raises ``TypeError`` before a byte is written.
    """
    text = json.dumps(metadata, sort_keys=True, indent=2, default=_json_default) + "\n"
    sidecar = sidecar_path(Path(dest))
    with atomic_write_path(sidecar) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return sidecar


def upload_pair(backend: StorageBackend, dest: Path, key: str) -> str:
    """Upload a rendered file (``key``) and then its sidecar (``key.json``) to object storage;
    return the file's URI. Each upload is all or nothing; if the sidecar's fails, the file
    is removed again, so the store never holds a result without its metadata."""
    uri = backend.put_file(dest, key)
    try:
        backend.put_file(sidecar_path(dest), key + ".json")
    except BaseException:
        try:
            backend.delete([key])
        except Exception:  # the sweep removes it after retention_days
            log.warning("could not remove %s after its sidecar failed", uri, exc_info=True)
        raise
    return uri


def part_files(dest: Path) -> list[Path]:
    """The temp files that writers of ``dest`` or of its sidecar left behind (a killed writer).

    Exactly ``.<name>.<hex>.part`` and ``.<name>.json.<hex>.part``, as :func:`part_path` names
    them: the glob alone would also match ``.<name>.wav.<hex>.part``, the temp file of another
    output whose name merely starts with ours (job ``abc.wav`` beside job ``abc``).
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    exact = re.compile(rf"\.{re.escape(dest.name)}(?:\.json)?\.[0-9a-f]+{re.escape(PART_SUFFIX)}")
    return sorted(p for p in dest.parent.glob(f".{_glob_escape(dest.name)}.*{PART_SUFFIX}")
                  if exact.fullmatch(p.name))


def remove_partial(paths: Iterable[Path], *, keep_finished: bool = False) -> list[Path]:
    """Best-effort cleanup for a cancelled or failed job; returns what was removed.

    For each path removes the file itself, its sidecar (unless ``keep_finished``: then only the
    temp files go, as when a new attempt starts), and exactly the ``.part`` temp files a killed
    writer of either left beside it (:func:`part_files`). A file that cannot be removed is
    logged, not raised: cleanup must not turn a cancellation into a second failure.
    """
    removed: list[Path] = []
    for path in map(Path, paths):
        finished = () if keep_finished else (path, sidecar_path(path))
        for candidate in (*finished, *part_files(path)):
            try:
                candidate.unlink()
            except FileNotFoundError:
                continue
            except OSError as e:
                log.warning("could not remove partial output %s: %s", candidate, e)
                continue
            removed.append(candidate)
    return removed


def _glob_escape(name: str) -> str:
    # A file name like "take[1].wav" must match literally, not as a glob character class.
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise TypeError(f"sidecar metadata holds a {type(value).__name__}, which JSON cannot store")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform lets you open a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
