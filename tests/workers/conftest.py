"""Tiny MusicGen checkpoints, built once per test session (no download, ~1 s on CPU)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
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


@pytest.fixture(scope="module")
def short_window(tiny_model: LoadedModel) -> LoadedModel:
    """The tiny model with a 2 s window (100 frames): long-form after 2 s."""
    return dataclasses.replace(tiny_model, max_duration_s=2.0)


@pytest.fixture(scope="module")
def clip(tiny_model: LoadedModel) -> np.ndarray:
    """A clip to continue: 0.5 s of the tiny model's own audio (so EnCodec sees the kind of
    signal it codes) plus a part-frame of 300 samples: 25 whole frames, (1, n) at 32 kHz."""
    from workers.runtime import GenerationItem, generate

    [made] = generate(tiny_model, [GenerationItem("a drum", 1.0, seed=3)])
    return made.samples[:, :25 * 640 + 300]
