"""GPU-node side of musicgen-pipeline: `celery -A workers worker -Q musicgen.<preset>`.

``workers.app`` is built on first access (from the process's settings), so importing a
submodule such as ``workers.runtime`` builds no Celery app and loads no model.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        from workers.worker_app import build_app

        built = build_app()
        globals()["app"] = globals()["celery"] = built
        return built
    raise AttributeError(name)
