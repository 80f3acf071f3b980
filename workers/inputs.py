"""A job's audio input (melody, continuation clip) as a checked local file: fetched by reference (storage or an allowed HTTPS
host) into the job's temp folder, then held to the same limits the producer applies.

The size limit is enforced while the bytes arrive (and from the length header before the first
byte), so an oversized input never fills the disk; duration, format and sample rate are then
checked with ffprobe (pipeline/infra/audio_probe.py) before any GPU time is spent. An input that
cannot be fetched or is too large is ``InputUnavailable``, an unreadable or out-of-limits one
``InvalidRequest``: both permanent, never retried.
"""

from __future__ import annotations

import urllib.error
import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipeline.config.schema import Settings
from pipeline.contract.jobs import MelodyInput
from pipeline.contract.remote_urls import host_allowed, opener
from pipeline.errors import InputUnavailable, StorageUnavailable
from pipeline.infra.audio_probe import MB, AudioInfo, MelodyLimits, validate_melody
from pipeline.infra.storage_backends import (
    ObjectMissing,
    ObjectTooLarge,
    atomic_copy,
    backend_for_uri,
    copy_local,
    local_root,
)

FETCH_TIMEOUT_S = 30.0


def limits_of(settings: Settings) -> MelodyLimits:
    v = settings.validation
    return MelodyLimits(max_size_mb=v.max_melody_size_mb, min_duration_s=v.melody_min_duration,
                        max_duration_s=v.melody_max_duration,
                        allowed_formats=tuple(v.melody_formats),
                        min_sample_rate=v.melody_min_sample_rate)


class _Refused(Exception):
    """Why an input cannot be fetched; turned into ``InputUnavailable`` naming the field."""

    def __init__(self, rule: str, why: str) -> None:
        super().__init__(why)
        self.rule, self.why = rule, why


def fetch_melody(melody: MelodyInput, settings: Settings, folder: Path) -> Path:
    """The job's melody as a local file under ``folder``, within the settings' limits."""
    return fetch_input(melody, settings, folder, "melody")[0]


def fetch_input(ref: MelodyInput, settings: Settings, folder: Path,
                field: str) -> tuple[Path, AudioInfo]:
    """An audio input of the job (``field``: melody, continuation) as a local file under
    ``folder``, within the settings' limits, and what ffprobe says of it."""
    limits = limits_of(settings)
    if ref.uri is None:  # a message from a producer older than storage by reference
        path = ref.materialise(folder)
    else:
        path = folder / f"{field}-{uuid.uuid4().hex}{ref.suffix}"
        max_bytes = int(limits.max_size_mb * MB)
        try:
            try:
                if urlsplit(ref.uri).scheme == "https":
                    _fetch_https(ref.uri, path, settings, max_bytes)
                else:
                    _fetch_stored(ref.uri, path, settings, max_bytes)
            except ObjectTooLarge as exc:
                raise _Refused("max_size_mb", f"is larger than validation.max_melody_size_mb "
                               f"({limits.max_size_mb:g} MB)") from exc
            except ObjectMissing as exc:
                raise _Refused("missing", "does not exist") from exc
            except StorageUnavailable as exc:
                raise _Refused("unreachable", f"cannot be read: {exc.message}") from exc
        except _Refused as exc:
            raise InputUnavailable(f"{field} {ref.uri} {exc.why}", field,
                                   {"rule": exc.rule, "uri": ref.uri}) from exc
    return path, validate_melody(path, limits, field=field)


def _fetch_stored(uri: str, dest: Path, settings: Settings, max_bytes: int) -> None:
    """An input in this deployment's storage: its bucket, or a file inside its folder."""
    storage = settings.storage
    parts = urlsplit(uri)
    if parts.scheme == "file":
        root = local_root(storage)
        path = Path(unquote(parts.path)).resolve()
        # A crafted message must not make a worker read its own files (keys, settings).
        if root is None or root not in path.parents:
            raise _Refused("refused", "is outside the storage folder")
        copy_local(path, dest, max_bytes=max_bytes)
        return
    ours = urlsplit(storage.url or "")
    if parts.scheme != "s3" or ours.scheme != "s3" or parts.netloc != ours.netloc:
        raise _Refused("refused", "is not in this deployment's storage")
    backend, key = backend_for_uri(uri, storage)
    backend.get_file(key, dest, max_bytes=max_bytes)


def _fetch_https(uri: str, dest: Path, settings: Settings, max_bytes: int) -> None:
    host = urlsplit(uri).hostname or ""
    if not host_allowed(host, settings.storage.melody_url_hosts):  # settings may have changed
        raise _Refused("refused", f"names host {host!r}, not in storage.melody_url_hosts")
    try:
        with opener().open(uri, timeout=FETCH_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ObjectTooLarge(f"{length} bytes")
            atomic_copy(response, dest, max_bytes)
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 410):
            raise ObjectMissing(uri) from exc
        raise _Refused("unreachable", f"answered HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _Refused("unreachable", f"cannot be reached ({reason})") from exc
