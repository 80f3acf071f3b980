"""The ``musicgen-pipeline`` command: a root Typer app that assembles one sub-app per area.

Adding an area (generate, worker, models, ...) is two lines: import its Typer app and
``app.add_typer`` it. Sub-app modules import heavy things (torch) inside their commands only.
"""

import typer

from pipeline.cli.api_cmd import api
from pipeline.cli.beat_cmd import beat
from pipeline.cli.breaker_cmd import breaker_app
from pipeline.cli.db_cmd import db_app
from pipeline.cli.exporter_cmd import queue_exporter
from pipeline.cli.flags_cmd import flags_app
from pipeline.cli.flower_cmd import flower
from pipeline.cli.generate_cmd import generate
from pipeline.cli.health_cmd import health
from pipeline.cli.keys_cmd import keys_app
from pipeline.cli.models_cmd import models_app
from pipeline.cli.quota_cmd import quota_app
from pipeline.cli.settings_cmd import settings_app
from pipeline.cli.stats_cmd import stats
from pipeline.cli.webhooks_cmd import webhooks
from pipeline.cli.worker_cmd import worker
from pipeline.cli.workers_cmd import workers_app

app = typer.Typer(
    name="musicgen-pipeline",
    help="Serve Meta's MusicGen through Celery: settings, workers, jobs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold secrets
)
app.add_typer(settings_app, name="settings")
app.add_typer(models_app, name="models")
app.add_typer(breaker_app, name="breaker")
app.add_typer(db_app, name="db")
app.add_typer(quota_app, name="quota")
app.add_typer(flags_app, name="flags")
app.add_typer(keys_app, name="keys")
app.add_typer(workers_app, name="workers")
app.command("stats")(stats)
app.command("health")(health)
app.command("generate")(generate)
app.command("worker", context_settings={"ignore_unknown_options": False})(worker)
app.command("flower")(flower)
app.command("beat")(beat)
app.command("webhooks")(webhooks)
app.command("api")(api)
app.command("queue-exporter")(queue_exporter)


def main() -> None:
    """Console-script entry point (``musicgen-pipeline = "pipeline.cli:main"``)."""
    app()


__all__ = ["app", "main"]
