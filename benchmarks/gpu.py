"""HF generate against our decode engine (issue 10), on whatever machine this runs on.

    .venv/bin/python benchmarks/gpu.py [--models small,medium,large] [--dtypes fp32,fp16,bf16]
        [--batches 1,8,32,64] [--compile both|on|off] [--duration 10] [--device auto] [--smoke]

For every model, dtype, compile mode and batch size, the same N equal jobs (prompts differ, seeds
fixed, the serving defaults: temperature 1, top-k 250, guidance 3) run through HF generate
(``workers.runtime.musicgen.generate``, one padded call) and through the static engine
(``workers.generation.offline.generate_on``), each warmed up once first (allocations,
compilation). Printed beside each other: decode tokens/s (steps the clip needs, its frames
plus the delay pattern's codebooks - 1, times rows, over wall time: HF's padding to its bucket is its cost, not its output), audio seconds per
second (at batch 1: the real-time factor) and peak memory, with the engine/HF ratio.

Then the roofline at batch 1: the bytes of decoder weights a step reads, the rate this host
streams weights through a matrix product of a step's 2 rows (measured here, median of several
passes over a matrix well past the last-level cache), the floor they set on a step (bytes over
rate), each path's step time and its fraction of that floor. Then a mixed-duration workload (jobs of random lengths, fixed seed, one batch size): HF the way
the batching worker feeds it (the oldest job and up to batch - 1 others of its batch key, one
call each) against the engine's continuous batching; and the time to first audio of one 10 s
job (from the call to the finished clip). Beside it the first streamed chunk (issue 25): one
10 s job alone on the batch-1 engine, streamed as the worker streams it (``RowStream.due``'s
schedule with the publisher's left context and lookahead, ``decode_chunks``), timed from
``engine.admit`` to its first chunk (``generation.stream_chunk_s``, 1 s, plus 8 lookahead
frames) decoded to PCM, the device synchronized, and to its finished clip: medians of 3 runs
after a warm-up. Last, the issues' targets with MET / NOT MET (the first chunk under 0.5 s on
musicgen-small only on CUDA; benchmarks/first_audio.py measures the CPU's 1.5 s end to end),
and at batch 1 the most over HF the floor allows.

Models: ``tiny`` (workers.runtime.tiny) and random-weight ``small``, ``medium``, ``large`` with
the real shapes (workers.runtime.shapes); ``small@2`` cuts the decoder (and text encoder) to 2
layers. Without CUDA everything shrinks on its own: 2 layers, fp32, batches 1 and 4, 2 s jobs,
compile off (compiling on the CPU takes minutes; ``--compile on`` still does it). ``--smoke``
is CI's run: tiny and small@2, batches 1 and 2, 1 s of audio, compile off. A configuration
that runs out of memory prints "skipped: out of memory" and the run goes on. The full run prints
a rough estimate of its duration first. ``--quick`` is benchmarks/quick.py: one shape, HF
against the engine eager and compiled and their batch-1 first chunk, in minutes on a GPU and
seconds on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import re
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch.nn import functional as F

from benchmarks.inprocess_redis import InProcessRedis
from pipeline.config.schema import GenerationSettings
from pipeline.errors import GpuOutOfMemory, PipelineError
from workers.generation.offline import generate_on
from workers.generation.scheduler import next_hf_batch
from workers.generation.streaming import JobStream, RowStream, StreamPublisher
from workers.generation.ticket import Ticket
from workers.job_runner import STREAM_CROSSFADE_S
from workers.runtime import GenerationItem, generate, load_model
from workers.runtime.engine import StaticEngine
from workers.runtime.engine.compile import row_buckets
from workers.runtime.engine.stream import LEFT_CONTEXT_FRAMES, LOOKAHEAD_FRAMES, decode_chunks
from workers.runtime.frames import batch_key_for, frames_for
from workers.runtime.loaded import LoadedModel
from workers.runtime.loading import compile_decoder
from workers.runtime.shapes import random_loaded
from workers.runtime.tiny import make_tiny

PROMPTS = ["calm piano", "loud rock drums with distorted guitars", "jazz trio", "ambient pads",
           "lo-fi beat with vinyl crackle", "orchestral strings swelling"]
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
CPU_LAYERS = 2  # the depth a full-size name gets without CUDA: the real widths, seconds a run
WARMUP_S = 0.1  # a warm-up job's length: the same rows and kernels, 5 frames
STREAM_MIN_BYTES = 256 * 2**20  # the stream-rate matrix: at least this, and 8x the last cache
STREAM_COLUMNS = 4096  # its row length: small's FFN width
STREAM_PASSES = 7  # timed passes over it, after one warm-up; their median is the rate
FIRST_CHUNK_RUNS = 3  # timed runs of the first-chunk job, after one warm-up; their median
FIRST_CHUNK_GOAL_S = 0.5  # issue 25: the first second of audio within this on a GPU (small)


@dataclass(frozen=True)
class Timed:
    """One path's timed run: rows x seconds of audio in ``wall_s``, ``steps`` decode steps a row."""

    wall_s: float
    rows: int
    audio_s: float
    steps: int
    peak_bytes: int

    @property
    def tokens_per_s(self) -> float:
        return self.steps * self.rows / self.wall_s

    @property
    def audio_per_s(self) -> float:
        return self.audio_s / self.wall_s

    @property
    def step_s(self) -> float:
        """Wall time over a row's steps: at batch 1 one step's time, with the call's text
        encoding and EnCodec decode spread over its steps (so a little above a bare step)."""
        return self.wall_s / self.steps


@dataclass
class Result:
    """Both paths for one configuration; ``skipped`` says why a path has no figure."""

    model: str
    dtype: str
    compile: str
    batch: int
    hf: Timed | None = None
    engine: Timed | None = None
    skipped: list[str] = field(default_factory=list)

    def ratio(self) -> float | None:
        if self.hf is None or self.engine is None:
            return None
        return self.hf.wall_s / self.engine.wall_s  # same items: tokens/s and audio s/s alike


# --- memory -----------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory of a block: CUDA's allocator peak, or the process's peak RSS above its start."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.resettable = not self.cuda and _reset_rss_peak()
        if self.cuda:
            self.what = "torch.cuda.max_memory_allocated (weights, caches and activations)"
        elif self.resettable:
            self.what = "peak RSS above the block's start (Linux VmHWM, reset for each block)"
        else:
            self.what = "growth of ru_maxrss (only counts memory past the process's earlier peak)"

    @contextmanager
    def measure(self) -> Iterator[list[int]]:
        """Yields a one-element list that holds the peak in bytes once the block ends."""
        peak = [0]
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            yield peak
            torch.cuda.synchronize()
            peak[0] = torch.cuda.max_memory_allocated()
            return
        start = _rss_bytes() if self.resettable and _reset_rss_peak() else _maxrss_bytes()
        yield peak
        peak[0] = max(0, (_hwm_bytes() if self.resettable else _maxrss_bytes()) - start)


def _reset_rss_peak() -> bool:
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_kb(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def _rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def _hwm_bytes() -> int:
    return _status_kb("VmHWM") * 1024


def _maxrss_bytes() -> int:
    scale = 1 if platform.system() == "Darwin" else 1024  # bytes on macOS, kB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _out_of_memory(error: BaseException) -> bool:
    return (isinstance(error, (torch.OutOfMemoryError, GpuOutOfMemory))
            or "out of memory" in str(error).lower())


# --- the two paths ----------------------------------------------------------------------------

def jobs(count: int, durations: Sequence[float], seed: int = 0) -> list[GenerationItem]:
    """``count`` jobs with the serving defaults; prompts cycle, seeds fixed."""
    return [GenerationItem(prompt=PROMPTS[(seed + i) % len(PROMPTS)], duration_s=durations[i],
                           seed=seed * 1000 + i) for i in range(count)]


def decode_steps(loaded: LoadedModel, item: GenerationItem) -> int:
    """The steps a row needs for ``item``: its frames plus the delay pattern's depth - 1."""
    return frames_for(item.duration_s, loaded) + loaded.delay_codebooks - 1


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(loaded: LoadedModel, run: Callable[[list[GenerationItem]], object],
          items: list[GenerationItem], memory: PeakMemory,
          setup: Callable[[], object] | None = None) -> Timed:
    """``run(items)`` timed after a warm-up of the same rows; peak memory over all of it."""
    warm = [GenerationItem(prompt=i.prompt, duration_s=min(i.duration_s, WARMUP_S), seed=i.seed)
            for i in items]
    with memory.measure() as peak:
        if setup is not None:
            setup()
        run(warm)
        _sync(loaded.device)
        started = time.perf_counter()
        run(items)
        _sync(loaded.device)
        wall = time.perf_counter() - started
    return Timed(wall, len(items), sum(i.duration_s for i in items),
                 max(decode_steps(loaded, i) for i in items), peak[0])


class Paths:
    """HF generate and the engine over one loaded model, compile on or off."""

    def __init__(self, loaded: LoadedModel, compiled: bool, memory: PeakMemory) -> None:
        self.loaded, self.compiled, self.memory = loaded, compiled, memory
        self.engine: StaticEngine | None = None
        self.notes: list[str] = []
        # The job whose first streamed chunk the first batch-1 engine times (``first_chunk``),
        # on the engine already built and compiled for its batch-1 run.
        self.stream_item: GenerationItem | None = None
        self.first: FirstChunk | None = None

    def hf(self, items: list[GenerationItem], batch: int) -> Timed:
        def run(chunk: list[GenerationItem]) -> None:
            for group in batcher_batches(self.loaded, chunk, batch):
                generate(self.loaded, group)

        return timed(self.loaded, run, items, self.memory)

    def static(self, items: list[GenerationItem], rows: int) -> Timed:
        def setup() -> None:
            self.engine = None
            _free(self.loaded.device)
            if self.compiled:
                # A fresh engine per configuration would pile recompilations onto one code
                # object until dynamo's cache limit makes it run eager without a word; start
                # each from an empty cache (HF's compiled decoder recompiles in its warm-up).
                torch.compiler.reset()
            self.engine = StaticEngine(self.loaded, max_rows=rows, compile=self.compiled)
            if self.compiled and not self.engine.compiled:
                self.notes.append("engine compile fell back to eager")
            if not all(self.engine.supports(item) for item in items):
                raise LookupError("the engine does not support these jobs")

        def run(chunk: list[GenerationItem]) -> None:
            assert self.engine is not None
            generate_on(self.engine, chunk)

        try:
            result = timed(self.loaded, run, items, self.memory, setup)
            if rows == 1 and self.stream_item is not None and self.first is None:
                self.first = self._first_chunk(self.stream_item)
            return result
        finally:
            self.engine = None
            _free(self.loaded.device)

    def _first_chunk(self, item: GenerationItem) -> FirstChunk | None:
        assert self.engine is not None
        if not self.engine.supports(item):
            self.notes.append("first chunk: the engine does not support its job")
            return None
        try:
            return first_chunk(self.engine, item)
        except Exception as e:
            if not _out_of_memory(e):
                raise
            self.notes.append("first chunk: skipped: out of memory")
            return None


def batcher_batches(loaded: LoadedModel, items: list[GenerationItem],
                    batch: int) -> list[list[GenerationItem]]:
    """``items``, all queued at once, in the batches the HF loop would form
    (``workers.generation.scheduler.next_hf_batch`` with every batch due)."""
    waiting = [Ticket(loaded=loaded, item=item, key=batch_key_for(loaded, item), submitted=0.0)
               for item in items]
    batches = []
    while waiting:
        decision = next_hf_batch(waiting, max_batch_size=batch, batch_wait_s=0.0, now=0.0)
        batches.append([ticket.item for ticket in decision.batch])
        waiting = decision.pending
    return batches


@contextmanager
def hf_compiled(loaded: LoadedModel, on: bool) -> Iterator[bool]:
    """HF generate's decoder compiled as ``load_model(compile=True)`` compiles it (and undone
    after); yields whether the compiled forward is in use (a failure falls back to eager)."""
    decoder = loaded.model.decoder
    if on:
        compile_decoder(loaded)
    try:
        yield "forward" in vars(decoder)
    finally:
        vars(decoder).pop("forward", None)


# --- the first streamed chunk ---------------------------------------------------------------

@dataclass(frozen=True)
class FirstChunk:
    """One streaming job alone on an engine, medians over runs: from ``engine.admit`` to its
    first chunk decoded to PCM (``first_s``), and to its finished clip (``finished_s``)."""

    chunk_s: float
    duration_s: float
    first_s: float
    finished_s: float

    def line(self) -> str:
        return (f"first chunk ({self.chunk_s:.1f} s of audio): {self.first_s:.3f} s; "
                f"finished {self.duration_s:g} s clip: {self.finished_s:.3f} s")


def first_chunk(engine: StaticEngine, item: GenerationItem,
                runs: int = FIRST_CHUNK_RUNS) -> FirstChunk:
    """``item`` streamed alone on ``engine`` the way the worker streams it, timed: medians of
    ``runs`` runs after one warm-up.

    The schedule is the worker's: its publisher's left context and lookahead
    (``workers.runtime.engine.stream``), a ``RowStream`` from ``StreamPublisher.row`` with the
    default ``generation.stream_chunk_s``. After each step, as the engine loop does, the chunks
    ``RowStream.due`` names are copied out (``codes_range``) and decoded with ``decode_chunks``,
    the publisher's decode; here in this thread, the device synchronized, so the first chunk's
    time is its PCM on the host. The finished clip's time also holds that one chunk decode,
    which the worker runs on its publisher's thread (on CUDA a side stream)."""
    loaded = engine.loaded
    chunk_s = GenerationSettings.model_fields["stream_chunk_s"].default
    publisher = StreamPublisher(decode_chunks, left_context=LEFT_CONTEXT_FRAMES,
                                lookahead=LOOKAHEAD_FRAMES, crossfade_s=STREAM_CROSSFADE_S)
    firsts, finisheds = [], []
    for run in range(runs + 1):
        job = JobStream(InProcessRedis(), f"first-chunk-{run}", 1, sample_rate=loaded.sampling_rate,
                        channels=loaded.audio_channels, ttl_s=60)
        stream = publisher.row(job, chunk_s=chunk_s, frame_rate=loaded.frame_rate,
                               target_samples=round(item.duration_s * loaded.sampling_rate))
        first, finished = _stream_once(engine, item, stream)
        if run:  # the first run warms the decode's shapes (and a compiled engine's graphs)
            firsts.append(first)
            finisheds.append(finished)
    return FirstChunk(chunk_s, item.duration_s, statistics.median(firsts),
                      statistics.median(finisheds))


def _stream_once(engine: StaticEngine, item: GenerationItem,
                 stream: RowStream) -> tuple[float, float]:
    """One run of ``first_chunk``: seconds to the first chunk's PCM and to the finished clip."""
    loaded, device = engine.loaded, engine.loaded.device
    assert item.seed is not None
    first: float | None = None
    _sync(device)
    started = time.perf_counter()
    row = engine.admit(item, item.seed)
    try:
        while True:
            finished = dict(engine.step())
            if row in finished:  # the engine freed the row itself
                outcome = finished[row]
                if isinstance(outcome, PipelineError):
                    raise outcome
                _sync(device)
                done = time.perf_counter() - started
                break
            due = stream.due(engine.final_frames(row))
            if due and first is None:
                decode_chunks(loaded, [engine.codes_range(row, lo, hi) for lo, _, _, hi in due])
                _sync(device)
                first = time.perf_counter() - started
    except BaseException:
        engine.release(row)
        raise
    if first is None:
        raise ValueError(f"a {item.duration_s:g} s job streams no chunk before it ends")
    return first, done


def first_chunk_target(device: str, figures: Sequence[tuple[str, FirstChunk]]) -> str:
    """Issue 25's GPU target: the fastest of musicgen-small's ``figures`` (label, figure) with
    MET / NOT MET; on the CPU, not measured here."""
    goal = f"first chunk under {FIRST_CHUNK_GOAL_S:g} s (musicgen-small, GPU)"
    if not device.startswith("cuda"):
        return (f"{goal}: not measured here (CPU; the CPU's 1.5 s target is "
                "benchmarks/first_audio.py's, end to end)")
    if not figures:
        return f"{goal}: not measured (no musicgen-small engine run)"
    label, best = min(figures, key=lambda figure: figure[1].first_s)
    verdict = "MET" if best.first_s < FIRST_CHUNK_GOAL_S else "NOT MET"
    return f"{goal}: {best.first_s:.3f} s ({label}) {verdict}"


# --- the roofline -----------------------------------------------------------------------------

def step_weight_bytes(loaded: LoadedModel) -> int:
    """The bytes of decoder weights one decode step reads, whichever path runs it.

    Every parameter of the decoder's layers, of its final layer norm and of the LM heads: each
    is applied to every row at every step. Not counted: the codebook embeddings and the
    sinusoidal positions (a step looks up one row of each table), the cross-attention k_proj and
    v_proj (they project the prompt once per job into the cache, in HF's cache and the engine's
    alike) and enc_to_dec_proj, which also runs once per job.
    """
    causal = loaded.model.decoder  # MusicgenForCausalLM
    decoder = causal.model.decoder
    once_per_job = {id(p) for layer in decoder.layers
                    for projection in (layer.encoder_attn.k_proj, layer.encoder_attn.v_proj)
                    for p in projection.parameters()}
    return sum(p.numel() * p.element_size()
               for module in (decoder.layers, decoder.layer_norm, causal.lm_heads)
               for p in module.parameters() if id(p) not in once_per_job)


def last_cache_bytes(device: str) -> int:
    """The last-level cache: the GPU's L2, or the largest cache sysfs lists for CPU 0 (0 when
    unknown)."""
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(torch.device(device))
        return int(getattr(properties, "L2_cache_size", 0))
    units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        found = re.fullmatch(r"(\d+)([KMG]?)", entry.read_text().strip())
        if found:
            sizes.append(int(found.group(1)) * units[found.group(2)])
    return max(sizes, default=0)


@dataclass(frozen=True)
class StreamRate:
    """Bytes per second this host reads weights at through a product, over ``matrix_bytes``.

    ``memory`` is ``torch.mv``'s: one row, a matrix-vector product reading each weight once at
    the rate memory delivers it, the floor any step's products have. ``product`` is
    ``F.linear`` of 2 rows, the product a batch-1 step runs (a job's conditional and
    unconditional halves): where a BLAS runs it below the memory rate, its floor is the one
    steps built on it have.
    """

    memory: float
    product: float
    matrix_bytes: int


def stream_rate(device: str, dtype: str) -> StreamRate:
    """Both rates of ``StreamRate`` in the model's dtype, on the torch threads the runs use.

    A matrix-vector product rather than a copy or a sum: it is the operation a step reads its
    weights through, so a kernel that cannot keep up with memory in this dtype (bf16 on a CPU
    without bf16 units widens every weight first) shows in the figure. The matrix is 8x the
    last-level cache (256 MiB at least), so every pass reads it from memory, and filled (an
    untouched zeroed buffer reads one shared zero page, not memory); the median of several
    passes after a warm-up keeps a shared host's bursts out. On CUDA one pass is a fraction of
    a millisecond, so a timed pass is 20 products back to back between two synchronizes.
    """
    torch_dtype = getattr(torch, DTYPES[dtype])
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    size = max(STREAM_MIN_BYTES, 8 * last_cache_bytes(device))
    weight = torch.empty(size // (STREAM_COLUMNS * itemsize), STREAM_COLUMNS, dtype=torch_dtype,
                         device=device).fill_(1 / STREAM_COLUMNS)
    rows = torch.ones(2, STREAM_COLUMNS, dtype=torch_dtype, device=device)
    matrix_bytes = weight.numel() * itemsize
    calls = 20 if device.startswith("cuda") else 1

    def rate(product: Callable[[], object]) -> float:
        times = []
        for _ in range(STREAM_PASSES + 1):
            _sync(device)
            started = time.perf_counter()
            for _ in range(calls):
                product()
            _sync(device)
            times.append((time.perf_counter() - started) / calls)
        return matrix_bytes / statistics.median(times[1:])

    with torch.inference_mode():
        return StreamRate(rate(lambda: torch.mv(weight, rows[0])),
                          rate(lambda: F.linear(rows, weight)), matrix_bytes)


@dataclass(frozen=True)
class Roofline:
    """A batch-1 configuration against the floor its decoder weights set on a step."""

    result: Result
    weight_bytes: int
    rate: StreamRate
    cached: bool  # the weights fit in the last-level cache: memory bounds nothing

    @property
    def floor_s(self) -> float:
        """The memory floor: the weights read once at the matrix-vector rate."""
        return self.weight_bytes / self.rate.memory

    @property
    def product_floor_s(self) -> float:
        """The floor of steps built on the 2-row product as this host's BLAS runs it."""
        return self.weight_bytes / self.rate.product

    def fraction(self, timed: Timed | None) -> float | None:
        """How close a path's step is to the floor: 1 is a step that only streams weights."""
        return None if timed is None else self.floor_s / timed.step_s

    def ceiling(self, floor_s: float | None = None) -> float | None:
        """The most engine/HF a floor (the memory floor unless given) allows: HF's measured
        step over it."""
        floor_s = self.floor_s if floor_s is None else floor_s
        return None if self.result.hf is None else self.result.hf.step_s / floor_s


def rooflines(report: Report) -> list[Roofline]:
    """One ``Roofline`` for each batch-1 configuration that has a measured stream rate."""
    lines = []
    for r in report.results:
        weights = report.step_bytes.get((r.model, r.dtype))
        rate = report.rates.get(r.dtype)
        if r.batch == 1 and weights and rate:
            lines.append(Roofline(r, weights, rate, weights <= report.cache_bytes))
    return lines


# --- the run ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    models: list[str]
    dtypes: list[str]
    batches: list[int]
    compile: list[bool]
    duration: float
    device: str
    mixed_jobs: int
    mixed_range: tuple[float, float]
    mixed_batch: int
    ttfa_s: float
    stream_s: float  # the first-chunk job: long enough to stream a chunk before it ends


def plan_of(args: argparse.Namespace, device: str) -> Plan:
    """The configurations to run: the options given, else this device's defaults."""
    cuda = device.startswith("cuda")
    if args.smoke:
        return Plan(["tiny", f"small@{CPU_LAYERS}"], ["fp32"], [1, 2], [False], 1.0, device,
                    4, (0.2, 0.6), 2, 1.0, 2.0)

    def listed(text: str | None, default: str) -> list[str]:
        return [part.strip() for part in (text or default).split(",") if part.strip()]

    models = listed(args.models, "small,medium,large" if cuda else "tiny,small")
    if not cuda:  # the real widths at a depth a CPU runs in seconds
        models = [m if "@" in m or m == "tiny" else f"{m}@{CPU_LAYERS}" for m in models]
    compile_modes = {"both": [False, True], "on": [True], "off": [False]}[
        args.compile or ("both" if cuda else "off")]
    batches = [int(b) for b in listed(args.batches, "1,8,32,64" if cuda else "1,4")]
    return Plan(models, listed(args.dtypes, "fp32,fp16,bf16" if cuda else "fp32"), batches,
                compile_modes, args.duration or (10.0 if cuda else 2.0), device,
                16, (2.0, 30.0) if cuda else (1.0, 6.0), 8 if cuda else 4, 10.0, 10.0)


# Rough seconds a decode step of one row takes, by model shape, for the estimate only (an H100 in
# bf16 and one CPU thread at 2 layers); and a compiled graph's compile time.
GUESS_STEP_S = {"cuda": {"tiny": 0.004, "small": 0.012, "medium": 0.025, "large": 0.04},
                "cpu": {"tiny": 0.004, "small": 0.03, "medium": 0.06, "large": 0.08}}
GUESS_COMPILE_S = {"cuda": 30.0, "cpu": 20.0}


def estimated_s(plan: Plan) -> float:
    """A rough duration of ``plan``: both paths' steps (warm-up and timed run) for every
    configuration, each compiled engine's graphs, and the mixed and time-to-first-audio runs."""
    kind = "cuda" if plan.device.startswith("cuda") else "cpu"
    total = 0.0
    for model in plan.models:
        step = GUESS_STEP_S[kind].get(model.partition("@")[0], 0.03)
        steps = plan.duration * 50 + 4
        for batch in plan.batches:
            per_batch = 2 * steps * step * (1 + batch / 16)  # HF and the engine
            for compiled in plan.compile:
                graphs = len(row_buckets(batch)) * 4 if compiled else 0  # 4 length buckets
                total += len(plan.dtypes) * (per_batch + graphs * GUESS_COMPILE_S[kind])
        mixed = plan.mixed_jobs * sum(plan.mixed_range) / 2 * 50 * step
        first = (FIRST_CHUNK_RUNS + 1) * plan.stream_s * 50 * step
        total += len(plan.dtypes) * len(plan.compile) * (2 * mixed + 2 * plan.ttfa_s * 50 * step
                                                         + first)
    return total


def build(name: str, dtype: str, device: str, folder: Path) -> LoadedModel:
    """``tiny`` through the real loading path, the others built in memory (shapes.py)."""
    if name == "tiny":
        path = folder / "tiny"
        if not path.exists():
            make_tiny(path)
        return load_model(str(path), device=device, dtype=DTYPES[dtype], offline=True)
    shape, _, depth = name.partition("@")
    layers = int(depth) if depth else None
    return random_loaded(shape, layers=layers, text_layers=min(layers, 12) if layers else None,
                         device=device, dtype=DTYPES[dtype])


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    mixed: list[Result] = field(default_factory=list)
    ttfa: list[Result] = field(default_factory=list)
    # (model, dtype, compile, figure): the first streamed chunk, None where not measured
    first_chunks: list[tuple[str, str, str, FirstChunk | None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    step_bytes: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, dtype)
    rates: dict[str, StreamRate] = field(default_factory=dict)  # dtype
    cache_bytes: int = 0


def run_plan(plan: Plan, memory: PeakMemory, folder: Path) -> Report:
    report = Report(cache_bytes=last_cache_bytes(plan.device))
    for name in plan.models:
        for dtype in plan.dtypes:
            if dtype == "fp16" and plan.device == "cpu":
                report.notes.append(f"{name} fp16: skipped, the CPU runs fp16 as fp32")
                continue
            if dtype not in report.rates:  # before the model, with nothing else in memory
                report.rates[dtype] = stream_rate(plan.device, dtype)
            try:
                loaded = build(name, dtype, plan.device, folder)
            except Exception as e:
                if not _out_of_memory(e):
                    raise
                report.notes.append(f"{name} {dtype}: skipped: out of memory building the model")
                _free(plan.device)
                continue
            report.step_bytes[(name, dtype)] = step_weight_bytes(loaded)
            for compiled in plan.compile:
                _run_model(plan, report, name, dtype, compiled, loaded, memory)
            del loaded
            _free(plan.device)
    return report


def _run_model(plan: Plan, report: Report, name: str, dtype: str, compiled: bool,
               loaded: LoadedModel, memory: PeakMemory) -> None:
    label = "on" if compiled else "off"
    with hf_compiled(loaded, compiled) as hf_on:
        if compiled and not hf_on:
            report.notes.append(f"{name} {dtype}: HF's torch.compile fell back to eager")
        paths = Paths(loaded, compiled, memory)
        paths.stream_item = jobs(1, [plan.stream_s], seed=2)[0]
        for batch in plan.batches:
            items = jobs(batch, [plan.duration] * batch)
            report.results.append(_both(paths, Result(name, dtype, label, batch), items, batch))
        rng = random.Random(0)
        low, high = plan.mixed_range
        durations = [round(rng.uniform(low, high), 2) for _ in range(plan.mixed_jobs)]
        report.mixed.append(_both(paths, Result(name, dtype, label, plan.mixed_batch),
                                  jobs(plan.mixed_jobs, durations, seed=1), plan.mixed_batch))
        ttfa = next((r for r in report.results[-len(plan.batches):] if r.batch == 1), None)
        if ttfa is None or plan.duration != plan.ttfa_s:
            ttfa = _both(paths, Result(name, dtype, label, 1), jobs(1, [plan.ttfa_s], seed=2), 1)
        report.ttfa.append(ttfa)
        report.first_chunks.append((name, dtype, label, paths.first))
        report.notes += [f"{name} {dtype} compile {label}: {note}" for note in set(paths.notes)]


def _both(paths: Paths, result: Result, items: list[GenerationItem], batch: int) -> Result:
    for side, measure in (("hf", paths.hf), ("engine", paths.static)):
        try:
            setattr(result, side, measure(items, batch))
        except LookupError as e:
            result.skipped.append(f"{side}: {e}")
        except Exception as e:
            if not _out_of_memory(e):
                raise
            result.skipped.append(f"{side}: out of memory")
            _free(paths.loaded.device)
    return result


# --- printing ---------------------------------------------------------------------------------

def _rate(value: float) -> str:
    return f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"x{value:.2f}"


def _mb(timed: Timed | None) -> str:
    return "-" if timed is None else f"{timed.peak_bytes / 2**20:.0f}"


def _skips(result: Result) -> str:
    return f"   skipped: {'; '.join(result.skipped)}" if result.skipped else ""


def print_report(plan: Plan, report: Report, memory: PeakMemory) -> None:
    head = f"{'model':<10} {'dtype':<5} {'compile':<7} {'batch':>5}"
    print(f"{head} {'hf tok/s':>9} {'eng tok/s':>9} {'eng/hf':>7} {'hf aud/s':>9} "
          f"{'eng aud/s':>9} {'eng/hf':>7} {'hf MB':>7} {'eng MB':>7}")
    for r in report.results:
        cells = [f"{r.model:<10} {r.dtype:<5} {r.compile:<7} {r.batch:>5}"]
        for figure in ("tokens_per_s", "audio_per_s"):
            cells += [f"{_rate(getattr(r.hf, figure)) if r.hf else '-':>9}",
                      f"{_rate(getattr(r.engine, figure)) if r.engine else '-':>9}",
                      f"{_x(r.ratio()):>7}"]
        cells += [f"{_mb(r.hf):>7}", f"{_mb(r.engine):>7}"]
        print(" ".join(cells) + _skips(r))
    print_rooflines(report)
    low, high = plan.mixed_range
    print()
    print(f"mixed workload: {plan.mixed_jobs} jobs of {low:g}-{high:g} s (random.Random(0)), batch "
          f"{plan.mixed_batch}: HF as the batching worker groups them, engine continuous")
    print(f"{head} {'hf aud/s':>9} {'eng aud/s':>9} {'eng/hf':>7}")
    for r in report.mixed:
        print(f"{r.model:<10} {r.dtype:<5} {r.compile:<7} {r.batch:>5} "
              f"{_rate(r.hf.audio_per_s) if r.hf else '-':>9} "
              f"{_rate(r.engine.audio_per_s) if r.engine else '-':>9} {_x(r.ratio()):>7}"
              + _skips(r))
    print()
    print(f"time to first audio: one {plan.ttfa_s:g} s job, batch 1, from the call to the "
          "finished clip")
    print(f"{head} {'hf s':>9} {'eng s':>9} {'hf/eng':>7}")
    for r in report.ttfa:
        print(f"{r.model:<10} {r.dtype:<5} {r.compile:<7} {r.batch:>5} "
              f"{f'{r.hf.wall_s:.2f}' if r.hf else '-':>9} "
              f"{f'{r.engine.wall_s:.2f}' if r.engine else '-':>9} {_x(r.ratio()):>7}" + _skips(r))
    print()
    print(f"first chunk: one {plan.stream_s:g} s job alone on the engine, from engine.admit to "
          f"its first streamed chunk decoded to PCM ({LOOKAHEAD_FRAMES} lookahead frames past "
          f"it; the worker's schedule and decode_chunks) and to its finished clip, median of "
          f"{FIRST_CHUNK_RUNS} runs after a warm-up")
    for model, dtype, label, figure in report.first_chunks:
        print(f"{model:<10} {dtype:<5} {label:<7} {figure.line() if figure else '-'}")
    print()
    print(f"peak memory: {memory.what}")
    for note in report.notes:
        print(f"note: {note}")
    print()
    print("targets (issues 10 and 25):")
    for line in targets(plan, report):
        print(f"  {line}")


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _ms(timed: Timed | None) -> str:
    return "-" if timed is None else f"{timed.step_s * 1e3:.2f}"


def print_rooflines(report: Report) -> None:
    """The batch-1 roofline table: a step reads every decoder weight it applies once, so it
    takes at least their bytes over the stream rate; a path's fraction is that floor over its
    step."""
    lines = rooflines(report)
    if not lines:
        return
    print()
    print("roofline at batch 1 (2 rows with guidance): a step reads each decoder weight once, so "
          "it takes at least weight MB / GB/s (floor); roof = floor / step; max x = HF step / "
          "floor")
    rates = ", ".join(f"{dtype} {rate.memory / 1e9:.1f} GB/s (2-row F.linear "
                      f"{rate.product / 1e9:.1f})" for dtype, rate in report.rates.items())
    matrix = max(rate.matrix_bytes for rate in report.rates.values())
    print(f"GB/s: torch.mv over a {matrix / 2**20:.0f} MiB matrix, median of {STREAM_PASSES} "
          f"passes: {rates}; 2-row ms: the floor at the 2-row F.linear rate; a step is its "
          "call's wall time over its steps (text encoding and EnCodec decode included)")
    print(f"{'model':<10} {'dtype':<5} {'compile':<7} {'weight MB':>9} {'GB/s':>6} "
          f"{'floor ms':>8} {'2-row ms':>8} {'hf ms':>8} {'eng ms':>8} {'hf roof':>7} "
          f"{'eng roof':>8} {'max x':>7}")
    for line in lines:
        r = line.result
        # Weights the cache holds are not read from memory: no floor, no ceiling from it.
        note = (f"   weights fit in the {report.cache_bytes / 2**20:.0f} MiB last-level cache: "
                "the floor does not bind" if line.cached else "")
        ceiling = None if line.cached else line.ceiling()
        print(f"{r.model:<10} {r.dtype:<5} {r.compile:<7} {line.weight_bytes / 1e6:>9.1f} "
              f"{line.rate.memory / 1e9:>6.1f} {line.floor_s * 1e3:>8.2f} "
              f"{line.product_floor_s * 1e3:>8.2f} {_ms(r.hf):>8} {_ms(r.engine):>8} {_fraction(line.fraction(r.hf)):>7} "
              f"{_fraction(line.fraction(r.engine)):>8} {_x(ceiling):>7}" + note)


def ceiling_line(line: Roofline, goal: float) -> str:
    """What the floor leaves of an engine/HF ``goal`` at batch 1 for ``line``'s configuration."""
    r = line.result
    where = f"{r.model} {r.dtype} compile {r.compile} at batch 1"
    if line.cached:
        return f"{where}: weights in the last-level cache, the bandwidth floor bounds nothing"
    ceiling, product = line.ceiling(), line.ceiling(line.product_floor_s)
    if ceiling is None or product is None:
        return f"{where}: no HF step to bound"
    reach = "within reach of" if ceiling >= goal else "out of reach under"
    return (f"{where}: the bandwidth floor allows at most {ceiling:.2f}x over HF's measured "
            f"step ({product:.2f}x at the 2-row F.linear rate): {goal:g}x is {reach} the floor")


def targets(plan: Plan, report: Report) -> list[str]:
    """The issue's targets for this device, each with its figure and MET / NOT MET."""
    def verdict(value: float | None, goal: float) -> str:
        if value is None:
            return "not measured"
        return f"{value:.2f} {'MET' if value >= goal else 'NOT MET'}"

    lines = []
    if plan.device.startswith("cuda"):
        small = [r for r in report.results if r.model == "small" and r.dtype == "bf16"
                 and r.engine is not None]
        single = max((r.engine.audio_per_s for r in small if r.engine and r.batch == 1),
                     default=None)
        batched = max((r.engine.audio_per_s for r in small if r.engine and r.batch > 1),
                      default=None)
        lines.append(f"GPU small bf16: engine >= 30x real time at batch 1: {verdict(single, 30)}")
        for line in rooflines(report):
            timed = line.result.engine or line.result.hf
            if line.result.model == "small" and line.result.dtype == "bf16" and timed:
                # A step makes one frame of audio: the floor caps real time at frame / floor.
                most = timed.audio_s / timed.steps / line.floor_s
                lines.append(f"GPU small bf16 compile {line.result.compile} at batch 1: the "
                             f"bandwidth floor allows at most {most:.0f}x real time")
        lines.append(f"GPU small bf16: engine >= 300 audio s/s batched: {verdict(batched, 300)}")
    else:
        floors = {id(line.result): line for line in rooflines(report)}
        for r in report.results:
            if r.batch == 1:
                lines.append(f"CPU {r.model} {r.dtype} compile {r.compile}: engine >= 2x HF "
                             f"tokens/s at batch 1: {verdict(r.ratio(), 2.0)}")
                if id(r) in floors:
                    lines.append(f"CPU {ceiling_line(floors[id(r)], 2.0)}")
        for r in report.mixed:
            lines.append(f"CPU {r.model} {r.dtype} compile {r.compile}: engine >= 1.5x HF audio "
                         f"s/s on the mixed workload: {verdict(r.ratio(), 1.5)}")
        lines.append("GPU targets (small bf16: >= 30x real time at batch 1, >= 300 audio s/s "
                     "batched): not measured, no CUDA here")
    lines.append(first_chunk_target(plan.device, [
        (f"{dtype} compile {label}", figure) for model, dtype, label, figure
        in report.first_chunks if model == "small" and figure is not None]))
    return lines


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    cpu = platform.processor() or platform.machine()
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(),
                          re.MULTILINE)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    return f"cpu ({cpu}, {torch.get_num_threads()} torch thread(s))"


def main(argv: Sequence[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated: tiny, small, medium, large, name@layers")
    parser.add_argument("--dtypes", help="comma-separated: fp32, fp16, bf16")
    parser.add_argument("--batches", help="comma-separated batch sizes")
    parser.add_argument("--compile", choices=["both", "on", "off"])
    parser.add_argument("--duration", type=float, help="seconds of audio per job")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on the CPU)")
    parser.add_argument("--smoke", action="store_true", help="the fastest run (CI)")
    parser.add_argument("--quick", action="store_true",
                        help="HF vs the engine eager and compiled, one shape (benchmarks/quick.py)")
    args = parser.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    if args.threads or not device.startswith("cuda"):
        # One thread by default on the CPU: steadier figures on a shared host, as the other
        # benchmarks run.
        torch.set_num_threads(args.threads or 1)
    if args.quick:
        from benchmarks.quick import run_quick  # it imports this module: not at the top

        print(f"benchmarks/gpu.py --quick: HF generate vs StaticEngine eager and compiled\n"
              f"device: {_device_name(device)}; torch {torch.__version__}, "
              f"transformers {transformers.__version__}")
        with tempfile.TemporaryDirectory() as folder:
            run_quick(device, Path(folder))
        return Report()
    plan = plan_of(args, device)
    print(f"benchmarks/gpu.py: HF generate vs StaticEngine, same jobs, same run, "
          f"{plan.duration:g} s a job")
    print(f"device: {_device_name(device)}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"estimated duration: ~{estimated_s(plan) / 60:.0f} min (a rough guess from step "
          f"times and compile costs assumed per model, not measured here)", flush=True)
    memory = PeakMemory(device)
    with tempfile.TemporaryDirectory() as folder:
        report = run_plan(plan, memory, Path(folder))
    print_report(plan, report, memory)
    return report


if __name__ == "__main__":
    main()
