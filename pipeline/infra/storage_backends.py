"""Where finished files and melody inputs live: a folder (local or shared) or S3-compatible
object storage, chosen by ``storage.url``.

Producers (melody uploads, ``handle.download``) and workers (outputs, inputs, retention sweeps)
build the same backend from the same settings, so a URI one side writes the other can read.
Keys are relative names (``job.wav``, ``inputs/abc.wav``) under the backend's root: the folder,
or ``bucket/prefix``. Every write is all-or-nothing: a temp file renamed into place, or one S3
PUT (a multipart upload is completed only at the end and aborted on failure), so a reader sees
the whole object or none. boto3 (the ``storage`` extra) is imported only when an ``s3://``
backend is built: ``import pipeline`` stays light.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any, NamedTuple, Protocol
from urllib.parse import unquote, urlsplit

from pipeline.config.schema import StorageSettings
from pipeline.contract.output_format import MEDIA_TYPES_BY_SUFFIX
from pipeline.errors import StorageUnavailable

PART_SUFFIX = ".part"  # what workers/storage.py names its temp files too: one sweep for both
CHUNK = 1024 * 1024


class ObjectMissing(FileNotFoundError):
    """The key names nothing (never written, or removed by retention)."""


class ObjectTooLarge(ValueError):
    """The object is larger than the caller's ``max_bytes``; nothing was kept."""


class StoredObject(NamedTuple):
    key: str
    size: int
    modified: float  # epoch seconds


class StorageBackend(Protocol):
    """One place for results and inputs; see the module docstring."""

    #: The folder itself for a folder backend (workers render straight into it); None for S3.
    local_root: Path | None

    def uri(self, key: str) -> str: ...

    def key_of(self, uri: str) -> str | None:
        """The key of a URI of this backend, or None for any other URI."""

    def put_file(self, source: Path, key: str) -> str:
        """Store a local file under ``key`` (all or nothing); its URI."""

    def put_stream(self, stream: IO[bytes], key: str) -> str:
        """Store what ``stream`` reads under ``key`` (all or nothing); its URI."""

    def get_file(self, key: str, dest: Path, *, max_bytes: int | None = None) -> Path:
        """Copy the object to ``dest`` (atomically); ``ObjectMissing`` / ``ObjectTooLarge``."""

    def open(self, key: str) -> IO[bytes]: ...

    def delete(self, keys: Iterable[str]) -> int:
        """Remove these keys (missing ones are fine); how many were asked for."""

    def list(self, prefix: str = "") -> Iterator[StoredObject]: ...

    def presign(self, key: str, expires_s: int) -> str | None:
        """A plain-HTTP GET URL valid for ``expires_s`` seconds, or None (folders have none)."""


def _unavailable(what: str, exc: BaseException, rule: str = "unreachable") -> StorageUnavailable:
    return StorageUnavailable(f"{what}: {type(exc).__name__}: {exc}", "storage.url",
                              {"rule": rule})


# --- a folder --------------------------------------------------------------------------------

class LocalBackend:
    """Keys are files under ``root``; URIs are ``file://`` URLs of absolute paths."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.local_root: Path | None = self.root

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise ValueError(f"key {key!r} leaves the storage folder")
        return path

    def uri(self, key: str) -> str:
        return self.path(key).as_uri()

    def key_of(self, uri: str) -> str | None:
        parts = urlsplit(uri)
        if parts.scheme != "file":
            return None
        path = Path(unquote(parts.path)).resolve()
        return str(path.relative_to(self.root)) if self.root in path.parents else None

    def put_file(self, source: Path, key: str) -> str:
        with open(source, "rb") as stream:
            return self.put_stream(stream, key)

    def put_stream(self, stream: IO[bytes], key: str) -> str:
        dest = self.path(key)
        try:
            atomic_copy(stream, dest)
        except OSError as exc:  # a full or read-only disk: the storage's, not the caller's
            raise _unavailable(f"could not store {dest}", exc) from exc
        return dest.as_uri()

    def get_file(self, key: str, dest: Path, *, max_bytes: int | None = None) -> Path:
        return copy_local(self.path(key), dest, max_bytes=max_bytes)

    def open(self, key: str) -> IO[bytes]:
        try:
            return self.path(key).open("rb")
        except FileNotFoundError as exc:
            raise ObjectMissing(key) from exc

    def delete(self, keys: Iterable[str]) -> int:
        count = 0
        for key in keys:
            self.path(key).unlink(missing_ok=True)
            count += 1
        return count

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        base = self.path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            st = path.lstat()
            if path.is_file() and not path.is_symlink():
                yield StoredObject(str(path.relative_to(self.root)), st.st_size, st.st_mtime)

    def presign(self, key: str, expires_s: int) -> str | None:
        return None


def atomic_copy(stream: IO[bytes], dest: Path, max_bytes: int | None = None) -> None:
    """Write what ``stream`` reads to ``dest`` through a temp file and a rename; past
    ``max_bytes`` it stops with ``ObjectTooLarge`` and leaves nothing."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}{PART_SUFFIX}")
    try:
        written = 0
        with open(tmp, "wb") as out:
            while chunk := stream.read(CHUNK):
                written += len(chunk)
                if max_bytes is not None and written > max_bytes:
                    raise ObjectTooLarge(f"more than {max_bytes} bytes")
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_local(source: Path, dest: Path, *, max_bytes: int | None = None) -> Path:
    """Copy a file atomically to ``dest`` (a file, or an existing folder to copy into)."""
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / source.name
    if dest.exists() and dest.resolve() == source.resolve():
        return dest
    try:
        size = source.stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise ObjectTooLarge(f"{size} bytes, more than {max_bytes}")
        with open(source, "rb") as stream:
            atomic_copy(stream, dest, max_bytes)
    except FileNotFoundError as exc:
        raise ObjectMissing(str(source)) from exc
    return dest


# --- S3-compatible object storage ------------------------------------------------------------

_clients: dict[tuple[Any, ...], Any] = {}
_clients_lock = threading.Lock()


def s3_client(storage: StorageSettings) -> Any:
    """A boto3 S3 client for these settings, one per process (clients are thread-safe; a
    session is not, hence the lock; a forked child builds its own connections)."""
    secret = storage.secret_access_key.get_secret_value() if storage.secret_access_key else None
    key = (os.getpid(), storage.endpoint_url, storage.region, storage.access_key_id, secret,
           storage.addressing_style)
    with _clients_lock:
        if key not in _clients:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as exc:
                raise StorageUnavailable("storage.url is s3:// but boto3 is not installed: "
                                         "pip install 'musicgen-pipeline[storage]'", "storage.url",
                                         {"rule": "not_installed"}) from exc
            config = Config(signature_version="s3v4", connect_timeout=5, read_timeout=60,
                            retries={"max_attempts": 3, "mode": "standard"},
                            s3={"addressing_style": storage.addressing_style},
                            # Checksums only where S3 requires them: many S3-compatible stores
                            # refuse the CRC headers boto3 sends by default since 1.36.
                            request_checksum_calculation="when_required",
                            response_checksum_validation="when_required")
            _clients[key] = boto3.session.Session().client(
                "s3", endpoint_url=storage.endpoint_url, region_name=storage.region,
                aws_access_key_id=storage.access_key_id, aws_secret_access_key=secret,
                config=config)
        return _clients[key]


def _is_missing(exc: BaseException) -> bool:
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound")


class S3Backend:
    """Keys are objects under ``s3://bucket/prefix/``."""

    local_root: Path | None = None

    def __init__(self, client: Any, bucket: str, prefix: str = "", *,
                 multipart_threshold: int = 64 * CHUNK) -> None:
        self.client, self.bucket = client, bucket
        self.prefix = prefix.strip("/")
        self.multipart_threshold = multipart_threshold

    def full_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.full_key(key)}"

    def key_of(self, uri: str) -> str | None:
        parts = urlsplit(uri)
        full = parts.path.lstrip("/")
        if parts.scheme != "s3" or parts.netloc != self.bucket:
            return None
        if not self.prefix:
            return full
        return full[len(self.prefix) + 1:] if full.startswith(self.prefix + "/") else None

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        # One thread: the caller is already a worker's task thread. Above the threshold the
        # upload is multipart, which S3 shows only once it is completed (s3transfer aborts it
        # on any failure).
        return TransferConfig(multipart_threshold=self.multipart_threshold,
                              multipart_chunksize=max(self.multipart_threshold, 5 * CHUNK),
                              use_threads=False)

    def put_file(self, source: Path, key: str) -> str:
        with open(source, "rb") as stream:
            return self.put_stream(stream, key)

    def put_stream(self, stream: IO[bytes], key: str) -> str:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            # The format's Content-Type, so a pre-signed download plays in a browser.
            media = MEDIA_TYPES_BY_SUFFIX.get(PurePosixPath(key).suffix, "application/octet-stream")
            self.client.upload_fileobj(stream, self.bucket, self.full_key(key),
                                       ExtraArgs={"ContentType": media},
                                       Config=self._transfer_config())
        except (BotoCoreError, ClientError, Boto3Error, OSError) as exc:
            raise _unavailable(f"could not store {self.uri(key)}", exc) from exc
        return self.uri(key)

    def _get(self, key: str) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.full_key(key))
        except ClientError as exc:
            if _is_missing(exc):
                raise ObjectMissing(self.uri(key)) from exc
            raise _unavailable(f"could not read {self.uri(key)}", exc) from exc
        except BotoCoreError as exc:
            raise _unavailable(f"could not read {self.uri(key)}", exc) from exc

    def get_file(self, key: str, dest: Path, *, max_bytes: int | None = None) -> Path:
        from botocore.exceptions import BotoCoreError

        dest = Path(dest)
        if dest.is_dir():
            dest = dest / key.rsplit("/", 1)[-1]
        response = self._get(key)
        size = int(response.get("ContentLength") or 0)
        body = response["Body"]
        try:
            if max_bytes is not None and size > max_bytes:  # refused before reading a byte
                raise ObjectTooLarge(f"{size} bytes, more than {max_bytes}")
            atomic_copy(body, dest, max_bytes)  # counted too: a length header can lie
        except BotoCoreError as exc:
            raise _unavailable(f"could not read {self.uri(key)}", exc) from exc
        finally:
            body.close()
        return dest

    def open(self, key: str) -> IO[bytes]:
        body: IO[bytes] = self._get(key)["Body"]
        return body

    def delete(self, keys: Iterable[str]) -> int:
        from botocore.exceptions import BotoCoreError, ClientError

        wanted = [{"Key": self.full_key(k)} for k in keys]
        try:
            for start in range(0, len(wanted), 1000):  # DeleteObjects takes 1000 at most
                self.client.delete_objects(Bucket=self.bucket, Delete={
                    "Objects": wanted[start:start + 1000], "Quiet": True})
        except (BotoCoreError, ClientError) as exc:
            raise _unavailable(f"could not delete from s3://{self.bucket}/{self.prefix}",
                               exc) from exc
        return len(wanted)

    def list(self, prefix: str = "") -> Iterator[StoredObject]:
        from botocore.exceptions import BotoCoreError, ClientError

        root = f"{self.prefix}/" if self.prefix else ""
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=root + prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    yield StoredObject(item["Key"][len(root):], int(item["Size"]),
                                       item["LastModified"].timestamp())
        except (BotoCoreError, ClientError) as exc:
            raise _unavailable(f"could not list s3://{self.bucket}/{root}", exc) from exc

    def presign(self, key: str, expires_s: int) -> str | None:
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.full_key(key)},
            ExpiresIn=expires_s)
        return url


# --- choosing one ----------------------------------------------------------------------------

def local_root(storage: StorageSettings) -> Path | None:
    """The folder results go to (``file://`` URL or ``output_dir``); None for object storage."""
    if storage.url and storage.url.startswith("s3://"):
        return None
    if storage.url:
        return Path(unquote(urlsplit(storage.url).path)).expanduser().resolve()
    return Path(storage.output_dir).expanduser().resolve()


def backend_for(storage: StorageSettings) -> StorageBackend:
    """The backend ``storage.url`` names (validated by the settings rules)."""
    root = local_root(storage)
    if root is not None:
        return LocalBackend(root)
    parts = urlsplit(storage.url or "")
    return S3Backend(s3_client(storage), parts.netloc, parts.path)


def backend_for_uri(uri: str, storage: StorageSettings) -> tuple[StorageBackend, str]:
    """The backend that holds ``uri`` and its key there: a ``file://`` URI is read where it
    points (a result's own path), an ``s3://`` one with the settings' endpoint and keys."""
    parts = urlsplit(uri)
    if parts.scheme == "file":
        path = Path(unquote(parts.path))
        return LocalBackend(path.parent), path.name
    if parts.scheme == "s3":
        return S3Backend(s3_client(storage), parts.netloc), parts.path.lstrip("/")
    raise ValueError(f"not a storage URI: {uri!r}")


def download(uri: str, dest: Path, storage: StorageSettings) -> Path:
    """Fetch a stored file to ``dest`` (a file path, or an existing folder: the file keeps its
    name) on this machine; ``StorageUnavailable`` if it is gone or the store is unreachable."""
    backend, key = backend_for_uri(uri, storage)
    try:
        return backend.get_file(key, Path(dest))
    except ObjectMissing as exc:
        raise StorageUnavailable(f"{uri} is gone (removed after storage.retention_days?)",
                                 "uri", {"rule": "missing"}) from exc


def presign_uri(uri: str, storage: StorageSettings) -> tuple[str | None, float]:
    """A fresh pre-signed GET URL for a stored file and when it expires (epoch seconds)."""
    import time

    backend, key = backend_for_uri(uri, storage)
    expires = storage.presign_expiry_s
    return backend.presign(key, expires), time.time() + expires


@contextmanager
def open_uri(uri: str, storage: StorageSettings) -> Iterator[IO[bytes]]:
    """A binary stream of a stored file, closed on exit."""
    backend, key = backend_for_uri(uri, storage)
    try:
        stream = backend.open(key)
    except ObjectMissing as exc:
        raise StorageUnavailable(f"{uri} is gone (removed after storage.retention_days?)",
                                 "uri", {"rule": "missing"}) from exc
    try:
        yield stream
    finally:
        stream.close()


__all__ = ["LocalBackend", "ObjectMissing", "ObjectTooLarge", "S3Backend", "StorageBackend",
           "StoredObject", "atomic_copy", "backend_for", "backend_for_uri", "copy_local", "download",
           "local_root", "open_uri", "presign_uri", "s3_client"]
