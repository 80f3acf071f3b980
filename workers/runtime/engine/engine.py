"""``StaticEngine``: MusicGen decoding with a static cache and continuous batching.

Rows are admitted one job at a time (its prompt encoded once, its cross-attention cache filled),
every ``step`` advances all active rows by one token, and a row that has produced its frames is
decoded by EnCodec and leaves at once, so its slot takes the next job while its neighbours go on.
Each row runs exactly as the HF path would run it alone (its bucket's ``max_new_tokens``, its own
delay pattern, guidance scale and generator, sampled by ``choose_tokens``), which is what makes
its codes the HF path's codes: see the module docstrings of ``decoder``, ``delay`` and ``cache``.

A continuation's row is prompted with its clip's EnCodec codes (issue 25), as HF generate is
with ``decoder_input_ids``: at admission the clip's positions go through the decoder in one pass
(``DecoderStep.prefill``, HF's prefill), which writes the row's keys and values and leaves it at
the clip's last position; from there it steps with the others, its tokens replaced by the clip's
wherever the delay pattern still puts a clip frame (``_force_prompt``: the later codebooks lag
the first by their delay). Its first step is HF's first generated position, where both draw their
first random numbers, so its codes are the HF path's (tests/workers/
test_engine_continuation.py).

One engine belongs to one thread (the worker's GPU loop); nothing in it is locked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.errors import ModelRuntimeError, PipelineError, UnsupportedOption
from workers.runtime.batch import GeneratedAudio, GenerationItem, validate_items
from workers.runtime.clips import trimmed_clip
from workers.runtime.conditioning import continuation_audio, model_inputs
from workers.runtime.engine.cache import StaticCache
from workers.runtime.engine.compile import (
    StepFunction,
    bucket_of,
    compile_step,
    length_buckets,
    row_buckets,
)
from workers.runtime.engine.decoder import DecoderStep
from workers.runtime.engine.delay import codebook_delays, codes_of, frames_of, keep_generated
from workers.runtime.engine.slots import Row, Slots
from workers.runtime.engine.stream import decode_codes
from workers.runtime.errors import raise_runtime, runtime_error
from workers.runtime.frames import (
    check_continuation,
    item_frames,
    max_new_tokens_for,
    padding_waste_for,
    prompt_frames,
    window_frames,
)
from workers.runtime.loaded import LoadedModel
from workers.runtime.longform import encode_audio
from workers.runtime.sampling import RowSampling, choose_tokens, sampling_of

log = logging.getLogger(__name__)

DEFAULT_MAX_PROMPT_TOKENS = 128  # cross-attention cache per row; longer prompts run on HF
LENGTH_STEP = 64  # the eager step reads self-attention up to the furthest row, in these steps
# Finished rows of one length EnCodec decodes in one call, at most: its activations at the audio
# rate grow with rows x length (a 30 s row's last layers hold tens of MB per channel).
DECODE_ROWS = 16


class EngineUnsupported(UnsupportedOption):
    """Raised when an item (or a model) is one the static engine does not run; HF generate does."""


class StaticEngine:
    """Continuous-batching MusicGen decoding over ``max_rows`` rows of a preallocated cache.

    ``compile`` torch.compiles the step for a few row-count buckets times a few self-attention
    lengths (``lengths``, by default 256 / 512 / 1024, each below the window, then the window;
    ``length_buckets`` is what was chosen; ``rows`` replaces the row buckets 1, 2, 4, ...,
    ``max_rows``) and warms it up here; if that fails, ``compiled`` is False and the eager step
    runs (a warning is logged). On a model it cannot run (MusicGen-Melody) the engine is built
    but ``supports`` refuses every item.
    """

    def __init__(self, loaded: LoadedModel, max_rows: int = 8, compile: bool = False, *,
                 max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
                 lengths: Sequence[int] | None = None,
                 rows: Sequence[int] | None = None) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.loaded = loaded
        self.max_rows = max_rows
        self.max_prompt_tokens = max_prompt_tokens
        self.compiled = False
        self.unsupported_model = (
            "MusicGen-Melody prepends its conditioning to the decoder input"
            if loaded.is_melody else None)
        self._slots = Slots(max_rows)
        self._window = window_frames(loaded)
        self._steps_max = max_new_tokens_for(self._window, loaded.delay_codebooks)
        self._device = torch.device(loaded.device)
        # ``rows``: the row buckets, for a benchmark that bounds compile time with one.
        chosen = row_buckets(max_rows) if rows is None else rows
        self._buckets = sorted({*(r for r in chosen if 0 < r < max_rows), max_rows})
        self.length_buckets = length_buckets(self._steps_max, lengths)
        self.last_length: int | None = None  # self-attention positions the last step read
        self._active_cache: tuple[list[int], torch.Tensor, RowSampling | None] | None = None
        self._any_prompted = False  # an active row is a continuation's (set with _active_cache)
        self._step_fn: StepFunction | None = None
        if self.unsupported_model is not None:
            return
        model: Any = loaded.model
        config = model.config.decoder
        self._pad = int(model.generation_config.pad_token_id
                        if model.generation_config.pad_token_id is not None
                        else config.pad_token_id)
        with torch.inference_mode():
            self._cache = StaticCache(
                layers=config.num_hidden_layers, rows=max_rows,
                heads=config.num_attention_heads,
                head_dim=config.hidden_size // config.num_attention_heads,
                positions=self._steps_max, text_tokens=max_prompt_tokens, dtype=loaded.dtype,
                device=self._device)
            self._step = DecoderStep(model, self._cache)
            codebooks = loaded.num_codebooks
            self._delays = codebook_delays(codebooks, loaded.audio_channels, self._device)
            self._tokens = torch.full((max_rows, codebooks), self._pad, dtype=torch.long,
                                      device=self._device)
            self._position = torch.zeros(max_rows, dtype=torch.long, device=self._device)
            self._frames = torch.zeros(max_rows, dtype=torch.long, device=self._device)
            self._scale = torch.ones(max_rows, dtype=torch.float32, device=self._device)
            self._guided = torch.zeros(max_rows, dtype=torch.bool, device=self._device)
            self._codes = torch.full((max_rows, codebooks, self._steps_max + 1), self._pad,
                                     dtype=torch.long, device=self._device)
            # A continuation's prompt codes laid out by the delay pattern (pad elsewhere), and
            # each row's prompt frames (0: none): ``_force_prompt``.
            self._given = torch.full_like(self._codes, self._pad)
            self._prompt_frames = torch.zeros(max_rows, dtype=torch.long, device=self._device)
            self._codebook_ids = torch.arange(codebooks, device=self._device)
            self._project = (model.text_encoder.config.hidden_size != config.hidden_size
                             and config.cross_attention_hidden_size is None)
        self._step_fn = self._step
        if compile:
            # The step writes the cache in place: marked static, CUDA graphs keep their
            # addresses instead of refusing to capture a step that mutates its inputs.
            for tensor in (*self._cache.self_k, *self._cache.self_v):
                torch._dynamo.mark_static_address(tensor)
            shapes = [(rows, length) for rows in self._buckets for length in self.length_buckets]
            compiled = compile_step(self._step, shapes, self._device, self._warm_up)
            if compiled is not None:
                self._step_fn, self.compiled = compiled, True

    # --- what the worker asks --------------------------------------------------------------

    def supports(self, item: GenerationItem) -> bool:
        """Whether ``item`` can run here: a text prompt, and a continuation's clip if it has one,
        within the window on a text-only model, whose prompt fits the cross-attention cache.
        Anything else runs on HF generate (a melody, past the window: long-form windows)."""
        if self.unsupported_model is not None or item.melody is not None:
            return False
        if not 0 < item.duration_s <= self.loaded.max_duration_s:
            return False
        if item_frames(item, self.loaded) > self._window:
            return False
        return self._prompt_tokens(item.prompt) <= self.max_prompt_tokens

    def free_rows(self) -> int:
        """Rows free now."""
        return self._slots.free()

    def active(self) -> int:
        """Rows generating now."""
        return self.max_rows - self._slots.free()

    def progress(self, row: int) -> float:
        """Steps row ``row`` has taken, as a fraction of the steps it needs."""
        job = self._slots.get(row)
        return job.done / job.steps

    def final_frames(self, row: int) -> int:
        """Frames of row ``row`` that the delay pattern has made final (every codebook has its
        token): frame ``j``'s last codebook is written at position ``j + delay_codebooks``."""
        job = self._slots.get(row)
        return max(0, min(job.frames, job.done - self.loaded.delay_codebooks + 1))

    def frames(self, row: int) -> int:
        """The codec frames row ``row`` generates in all."""
        return self._slots.get(row).frames

    def codes_range(self, row: int, lo: int, hi: int) -> Any:
        """A copy of row ``row``'s ``(codebooks, hi - lo)`` codes of frames ``lo .. hi-1`` (final
        ones: see ``final_frames``), safe to decode in another thread while the row steps on."""
        with torch.inference_mode():
            index = 1 + self._delays[:, None] + torch.arange(lo, hi, device=self._device)[None, :]
            return self._codes[row].gather(1, index).clone()

    # --- admission and retirement ----------------------------------------------------------

    def admit(self, item: GenerationItem, seed: int) -> int:
        """Start ``item`` in a free row, sampling from a generator seeded with ``seed``.

        Encodes its prompt, fills the row's cross-attention cache and clears its self-attention
        cache. Raises ``validate_items``' errors for an invalid item, ``EngineUnsupported`` for
        one ``supports`` refuses and RuntimeError when no row is free.
        """
        loaded = self.loaded
        validate_items([item], max_duration_s=loaded.max_duration_s,
                       sampling_rate=loaded.sampling_rate, melody_supported=loaded.is_melody)
        check_continuation(item, loaded)
        if not self.supports(item):
            reason = self.unsupported_model or "melody, past the window or a long prompt"
            raise EngineUnsupported(f"the static engine does not run this item ({reason})",
                                    field="model" if self.unsupported_model else "prompt")
        if not self._slots.free():
            raise RuntimeError(f"no free row: all {self.max_rows} are generating")
        steps = max_new_tokens_for(item_frames(item, loaded), loaded.delay_codebooks)
        sampling = sampling_of(item, seed)
        generator = (None if sampling.greedy
                     else torch.Generator(device=self._device).manual_seed(seed))
        job = Row(item=item, seed=seed, steps=steps,
                  frames=frames_of(steps, loaded.delay_codebooks),
                  batch_size=self.active() + 1, sampling=sampling, generator=generator,
                  prompt_frames=prompt_frames(item, loaded))
        row = self._slots.take(job)
        try:
            with torch.inference_mode():
                self._fill_prompt(row, item)
                self._cache.reset(row)
                self._tokens[row] = self._pad
                self._position[row] = 0
                self._frames[row] = job.frames
                self._scale[row] = item.guidance_scale
                self._guided[row] = item.guidance_scale > 1
                self._codes[row] = self._pad
                self._fill_given(row, job)
                if job.prompt_frames:
                    self._prefill_clip(row, job)
        except BaseException as e:
            self._slots.drop(row)
            if isinstance(e, RuntimeError) and not isinstance(e, PipelineError):
                raise_runtime(e, "admitting a job")
            raise
        self._active_cache = None
        job.admitted_at = time.perf_counter()
        return row

    def release(self, row: int) -> None:
        """Drop row ``row`` now (cancelled, out of time, finished): its slot is free for the next
        admit, and the row is parked at position 0 of its own slot (see ``_park``)."""
        self._slots.drop(row)
        self._active_cache = None
        self._park(row)

    def _park(self, row: int) -> None:
        """Put free row ``row`` at position 0 of its own slot, with pad tokens.

        A free row below the highest active one is still inside the step's row bucket: every
        step computes it and writes its keys and values at its position. Left where its job
        ended, a job that had the whole window ends one past its slot, so those writes went into
        the next row's cache (another job's audio), or past the tensor in the last row (issue
        22). Parked, they land in its own position 0, which the next admission into the row
        clears (``StaticCache.reset``) and its first step writes anyway. A separate scratch slot
        for free rows would do the same at the cost of one more cache row and a per-row write
        target in every step (and every compiled graph); parking costs nothing per step.
        """
        with torch.inference_mode():
            self._position[row] = 0
            self._tokens[row] = self._pad

    # --- decoding ----------------------------------------------------------------------------

    def step(self) -> list[tuple[int, GeneratedAudio | PipelineError]]:
        """One decoding step for every active row; the rows that finished, with their outcome.

        A finished row's outcome is its audio, or the error its EnCodec decode (or trim) ended in:
        that failure is the row's alone, so it comes back as the row's result, converted as
        ``raise_runtime`` converts (``GpuOutOfMemory``, ``ModelRuntimeError``; a
        ``PipelineError`` as it is), and the other rows are unaffected. Finished rows are free
        when this returns, whichever their outcome. Raises only when the batched step itself
        fails, which is every active row's failure: with a ``PipelineError`` whatever the
        cause (``GpuOutOfMemory``, or ``ModelRuntimeError`` raised from the original error).
        """
        active, index, sampling = self._active()
        if not active:
            return []
        rows = [self._slots.get(r) for r in active]
        bucket = bucket_of(active[-1] + 1, self._buckets)
        try:
            with torch.inference_mode():
                logits = self._run(bucket, max(job.done for job in rows) + 1)
                if len(active) != bucket:
                    logits = logits.index_select(0, index)
                tokens = self._choose(logits, rows, sampling)
                position = self._position.index_select(0, index) + 1
                keep = keep_generated(position, self._frames.index_select(0, index),
                                      self._delays)
                tokens = torch.where(keep, tokens, self._pad)
                if self._any_prompted:
                    tokens = self._force_prompt(index, position, tokens)
                self._codes.index_put_((index[:, None], self._codebook_ids[None, :],
                                        position[:, None]), tokens)
                self._tokens.index_copy_(0, index, tokens)
                self._position.index_copy_(0, index, position)
        except PipelineError:
            raise
        except RuntimeError as e:
            raise_runtime(e, "a decoding step")
        except Exception as e:  # an IndexError too: every row's failure all the same, typed
            raise ModelRuntimeError(
                f"model failed during a decoding step: {type(e).__name__}: {e}") from e
        # Every row's tokens and position moved on: its count does too, before any decode can
        # fail, or the rows after a failed one would step on with a count one behind.
        for job in rows:
            job.done += 1
        leaving = [(row, job) for row, job in zip(active, rows, strict=True) if job.finished]
        try:
            return self._decode_finished(leaving)
        finally:  # also past an unexpected error: a finished row must not step on
            for row, _ in leaving:
                self.release(row)

    # --- internals ---------------------------------------------------------------------------

    def _active(self) -> tuple[list[int], torch.Tensor, RowSampling | None]:
        """The active rows, their ids on the device and their sampling (None: all greedy),
        rebuilt only when a row comes or goes."""
        if self._active_cache is None:
            active = self._slots.active()
            jobs = [self._slots.get(r).sampling for r in active]
            index = torch.tensor(active, dtype=torch.long, device=self._device)
            sampling = (None if all(job.greedy for job in jobs)
                        else RowSampling.of(jobs, self.loaded.num_codebooks, self._device))
            self._active_cache = (active, index, sampling)
            self._any_prompted = any(self._slots.get(r).prompt_frames for r in active)
        return self._active_cache

    def _run(self, bucket: int, furthest: int) -> torch.Tensor:
        """The step's guided logits for rows ``0 .. bucket-1``."""
        args = (self._tokens[:bucket], self._position[:bucket], self._scale[:bucket],
                self._guided[:bucket])
        eager_length = min(self._steps_max, -(-furthest // LENGTH_STEP) * LENGTH_STEP)
        if not self.compiled:
            self.last_length = eager_length
            logits: torch.Tensor = self._step(*args, eager_length)
            return logits
        assert self._step_fn is not None
        self.last_length = bucket_of(furthest, self.length_buckets)
        try:
            return self._step_fn(*args, self.last_length)
        except Exception as e:  # noqa: BLE001 - a compiled step that breaks later: go eager
            if isinstance(e, RuntimeError) and "out of memory" in str(e).lower():
                raise
            log.warning("the compiled decode step failed (%s: %s); running it eagerly from now",
                        type(e).__name__, e)
            self._step_fn, self.compiled = self._step, False
            # The failed call may have written this step's keys and values already: rewriting
            # them with the same values is harmless.
            self.last_length = eager_length
            logits = self._step(*args, eager_length)
            return logits

    def _choose(self, logits: torch.Tensor, rows: list[Row],
                sampling: RowSampling | None) -> torch.Tensor:
        """Each row's next tokens ``(rows, codebooks)`` from its guided logits, drawing
        ``codebooks`` uniforms per sampling row per step as ``JobSampler`` does."""
        count, codebooks, vocab = logits.shape
        flat = logits.reshape(count * codebooks, vocab)
        if sampling is None:
            return flat.argmax(dim=-1).view(count, codebooks)
        draws = torch.cat([
            torch.zeros(codebooks, device=self._device) if job.generator is None
            else torch.rand(codebooks, generator=job.generator, device=self._device)
            for job in rows])
        return choose_tokens(flat, sampling, draws).view(count, codebooks)

    def _fill_given(self, row: int, job: Row) -> None:
        """Lay a continuation's clip codes out in row ``row`` as the delay pattern reads them:
        frame ``j`` of codebook ``c`` at position ``j + 1 + delay[c]`` (``delay`` module)."""
        self._given[row] = self._pad
        self._prompt_frames[row] = job.prompt_frames
        if not job.prompt_frames:
            return
        loaded = self.loaded
        clip = continuation_audio(loaded, [job.item], job.prompt_frames * loaded.samples_per_frame)
        codes = encode_audio(loaded.model, clip.to(self._device, loaded.dtype))[0]
        index = (1 + self._delays[:, None]
                 + torch.arange(job.prompt_frames, device=self._device)[None, :])
        self._given[row].scatter_(1, index, codes.to(torch.long))

    def _prefill_clip(self, row: int, job: Row) -> None:
        """Run row ``row``'s clip positions ``0 .. P-1`` through the decoder at once and leave
        the row where ``P`` steps would have: at position ``P`` with its tokens there (every
        codebook's is the clip's or the pattern's pad up to ``P``), the clip's codes in place."""
        frames = job.prompt_frames
        given = self._given[row]
        self._step.prefill(row, given[:, :frames].T)
        self._codes[row, :, :frames + 1] = given[:, :frames + 1]
        self._tokens[row] = given[:, frames]
        self._position[row] = frames
        job.done = frames

    def _force_prompt(self, index: torch.Tensor, position: torch.Tensor,
                      tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``(rows, codebooks)`` at each row's new ``position``, with the prompt's
        codes wherever that position holds a prompt frame (HF's delay-pattern mask does the same
        to what it generates past its prompt)."""
        offset = position[:, None] - self._delays[None, :]
        forced = (offset >= 1) & (offset <= self._prompt_frames.index_select(0, index)[:, None])
        given = self._given[index[:, None], self._codebook_ids[None, :], position[:, None]]
        return torch.where(forced, given, tokens)

    def _fill_prompt(self, row: int, item: GenerationItem) -> None:
        """Encode the prompt once and write every layer's cross-attention keys and values."""
        model: Any = self.loaded.model
        inputs = model_inputs(self.loaded, [item])
        mask = inputs["attention_mask"]
        states = model.text_encoder(input_ids=inputs["input_ids"],
                                    attention_mask=mask).last_hidden_state
        if self._project:
            states = model.enc_to_dec_proj(states)
        states = states * mask[..., None]
        keys, values = [], []
        heads, head_dim = self._cache.heads, self._cache.head_dim
        for layer in self._step.layers:
            attn = layer.encoder_attn
            keys.append(attn.k_proj(states).view(-1, heads, head_dim).transpose(0, 1))
            values.append(attn.v_proj(states).view(-1, heads, head_dim).transpose(0, 1))
        self._cache.set_prompt(row, keys, values, mask[0].bool())

    def _decode_finished(self, leaving: list[tuple[int, Row]]
                         ) -> list[tuple[int, GeneratedAudio | PipelineError]]:
        """Each finished row's outcome, the rows of one length decoded together (in that order,
        ``DECODE_ROWS`` at a time): 64 equal jobs that end in one step cost one EnCodec call, not
        64 one after another while every other row waits. Rows of different lengths are not
        padded to share a call: EnCodec is not causal, so padding changes the shorter row's
        audio (by ~3e-2 on the tiny model), where rows of one length decoded together differ from
        their decodes alone only by float rounding (~1e-7)."""
        by_length: dict[int, list[tuple[int, Row]]] = {}
        for row, job in leaving:
            by_length.setdefault(job.frames, []).append((row, job))
        finished: list[tuple[int, GeneratedAudio | PipelineError]] = []
        for group in by_length.values():
            for start in range(0, len(group), DECODE_ROWS):
                finished.extend(self._decode_group(group[start:start + DECODE_ROWS]))
        return finished

    def _decode_group(self, group: list[tuple[int, Row]]
                      ) -> list[tuple[int, GeneratedAudio | PipelineError]]:
        """Rows of one length in one EnCodec call, each trimmed to its item, or its error. If the
        call fails, each row is decoded alone: a failure stays its own row's (converted as
        ``raise_runtime`` converts; a ``PipelineError`` as it is)."""
        try:
            with torch.inference_mode():
                audio = self._decode_rows(group)
        except Exception as e:  # noqa: BLE001 - the row's outcome, whatever it is
            if len(group) > 1:
                return [out for one in group for out in self._decode_group([one])]
            return [(group[0][0], _row_error(e))]
        return [(row, self._trimmed(job, samples))
                for (row, job), samples in zip(group, audio, strict=True)]

    def _decode_rows(self, group: list[tuple[int, Row]]) -> np.ndarray:
        """EnCodec-decode finished rows of one length: ``(rows, channels, samples)`` float32."""
        codes = torch.stack([codes_of(self._codes[row, :, :job.steps + 1], job.frames,
                                      self._delays) for row, job in group])
        return decode_codes(self.loaded, codes, class_decode=False)

    def _trimmed(self, job: Row, samples: np.ndarray) -> GeneratedAudio | PipelineError:
        """A finished row's ``(channels, samples)`` trimmed to its item's duration, or the error
        of a decode that came back short."""
        if not job.item.continuation_included:  # the new audio starts where the clip ends
            samples = samples[:, job.prompt_frames * self.loaded.samples_per_frame:]
        try:
            return trimmed_clip(self.loaded, samples, job.item.duration_s, seed=job.seed,
                                generate_seconds=time.perf_counter() - job.admitted_at,
                                batch_size=job.batch_size,
                                padding_waste=padding_waste_for(self.loaded, [job.item]))
        except ModelRuntimeError as e:
            return e

    def _warm_up(self, step: StepFunction, bucket: int, length: int) -> None:
        """Run ``step`` over ``bucket`` idle rows reading ``length`` positions (what compiles
        it); CUDA graphs record on a later call than the first, so it runs three times there."""
        calls = 3 if self._device.type == "cuda" else 1
        with torch.inference_mode():
            for _ in range(calls):
                step(self._tokens[:bucket], self._position[:bucket], self._scale[:bucket],
                     self._guided[:bucket], length)

    def _prompt_tokens(self, prompt: str) -> int:
        return len(self.loaded.processor.tokenizer(prompt)["input_ids"])



def _row_error(error: Exception) -> PipelineError:
    """A finished row's failed decode as its typed outcome."""
    if isinstance(error, PipelineError):
        return error
    if isinstance(error, RuntimeError):
        return runtime_error(error, "decoding a finished row")
    converted = ModelRuntimeError(
        f"model failed during decoding a finished row: {type(error).__name__}: {error}")
    converted.__cause__ = error
    return converted
