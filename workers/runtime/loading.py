"""Loading a MusicGen checkpoint: from a hub id or a directory, onto its device, compiled or not."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoProcessor,
    MusicgenForConditionalGeneration,
    MusicgenMelodyForConditionalGeneration,
)

from pipeline.errors import ModelNotFound, UnsupportedOption
from workers.runtime.batch import GenerationItem
from workers.runtime.device import resolve_device, resolve_dtype
from workers.runtime.errors import raise_runtime
from workers.runtime.loaded import LoadedModel, loaded_model
from workers.runtime.melody import MelodyProcessor
from workers.runtime.musicgen import generate

log = logging.getLogger(__name__)


def load_model(source: str, *, device: str = "auto", dtype: str = "auto", compile: bool = False,
               offline: bool = False, cache_dir: str | None = None,
               download_timeout: int | None = None) -> LoadedModel:
    """Load a MusicGen (or MusicGen-Melody) checkpoint from a hub id or a local directory.

    ``offline`` restricts loading to local files and the hub cache. A missing directory or an
    unknown/uncached hub id raises ``ModelNotFound``; a checkpoint that is not MusicGen raises
    ``UnsupportedOption``. ``compile`` torch.compiles the decoder and warms it up; if that fails,
    the model runs uncompiled (with a warning) rather than not at all. ``download_timeout``
    (``model.download_timeout``) is applied with ``apply_hub_timeouts``; None keeps what the
    process already has.
    """
    started = time.perf_counter()
    if download_timeout is not None:
        apply_hub_timeouts(download_timeout)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    path = os.path.expanduser(source)  # settings may say ~/models/..., from_pretrained won't expand
    if not os.path.isdir(path) and _looks_like_path(path):
        where = f" ({path})" if path != source else ""
        raise ModelNotFound(f"model directory {source!r}{where} does not exist", field="model",
                            details={"source": source})
    files: dict[str, Any] = {"cache_dir": cache_dir, "local_files_only": offline}
    try:
        config = AutoConfig.from_pretrained(path, **files)
    except (OSError, ValueError) as e:
        where = (" (offline: only local files and the hub cache are searched; fill the cache "
                 "with `musicgen-pipeline models download PRESET` or `models import PRESET PATH`)"
                 if offline else "")
        raise ModelNotFound(f"cannot load model {source!r}{where}: {e}", field="model",
                            details={"source": source}) from e
    if config.model_type not in ("musicgen", "musicgen_melody"):
        raise UnsupportedOption(f"{source!r} is a {config.model_type!r} checkpoint, not MusicGen",
                                field="model")
    is_melody = config.model_type == "musicgen_melody"
    model_class = (MusicgenMelodyForConditionalGeneration if is_melody
                   else MusicgenForConditionalGeneration)
    try:
        processor = (MelodyProcessor.from_pretrained(path, **files) if is_melody
                     else AutoProcessor.from_pretrained(path, **files))  # type: ignore[no-untyped-call]
        model = model_class.from_pretrained(path, dtype=torch_dtype, **files)
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"checkpoint {source!r} is incomplete or unreadable: {e}",
                            field="model", details={"source": source}) from e
    try:
        model.to(device)  # type: ignore[arg-type]
        model.eval()  # type: ignore[no-untyped-call]
    except RuntimeError as e:
        raise_runtime(e, f"moving {source!r} to {device}")
    loaded = loaded_model(model, processor, source=source, device=device, dtype=torch_dtype)
    if compile:
        compile_decoder(loaded)
    loaded.load_seconds = time.perf_counter() - started
    log.info("loaded %s on %s/%s in %.1fs", source, device, torch_dtype, loaded.load_seconds)
    return loaded


def apply_hub_timeouts(seconds: int) -> None:
    """Give each Hugging Face hub request (file metadata and file download) ``seconds`` to answer.

    It is huggingface_hub's per-request timeout (connect and each read), not a cap on a whole
    download: a multi-gigabyte checkpoint may take longer as long as bytes keep coming. The
    ``HF_HUB_DOWNLOAD_TIMEOUT``/``HF_HUB_ETAG_TIMEOUT`` variables are read once, when
    huggingface_hub is imported, and transformers imported it with this module, so setting them
    now would change nothing. The module constants are what ``hf_hub_download`` and ``http_get``
    read at every request: they are the knob. Process-wide, like the variables they stand for.
    """
    from huggingface_hub import constants

    constants.HF_HUB_DOWNLOAD_TIMEOUT = seconds
    # hf_hub_download prefers this over its own etag_timeout argument whenever it differs from
    # the default of 10 s, so the metadata request that precedes every download gets it too.
    constants.HF_HUB_ETAG_TIMEOUT = seconds


def _looks_like_path(source: str) -> bool:
    # A hub id is "name" or "owner/name"; anything absolute, relative-dotted, home-based or deeper
    # is meant as a directory, and must not fall through to a hub lookup when it is missing.
    return (source.startswith(("/", ".", "~")) or os.sep in source.replace("/", "", 1)
            or source.count("/") > 1)


def compile_decoder(loaded: LoadedModel) -> None:
    """torch.compile ``loaded``'s decoder and warm it up; uncompiled (warned) if that fails."""
    decoder: torch.nn.Module = loaded.model.decoder
    decoder.forward = torch.compile(decoder.forward, dynamic=True)
    warmup = GenerationItem(prompt="warm up", duration_s=2 / loaded.frame_rate, seed=0)
    try:
        # torch.compile is lazy: compiler errors only surface on the first call, so make it here.
        generate(loaded, [warmup])
    except Exception as e:  # noqa: BLE001 - any compiler failure means "run uncompiled"
        del decoder.forward  # back to the class's own forward
        log.warning("torch.compile of the %s decoder failed, running uncompiled: %s",
                    loaded.source, e)
