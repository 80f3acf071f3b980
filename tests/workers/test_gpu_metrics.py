"""GPU memory sampling never initialises CUDA and exports nothing where CUDA is not up (this CPU
node; tests/integration/test_worker_health.py leaves the GPU panels out for the same reason)."""

from __future__ import annotations

import torch
from prometheus_client import REGISTRY

from workers import gpu_metrics


def test_a_process_without_cuda_up_exports_no_gpu_series() -> None:
    assert not torch.cuda.is_initialized()
    gpu_metrics._last[0] = 0.0  # past the sampling interval
    gpu_metrics.sample()
    assert not torch.cuda.is_initialized()  # looking did not start CUDA
    names = {s.name for f in REGISTRY.collect() for s in f.samples}
    assert not {n for n in names if n.startswith("musicgen_gpu_")}
