"""Our own MusicGen decode loop: static KV cache, compiled steps, continuous batching (issue 10).

``StaticEngine`` (``engine``) admits jobs into rows and steps them together; ``decoder`` is the
step over the loaded model's weights, ``cache`` the preallocated keys and values, ``delay`` the
codebook delay pattern, ``slots`` the host-side row bookkeeping, ``compile`` the compiled step.
"""

from workers.runtime.engine.engine import EngineUnsupported, StaticEngine

__all__ = ["EngineUnsupported", "StaticEngine"]
