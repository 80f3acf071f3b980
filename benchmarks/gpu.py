"""HF generate against our decode engine (issue 10), on whatever machine this runs on.

    .venv/bin/python benchmarks/gpu.py [--models small,medium,large] [--dtypes fp32,fp16,bf16]
        [--batches 1,8,32,64] [--compile both|on|off] [--duration 10] [--device auto] [--smoke]

For every model, dtype, compile mode and batch size, the same N equal jobs (prompts differ, seeds
fixed, the serving defaults: temperature 1, top-k 250, guidance 3) run through HF generate
(``workers.runtime.musicgen.generate``, one padded call) and through ``StaticEngine.generate``,
each warmed up once first (allocations, compilation). Printed beside each other: decode
tokens/s (steps the clip needs, its frames plus the delay pattern's codebooks - 1, times rows,
over wall time: HF's padding to its bucket is its cost, not its output), audio seconds per
second (at batch 1: the real-time factor) and peak memory, with the engine/HF ratio.

Then a mixed-duration workload (jobs of random lengths, fixed seed, one batch size): HF the way
the batching worker feeds it (the oldest job and up to batch - 1 others of its batch key, one
call each) against the engine's continuous batching; and the time to first audio of one 10 s
job (from the call to the finished clip). Last, the issue's targets with MET / NOT MET.

Models: ``tiny`` (workers.runtime.tiny) and random-weight ``small``, ``medium``, ``large`` with
the real shapes (workers.runtime.shapes); ``small@2`` cuts the decoder (and text encoder) to 2
layers. Without CUDA everything shrinks on its own: 2 layers, fp32, batches 1 and 4, 2 s jobs,
compile off (compiling on the CPU takes minutes; ``--compile on`` still does it). ``--smoke``
is CI's run: tiny and small@2, batches 1 and 2, 1 s of audio, compile off. A configuration
that runs out of memory prints "skipped: out of memory" and the run goes on.
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import re
import resource
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from pipeline.errors import GpuOutOfMemory
from workers.runtime import GenerationItem, generate, load_model
from workers.runtime.engine import StaticEngine
from workers.runtime.musicgen import LoadedModel, _compile_decoder, batch_key_for, frames_for
from workers.runtime.shapes import random_loaded
from workers.runtime.tiny import make_tiny

PROMPTS = ["calm piano", "loud rock drums with distorted guitars", "jazz trio", "ambient pads",
           "lo-fi beat with vinyl crackle", "orchestral strings swelling"]
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
CPU_LAYERS = 2  # the depth a full-size name gets without CUDA: the real widths, seconds a run
WARMUP_S = 0.1  # a warm-up job's length: the same rows and kernels, 5 frames


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
            self.engine.generate(chunk)

        try:
            return timed(self.loaded, run, items, self.memory, setup)
        finally:
            self.engine = None
            _free(self.loaded.device)


def batcher_batches(loaded: LoadedModel, items: list[GenerationItem],
                    batch: int) -> list[list[GenerationItem]]:
    """``items``, all queued at once, in the batches the batching worker would form: the oldest
    waiting job and up to ``batch - 1`` later ones with its batch key (workers/batcher.py)."""
    waiting = list(items)
    batches = []
    while waiting:
        key = batch_key_for(loaded, waiting[0])
        mates = [item for item in waiting if batch_key_for(loaded, item) == key][:batch]
        batches.append(mates)
        waiting = [item for item in waiting if not any(item is m for m in mates)]
    return batches


@contextmanager
def hf_compiled(loaded: LoadedModel, on: bool) -> Iterator[bool]:
    """HF generate's decoder compiled as ``load_model(compile=True)`` compiles it (and undone
    after); yields whether the compiled forward is in use (a failure falls back to eager)."""
    decoder = loaded.model.decoder
    if on:
        _compile_decoder(loaded)
    try:
        yield "forward" in vars(decoder)
    finally:
        vars(decoder).pop("forward", None)


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


def plan_of(args: argparse.Namespace, device: str) -> Plan:
    """The configurations to run: the options given, else this device's defaults."""
    cuda = device.startswith("cuda")
    if args.smoke:
        return Plan(["tiny", f"small@{CPU_LAYERS}"], ["fp32"], [1, 2], [False], 1.0, device,
                    4, (0.2, 0.6), 2, 1.0)

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
                16, (2.0, 30.0) if cuda else (1.0, 6.0), 8 if cuda else 4, 10.0)


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
    notes: list[str] = field(default_factory=list)


def run_plan(plan: Plan, memory: PeakMemory, folder: Path) -> Report:
    report = Report()
    for name in plan.models:
        for dtype in plan.dtypes:
            if dtype == "fp16" and plan.device == "cpu":
                report.notes.append(f"{name} fp16: skipped, the CPU runs fp16 as fp32")
                continue
            try:
                loaded = build(name, dtype, plan.device, folder)
            except Exception as e:
                if not _out_of_memory(e):
                    raise
                report.notes.append(f"{name} {dtype}: skipped: out of memory building the model")
                _free(plan.device)
                continue
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
    print(f"peak memory: {memory.what}")
    for note in report.notes:
        print(f"note: {note}")
    print()
    print("targets (issue 10):")
    for line in targets(plan, report):
        print(f"  {line}")


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
        lines.append(f"GPU small bf16: engine >= 300 audio s/s batched: {verdict(batched, 300)}")
    else:
        for r in report.results:
            if r.batch == 1:
                lines.append(f"CPU {r.model} {r.dtype} compile {r.compile}: engine >= 2x HF "
                             f"tokens/s at batch 1: {verdict(r.ratio(), 2.0)}")
        for r in report.mixed:
            lines.append(f"CPU {r.model} {r.dtype} compile {r.compile}: engine >= 1.5x HF audio "
                         f"s/s on the mixed workload: {verdict(r.ratio(), 1.5)}")
        lines.append("GPU targets (small bf16: >= 30x real time at batch 1, >= 300 audio s/s "
                     "batched): not measured, no CUDA here")
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
    args = parser.parse_args(argv)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    if args.threads or not device.startswith("cuda"):
        # One thread by default on the CPU: steadier figures on a shared host, as the other
        # benchmarks run.
        torch.set_num_threads(args.threads or 1)
    plan = plan_of(args, device)
    print(f"benchmarks/gpu.py: HF generate vs StaticEngine, same jobs, same run, "
          f"{plan.duration:g} s a job")
    print(f"device: {_device_name(device)}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    memory = PeakMemory(device)
    with tempfile.TemporaryDirectory() as folder:
        report = run_plan(plan, memory, Path(folder))
    print_report(plan, report, memory)
    return report


if __name__ == "__main__":
    main()
