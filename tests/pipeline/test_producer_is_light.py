"""The producer side never imports the worker stack: a calling service installs the base
package only, and must not pay (or need) torch, transformers or ffmpeg to enqueue a job."""

from __future__ import annotations

import json
import subprocess
import sys

WORKER_STACK = ("torch", "transformers", "ffmpeg", "soundfile", "numpy", "alembic")


def test_import_pipeline_and_build_a_request_imports_no_worker_stack() -> None:
    code = ("import sys, json, pipeline, pipeline.aio\n"
            "pipeline.GenerationRequest(prompt='x', duration=1.0)\n"
            f"print(json.dumps([m for m in {WORKER_STACK!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
