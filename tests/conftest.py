"""Fixtures shared by every test folder. Keep each group small and labelled."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from pipeline.config.schema import StorageSettings

# --- settings: a clean environment for loading the layers -----------------------------------

def _substituted_vars() -> set[str]:
    """Every ${VAR} the packaged layer files read (REDIS_URL, FLOWER_PASSWORD, ...)."""
    from pipeline.config.layers import settings_dir

    return {name for path in settings_dir().rglob("*.toml")
            for name in re.findall(r"\$\{([A-Za-z_]\w*)", path.read_text(encoding="utf-8"))}


@pytest.fixture
def isolated_settings_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = tmp_path (no stray settings.local.toml); no MUSICGEN_* nor ${VAR} variables set."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("MUSICGEN_") or name in _substituted_vars():
            monkeypatch.delenv(name)
    return tmp_path


# Strong dummy values: production's rules refuse short or common secrets.
PRODUCTION_ENV = {
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "REDIS_PASSWORD": "redis-Pw-0123456789abcdef",
    "DATABASE_URL": "sqlite:///.musicgen/musicgen.db",
    "FLOWER_PASSWORD": "flower-Pw-0123456789abcdef",
}


@pytest.fixture
def production_env(isolated_settings_env: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The variables the production layers substitute, set to valid (strong) dummy values."""
    for name, value in PRODUCTION_ENV.items():
        monkeypatch.setenv(name, value)
    return dict(PRODUCTION_ENV)


# --- object storage: a real S3 API (moto's standalone server) on a loopback port ------------

S3_KEYS = {"access_key_id": "testing", "secret_access_key": "testing-secret-0123456789"}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of an S3 server that speaks the real protocol over HTTP."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_storage(s3_endpoint: str) -> StorageSettings:
    """Storage settings on a fresh, empty bucket of that server (prefix ``results``)."""
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.session.Session().client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1",
        aws_access_key_id=S3_KEYS["access_key_id"],
        aws_secret_access_key=S3_KEYS["secret_access_key"])
    client.create_bucket(Bucket=bucket)
    client.close()
    return StorageSettings(url=f"s3://{bucket}/results", endpoint_url=s3_endpoint,
                           region="us-east-1", addressing_style="path",
                           access_key_id=S3_KEYS["access_key_id"],
                           secret_access_key=SecretStr(S3_KEYS["secret_access_key"]))
