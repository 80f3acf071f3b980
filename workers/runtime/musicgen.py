"""The MusicGen runtime: load a checkpoint, turn a batch of requests into audio.

Only ``model.generate`` needs the accelerator; validation, grouping, length arithmetic and
trimming all run (and are tested) on the CPU with the tiny model from ``workers.runtime.tiny``.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoProcessor,
    MusicgenForConditionalGeneration,
    MusicgenMelodyForConditionalGeneration,
    PreTrainedModel,
)

from pipeline.contract.long_form import MODEL_WINDOW_S as DEFAULT_MAX_DURATION_S
from pipeline.contract.long_form import WINDOW_STRIDE_S as DEFAULT_WINDOW_STRIDE_S
from pipeline.errors import (
    GpuOutOfMemory,
    ModelNotFound,
    ModelRuntimeError,
    PipelineError,
    UnsupportedOption,
)
from workers.runtime.batch import (
    GeneratedAudio,
    GenerationItem,
    batch_key,
    bucket_frames,
    padding_waste,
    validate_items,
    window_sink,
)
from workers.runtime.device import resolve_device, resolve_dtype
from workers.runtime.longform import Window, WindowHook, generate_long, long_frames, plan_windows
from workers.runtime.melody import MelodyProcessor, resample
from workers.runtime.progress import ProgressCallback, ProgressReporter, StepCounter
from workers.runtime.sampling import JobSampler, JobSampling

log = logging.getLogger(__name__)

# Sampling no longer touches torch's process-global generator (each item draws from its own, see
# workers.runtime.sampling), so this lock is not about reproducibility. It keeps one generate call
# at a time per process: two interleaved calls would each hold their KV caches in GPU memory and
# contend for the same kernels, where one wider batch does the same work in one pass.
GENERATE_LOCK = threading.Lock()


@dataclass
class LoadedModel:
    """A MusicGen checkpoint ready to generate, with the audio facts the runtime needs."""

    model: MusicgenForConditionalGeneration | MusicgenMelodyForConditionalGeneration
    processor: Any  # MusicgenProcessor, or MelodyProcessor for melody checkpoints
    source: str
    device: str
    dtype: torch.dtype
    sampling_rate: int
    frame_rate: float
    samples_per_frame: int
    num_codebooks: int
    is_melody: bool
    max_duration_s: float
    load_seconds: float
    audio_channels: int = 1  # 2 for musicgen-stereo-*: codebooks interleaved left, right

    @property
    def delay_codebooks(self) -> int:
        """Codebooks per channel: the delay pattern's depth (stereo delays left and right alike)."""
        return self.num_codebooks // self.audio_channels


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
        _compile_decoder(loaded)
    loaded.load_seconds = time.perf_counter() - started
    log.info("loaded %s on %s/%s in %.1fs", source, device, torch_dtype, loaded.load_seconds)
    return loaded


def loaded_model(model: MusicgenForConditionalGeneration | MusicgenMelodyForConditionalGeneration,
                 processor: Any, *, source: str, device: str, dtype: torch.dtype) -> LoadedModel:
    """A ``LoadedModel`` for a MusicGen already in memory (on ``device``, in ``dtype``).

    The audio facts are read from the model's own config, so a checkpoint from disk
    (``load_model``) and a model built in code (``workers.runtime.shapes``) get them alike.
    """
    config: Any = model.config  # typed loosely by transformers (its sub-configs may be dicts)
    audio = config.audio_encoder
    sampling_rate = int(audio.sampling_rate)
    hop = int(getattr(audio, "hop_length", 0) or round(sampling_rate / audio.frame_rate))
    frame_rate = sampling_rate / hop
    return LoadedModel(
        model=model, processor=processor, source=source, device=device, dtype=dtype,
        sampling_rate=sampling_rate, frame_rate=frame_rate, samples_per_frame=hop,
        num_codebooks=int(config.decoder.num_codebooks),
        is_melody=config.model_type == "musicgen_melody",
        max_duration_s=_max_duration(model, frame_rate), load_seconds=0.0,
        audio_channels=int(getattr(config.decoder, "audio_channels", 1) or 1),
    )


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


def frames_for(duration_s: float, loaded: LoadedModel) -> int:
    """Audio frames (codec steps) needed to cover ``duration_s`` seconds."""
    return max(1, math.ceil(round(duration_s * loaded.sampling_rate) / loaded.samples_per_frame))


def max_new_tokens_for(frames: int, num_codebooks: int) -> int:
    """``max_new_tokens`` that makes HF's MusicGen return ``frames`` codec frames (or more).

    HF's generate builds the codebook delay pattern over ``1 + max_new_tokens`` positions and
    strips the ``num_codebooks`` padding positions per codebook, leaving
    ``max_new_tokens + 1 - num_codebooks`` frames (a stereo model delays each channel's
    codebooks alike: pass ``LoadedModel.delay_codebooks``, its codebooks per channel). Below ``2*num_codebooks - 1`` positions it skips
    the pattern altogether, so short requests are lifted to that floor (and trimmed afterwards).
    """
    return max(frames + num_codebooks - 1, 2 * num_codebooks - 2)


def bucket_for(duration_s: float, loaded: LoadedModel,
               stride_s: float = DEFAULT_WINDOW_STRIDE_S) -> int:
    """Frames generated for an item of ``duration_s`` seconds, alone or in any batch.

    Past the window it is the long clip's total for windows ``stride_s`` apart
    (``workers.runtime.longform.long_frames``), always more than any in-window bucket, so long
    and short items never share a call.
    """
    frames, window = frames_for(duration_s, loaded), window_frames(loaded)
    if frames <= window:
        return bucket_frames(frames, window)
    return long_frames(frames, window, _stride_frames(stride_s, loaded))


def _stride_frames(stride_s: float, loaded: LoadedModel) -> int:
    return max(1, round(stride_s * loaded.frame_rate))


def window_frames(loaded: LoadedModel) -> int:
    """The frames one ``model.generate`` call may produce: the checkpoint's window."""
    return frames_for(loaded.max_duration_s, loaded)


def windows_of(item: GenerationItem, loaded: LoadedModel) -> list[Window]:
    """The model calls ``item`` takes: one within the window, more past it."""
    total = bucket_for(item.duration_s, loaded, item.window_stride_s)
    if total <= window_frames(loaded):
        return [Window(0, 0, 0, total)]
    return plan_windows(total, window_frames(loaded), _stride_frames(item.window_stride_s, loaded))


def padding_waste_for(loaded: LoadedModel, items: list[GenerationItem]) -> float:
    """The fraction of frames ``generate`` would produce for ``items`` that no item needs."""
    return padding_waste([frames_for(item.duration_s, loaded) for item in items],
                         [bucket_for(item.duration_s, loaded, item.window_stride_s)
                          for item in items])


def generate(loaded: LoadedModel, items: list[GenerationItem],
             progress: ProgressCallback | None = None, *,
             on_window: WindowHook | None = None) -> list[GeneratedAudio]:
    """Generate audio for every item of a batch; results come back in the items' order.

    Items that share a duration bucket, a guidance scale and melody or not (and, on a melody
    model, a prompt length in tokens) run in one padded
    ``model.generate`` call (``batch_key_for``); the groups run one after another. Each item is
    generated for its bucket's frame count, samples from its own generator seeded with its seed
    (reported back, drawn at random when the item has none) and is trimmed to its own length, so
    a seed reproduces the clip bit for bit on the same model and hardware, whatever the item's
    batch neighbours (docs/engine.md, "What shares a batch", says how exact that is across batch
    shapes).

    Items past the model's window run window by window (``workers.runtime.longform``, in
    lockstep with the items of their group); ``on_window`` hears of each finished window.
    """
    validate_items(items, max_duration_s=loaded.max_duration_s, sampling_rate=loaded.sampling_rate,
                   melody_supported=loaded.is_melody)
    seeds = [int(item.seed) if item.seed is not None else secrets.randbelow(2**31) for item in items]
    by_key: dict[Hashable, list[int]] = {}  # batch_groups, with each item's own stride
    for index, item in enumerate(items):
        by_key.setdefault(batch_key_for(loaded, item), []).append(index)
    groups = list(by_key.values())
    windows = {tuple(g): windows_of(items[g[0]], loaded) for g in groups}
    steps = {key: sum(max_new_tokens_for(w.new, loaded.delay_codebooks) for w in plan)
             for key, plan in windows.items()}
    reporter = ProgressReporter(progress, sum(steps.values()))
    results: list[GeneratedAudio | None] = [None] * len(items)
    for group in groups:
        started = time.perf_counter()
        plan = windows[tuple(group)]
        if len(plan) == 1:
            audio = _generate_group(loaded, [items[i] for i in group], [seeds[i] for i in group],
                                    steps[tuple(group)], reporter)
        else:
            audio = generate_long(loaded, [items[i] for i in group], [seeds[i] for i in group],
                                  reporter, plan, on_window=on_window or window_sink.get())
        elapsed = time.perf_counter() - started
        waste = padding_waste_for(loaded, [items[i] for i in group])
        for row, index in enumerate(group):
            target = round(items[index].duration_s * loaded.sampling_rate)
            if audio.shape[-1] < target:
                raise ModelRuntimeError(
                    f"model returned {audio.shape[-1]} samples, {target} were needed",
                    details={"source": loaded.source})
            results[index] = GeneratedAudio(
                samples=np.ascontiguousarray(audio[row, :, :target]),
                sample_rate=loaded.sampling_rate, duration_s=target / loaded.sampling_rate,
                seed=seeds[index], generate_seconds=elapsed, batch_size=len(group),
                padding_waste=waste)
        log.debug("generated %d item(s) in %.2fs, %d steps, %.0f%% padding waste", len(group),
                  elapsed, steps[tuple(group)], 100 * waste)
    reporter.finish(f"generated {len(items)} item(s)")
    return [r for r in results if r is not None]


def batch_key_for(loaded: LoadedModel, item: GenerationItem) -> Hashable:
    """The key under which ``item`` may share a ``generate`` call with others on ``loaded``."""
    return batch_key(item, lambda d: bucket_for(d, loaded, item.window_stride_s),
                     _prompt_tokens(loaded) if loaded.is_melody else None)


def _prompt_tokens(loaded: LoadedModel) -> Callable[[str], int]:
    tokenizer = loaded.processor.tokenizer

    def count(prompt: str) -> int:
        return len(tokenizer(prompt)["input_ids"])

    return count


def _generate_group(loaded: LoadedModel, items: list[GenerationItem], seeds: list[int],
                    max_new_tokens: int, reporter: ProgressReporter) -> np.ndarray:
    """One ``model.generate`` call for items sharing a batch key: (batch, channels, n)."""
    guidance_scale = items[0].guidance_scale
    sampler = JobSampler(
        [JobSampling(seed=seed, temperature=item.temperature, top_k=item.top_k, top_p=item.top_p)
         for item, seed in zip(items, seeds, strict=True)],
        guidance_scale=guidance_scale, device=loaded.device)
    # do_sample=False: the sampler has already chosen each token, greedy decoding only reads it
    # back, and HF adds none of its own temperature/top-k/top-p warpers after it.
    kwargs: dict[str, Any] = {
        **model_inputs(loaded, items), "do_sample": False, "guidance_scale": guidance_scale,
        "max_new_tokens": max_new_tokens, "logits_processor": [StepCounter(reporter), sampler],
    }
    with GENERATE_LOCK:
        try:
            with torch.inference_mode():
                out = loaded.model.generate(**kwargs)
        except PipelineError:
            raise
        except RuntimeError as e:
            raise_runtime(e, "generation")
    audio: np.ndarray = out.to(torch.float32).cpu().numpy()
    return audio


def model_inputs(loaded: LoadedModel, items: list[GenerationItem]) -> dict[str, torch.Tensor]:
    prompts = [item.prompt for item in items]
    if any(item.melody is not None for item in items):
        rate = loaded.processor.sampling_rate
        waves = [_mono_at(item.melody, rate) for item in items if item.melody is not None]
        inputs = loaded.processor(text=prompts, audio=waves, sampling_rate=rate, padding=True)
    else:
        inputs = loaded.processor(text=prompts, padding=True, return_tensors="pt")
    moved: dict[str, torch.Tensor] = {}
    for name, value in dict(inputs).items():
        value = value.to(loaded.device)
        moved[name] = value.to(loaded.dtype) if value.is_floating_point() else value
    return moved


def _mono_at(melody: tuple[np.ndarray, int], rate: int) -> np.ndarray:
    samples, source_rate = melody
    wave = np.asarray(samples, dtype=np.float32)
    if wave.ndim == 2:
        wave = wave.mean(axis=0)
    return resample(torch.from_numpy(np.ascontiguousarray(wave)), source_rate, rate).numpy()


def raise_runtime(error: RuntimeError, during: str) -> NoReturn:
    """Map a torch RuntimeError to the pipeline's errors (always raises)."""
    raise runtime_error(error, during) from error


def runtime_error(error: RuntimeError, during: str) -> PipelineError:
    """The pipeline error ``raise_runtime`` raises for ``error``, without raising it: for a
    failure that belongs to one row of a batch and is handed back as that row's result.

    Out of memory (CUDA's own error, or any whose message says so) is ``GpuOutOfMemory`` and
    empties the CUDA cache; anything else is ``ModelRuntimeError``. ``error`` is the cause.
    """
    converted: PipelineError
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower():
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            torch.cuda.empty_cache()
        converted = GpuOutOfMemory(f"out of GPU memory during {during}: {error}")
    else:
        converted = ModelRuntimeError(f"model failed during {during}: {error}")
    converted.__cause__ = error
    return converted


def _looks_like_path(source: str) -> bool:
    # A hub id is "name" or "owner/name"; anything absolute, relative-dotted, home-based or deeper
    # is meant as a directory, and must not fall through to a hub lookup when it is missing.
    return (source.startswith(("/", ".", "~")) or os.sep in source.replace("/", "", 1)
            or source.count("/") > 1)


def _max_duration(model: PreTrainedModel, frame_rate: float) -> float:
    # The generation window the checkpoint ships (1500 tokens for facebook/musicgen-*), capped by
    # the decoder's position table. A checkpoint without one gets transformers' default of 20
    # tokens, which is no window at all: fall back to MusicGen's 30 s.
    window = int(getattr(model.generation_config, "max_length", 0) or 0)
    positions = int(getattr(model.config.decoder, "max_position_embeddings", window) or window)
    seconds = min(window, positions) / frame_rate
    return seconds if 1.0 <= seconds <= 300.0 else DEFAULT_MAX_DURATION_S


def _compile_decoder(loaded: LoadedModel) -> None:
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

