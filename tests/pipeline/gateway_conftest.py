"""Fixtures for the gateway tests that need no worker: the real app (FastAPI's TestClient, in
process) over a real producer on the embedded file-system broker and a migrated SQLite file,
with real API keys. Jobs just queue; a test that needs a finished job stores its result in the
result backend as a worker does.

Load it as a plugin (``pytest_plugins = ["tests.pipeline.gateway_conftest"]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from pipeline.client.producer import Producer
from pipeline.config.schema import (
    ApiSettings,
    AppSettings,
    DatabaseSettings,
    QuotaSettings,
    Settings,
    StorageSettings,
)
from pipeline.gateway.app import create_app
from pipeline.gateway.keystore import ApiKeyStore
from pipeline.quota.configured import prepare_database


def gateway_settings(root: Path, **api: Any) -> Settings:
    """Development settings under ``root``: embedded broker, SQLite, unlimited quotas and no
    per-key rate unless ``api`` says otherwise."""
    return Settings(
        app=AppSettings(data_dir=str(root / "data")),
        database=DatabaseSettings(url=f"sqlite:///{root / 'quota.db'}"),
        storage=StorageSettings(output_dir=str(root / "outputs"), temp_dir=str(root / "tmp")),
        quotas=QuotaSettings(default_tier="enterprise"),
        api=ApiSettings(**{"rate": None, **api}),
    )


@dataclass
class Gateway:
    """A running app, its producer and settings, and a way to make keys."""

    app: FastAPI
    client: TestClient
    producer: Producer
    settings: Settings
    keys: ApiKeyStore

    def key(self, user: str) -> dict[str, str]:
        """The Authorization header of a new key for ``user``."""
        return {"Authorization": f"Bearer {self.keys.create(user).key}"}


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Builds a gateway under its own folder; ``api`` keys go to ``ApiSettings``."""
    built: list[Gateway] = []

    def make(**api: Any) -> Gateway:
        root = tmp_path / f"gw{len(built)}"
        settings = gateway_settings(root, **api)
        prepare_database(settings)
        producer = Producer(settings)
        app = create_app(settings, producer=producer)
        gateway = Gateway(app, TestClient(app), producer, settings,
                          ApiKeyStore(producer.quota.engine))
        built.append(gateway)
        return gateway

    yield make
    for gateway in built:
        gateway.client.close()
        gateway.producer.quota.close()


@pytest.fixture
def gateway(make_gateway: Callable[..., Gateway]) -> Gateway:
    return make_gateway()


@pytest.fixture
def settings_for() -> Callable[..., Settings]:
    """``gateway_settings`` for a test that builds its own app (no database prepared)."""
    return gateway_settings
