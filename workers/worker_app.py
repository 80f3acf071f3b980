"""The worker's Celery app: the shared factory plus the task and the per-process hooks."""

from __future__ import annotations

from pipeline.config import Settings, load_settings
from pipeline.infra.celery_app import PipelineCelery, make_celery


def build_app(settings: Settings | None = None) -> PipelineCelery:
    # Settings loaded here can be loaded again the same way: such a worker reloads them live.
    # Settings handed in belong to the program that embeds the worker (``generate``'s worker).
    reloadable = settings is None
    settings = settings if settings is not None else load_settings()
    app = make_celery(settings, name="musicgen-worker")
    from workers import live_reload, maintenance, memory_guard, signals, tasks, webhook_task
    from workers.runtime.loading import apply_hub_timeouts

    tasks.register_tasks(app)
    maintenance.register(app)
    webhook_task.register(app)
    if reloadable:
        # First: a pool process watches for reloads before the model preload (signals), which
        # takes seconds with the engine's self-check; a reload told meanwhile is not missed.
        live_reload.connect(app)
    signals.connect(app)
    memory_guard.connect(app)
    # Before any model loads, in the parent too, so prefork children inherit it.
    apply_hub_timeouts(settings.model.download_timeout)
    return app
