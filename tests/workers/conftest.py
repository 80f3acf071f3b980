"""Tiny MusicGen checkpoints, built once per test session (no download, ~1 s on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.runtime.loaded import LoadedModel
from workers.runtime.loading import load_model
from workers.runtime.tiny import make_tiny


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    # The tiny model's matrices are 32 wide: a second intra-op thread only adds synchronisation,
    # and on a busy 2-core CI machine the spinning threads made this suite ~10x slower.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``models/`` folder with ``tiny`` and ``tiny-melody``, laid out as the ``tiny`` preset."""
    models = tmp_path_factory.mktemp("data") / "models"
    make_tiny(models / "tiny")
    make_tiny(models / "tiny-melody", melody=True)
    return models


@pytest.fixture(scope="session")
def tiny_path(tiny_models_dir: Path) -> Path:
    return tiny_models_dir / "tiny"


@pytest.fixture(scope="session")
def tiny_melody_path(tiny_models_dir: Path) -> Path:
    return tiny_models_dir / "tiny-melody"


@pytest.fixture(scope="session")
def tiny_model(tiny_path: Path) -> LoadedModel:
    """The text-to-music tiny model, loaded through the real ``load_model`` path."""
    return load_model(str(tiny_path), device="cpu", dtype="float32", offline=True)


@pytest.fixture(scope="session")
def tiny_melody_model(tiny_melody_path: Path) -> LoadedModel:
    """The melody tiny model, loaded through the real ``load_model`` path."""
    return load_model(str(tiny_melody_path), device="cpu", dtype="float32", offline=True)
