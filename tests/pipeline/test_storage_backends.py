"""Storage backends against a real S3 server (moto's, over HTTP on a loopback port) and a real
folder: the same test body for both. Writes are all or nothing, a result is fetched from its
URI alone, and a pre-signed URL works with plain HTTP."""

from __future__ import annotations

import io
import urllib.request
from pathlib import Path

import pytest

from pipeline.config.schema import StorageSettings
from pipeline.errors import StorageUnavailable
from pipeline.infra.storage_backends import (
    CHUNK,
    ObjectMissing,
    ObjectTooLarge,
    S3Backend,
    StorageBackend,
    backend_for,
    download,
    open_uri,
    s3_client,
)

pytestmark = pytest.mark.timeout(60)


class FailingStream(io.RawIOBase):
    """Reads ``good`` bytes, then fails as a dropped connection or a full disk would."""

    def __init__(self, good: int) -> None:
        self.left = good

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self.left <= 0:
            raise OSError("the source failed half-way")
        n = min(len(buffer), self.left)
        buffer[:n] = b"x" * n
        self.left -= n
        return n


@pytest.fixture(params=["folder", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> StorageSettings:
    if request.param == "folder":
        return StorageSettings(url=(tmp_path / "store").as_uri())
    settings: StorageSettings = request.getfixturevalue("s3_storage")
    return settings


def test_a_stored_file_is_read_back_from_its_uri_alone(storage: StorageSettings,
                                                       tmp_path: Path) -> None:
    backend = backend_for(storage)
    source = tmp_path / "song.wav"
    source.write_bytes(b"RIFF" + bytes(range(256)) * 40)
    uri = backend.put_file(source, "job-1.wav")
    assert uri.startswith("file:///" if backend.local_root else "s3://")
    assert backend.key_of(uri) == "job-1.wav"
    assert [o.key for o in backend.list()] == ["job-1.wav"]

    fetched = download(uri, tmp_path / "elsewhere" / "copy.wav", storage)
    assert fetched.read_bytes() == source.read_bytes()
    with open_uri(uri, storage) as stream:
        assert stream.read() == source.read_bytes()

    backend.delete(["job-1.wav"])
    with pytest.raises(StorageUnavailable) as gone:
        download(uri, tmp_path / "again.wav", storage)
    assert gone.value.details == {"rule": "missing"}


def test_a_failed_upload_leaves_no_object(storage: StorageSettings) -> None:
    backend = backend_for(storage)
    with pytest.raises(StorageUnavailable):
        backend.put_stream(io.BufferedReader(FailingStream(100_000)), "half.wav")
    assert list(backend.list()) == []
    if backend.local_root is not None:  # not even a temp file is left in the folder
        assert list(backend.local_root.iterdir()) == []


def test_a_failed_multipart_upload_is_aborted(s3_storage: StorageSettings) -> None:
    client = s3_client(s3_storage)
    bucket = s3_storage.url.split("/")[2] if s3_storage.url else ""
    backend = S3Backend(client, bucket, "results", multipart_threshold=5 * CHUNK)
    # Two full 5 MiB parts are sent before the source fails: S3 holds them until the upload is
    # completed or aborted, and it must be aborted.
    with pytest.raises(StorageUnavailable):
        backend.put_stream(io.BufferedReader(FailingStream(11 * CHUNK)), "big.wav")
    assert list(backend.list()) == []
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    backend.put_stream(io.BytesIO(b"y" * (6 * CHUNK)), "big.wav")  # and a whole one appears
    assert [(o.key, o.size) for o in backend.list()] == [("big.wav", 6 * CHUNK)]


def test_a_presigned_url_is_fetched_with_plain_http(s3_storage: StorageSettings) -> None:
    backend = backend_for(s3_storage)
    backend.put_stream(io.BytesIO(b"finished audio"), "job-2.mp3")
    url = backend.presign("job-2.mp3", 120)
    assert url is not None and url.startswith(s3_storage.endpoint_url or "")
    assert "X-Amz-Signature=" in url and "testing-secret" not in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"finished audio"
        assert response.headers["Content-Type"] == "audio/mpeg"  # plays in a browser
    tampered = url.replace("job-2.mp3", "job-3.mp3")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(tampered, timeout=10)
    assert refused.value.code in (403, 404)
    refused.value.close()


def test_reading_is_bounded(storage: StorageSettings, tmp_path: Path) -> None:
    backend: StorageBackend = backend_for(storage)
    backend.put_stream(io.BytesIO(b"z" * 5000), "inputs/m.wav")
    with pytest.raises(ObjectTooLarge):
        backend.get_file("inputs/m.wav", tmp_path / "m.wav", max_bytes=4999)
    assert not (tmp_path / "m.wav").exists()
    assert backend.get_file("inputs/m.wav", tmp_path / "m.wav", max_bytes=5000).stat().st_size == 5000
    with pytest.raises(ObjectMissing):
        backend.get_file("inputs/none.wav", tmp_path / "n.wav")


def test_a_key_never_leaves_the_folder(tmp_path: Path) -> None:
    backend = backend_for(StorageSettings(output_dir=str(tmp_path / "out")))
    assert backend.local_root == tmp_path / "out"
    with pytest.raises(ValueError, match="leaves the storage folder"):
        backend.put_stream(io.BytesIO(b"x"), "../escape.wav")
    assert backend.key_of((tmp_path / "elsewhere.wav").as_uri()) is None


def test_an_expired_download_url_is_signed_again(s3_storage: StorageSettings) -> None:
    from pipeline.client.handle import _fresh
    from pipeline.config.schema import Settings
    from pipeline.contract.jobs import JobResult, Timings

    backend = backend_for(s3_storage)
    uri = backend.put_stream(io.BytesIO(b"old result"), "job-4.wav")
    stale = JobResult(job_id="job-4", uri=uri, download_url="http://expired.invalid/x",
                      download_expires_at=1.0, format="wav", duration=1.0, sample_rate=32000,
                      channels=1, bit_depth=16, loudness_lufs=None, peak_dbfs=None,
                      model="tiny", seed=1, worker="w", timings=Timings())
    fresh = _fresh(stale, Settings(storage=s3_storage))
    assert fresh.download_url != stale.download_url and fresh.download_url is not None
    assert (fresh.download_expires_at or 0) > 1.0
    with urllib.request.urlopen(fresh.download_url, timeout=10) as response:
        assert response.read() == b"old result"
    assert _fresh(fresh, Settings(storage=s3_storage)) is fresh  # still valid: left as it is
