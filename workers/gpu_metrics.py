"""GPU memory in use and in total, and utilization where NVML answers, of each job process's
device: ``musicgen_gpu_memory_used_bytes``, ``musicgen_gpu_memory_total_bytes`` and
``musicgen_gpu_utilization_ratio`` (label ``device``; one series per live process).

Sampled from the generation loop's ticks (``workers.health.loop_tick``), at most every
``SAMPLE_EVERY_S``, and only once the process has CUDA up: reading memory must never be what
initialises CUDA (not in a prefork parent, and not on a CPU-only node, which exports none).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["sample"]

SAMPLE_EVERY_S = 5.0

_lock = threading.Lock()
_gauges: dict[str, Any] = {}
_last = [0.0]


def _gauge(name: str, doc: str) -> Any:
    with _lock:
        if name not in _gauges:
            from prometheus_client import Gauge

            _gauges[name] = Gauge(name, doc, ["device"], multiprocess_mode="liveall")
        return _gauges[name]


def sample() -> None:
    """Record this process's GPU memory (and utilization) if CUDA is up; never raises."""
    now = time.monotonic()
    if now - _last[0] < SAMPLE_EVERY_S:
        return
    _last[0] = now
    torch = sys.modules.get("torch")  # never imported here: a process without it has no GPU
    try:
        if torch is None or not torch.cuda.is_initialized():
            return
        index = torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        device = str(index)
        _gauge("musicgen_gpu_memory_used_bytes", "GPU memory in use on the device (all "
               "processes), bytes").labels(device).set(total - free)
        _gauge("musicgen_gpu_memory_total_bytes", "GPU memory of the device, bytes"
               ).labels(device).set(total)
        try:
            utilization = torch.cuda.utilization(index)  # needs NVML (pynvml)
        except Exception:  # no NVML on this node: memory is still worth reporting
            return
        _gauge("musicgen_gpu_utilization_ratio", "Share of the last sample period the GPU was "
               "busy (NVML)").labels(device).set(utilization / 100)
    except Exception:
        log.warning("could not sample GPU memory", exc_info=True)
