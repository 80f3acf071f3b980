"""`musicgen-pipeline api`: the HTTP gateway (pipeline/gateway) under uvicorn.

Needs the ``api`` extra. uvicorn's access log is off: the gateway logs each request itself,
with the API key's public prefix only (a key never reaches a log line).
"""

from __future__ import annotations

import logging

import typer

from pipeline.cli.common import EnvOption, SetsOption

# SSE streams stay open until their job ends: on SIGTERM uvicorn waits this long for them,
# then closes them (a client reconnects to another gateway process).
GRACEFUL_SHUTDOWN_S = 10


def api(
    host: str = typer.Option(None, "--host", help="address to bind; default api.host"),
    port: int = typer.Option(None, "--port", help="port; default api.port (8000)"),
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """Serve the HTTP gateway: /v1/jobs, /v1/models, /healthz, /readyz, the web page at /
    and the OpenAPI schema at /openapi.json (docs at /docs)."""
    from pipeline.cli.common import EXIT_FAILED, fail, load_or_exit, parse_sets
    from pipeline.errors import PipelineError

    overrides = parse_sets(sets)
    if host is not None:
        overrides["api.host"] = host
    if port is not None:
        overrides["api.port"] = str(port)
    settings = load_or_exit(env, overrides)
    try:
        import uvicorn

        from pipeline.gateway.app import create_app
    except ImportError as exc:
        typer.echo(f"error: the HTTP gateway needs the `api` extra ({exc.name} is missing): "
                   "pip install 'musicgen-pipeline[api]'", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    level = settings.app.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    json_logs = settings.logging.format == "json"
    if json_logs:
        from pipeline.infra.log_format import use_json

        use_json([logging.getLogger()])
    try:
        app = create_app(settings)
    except PipelineError as exc:  # no quota database, a broker URL that cannot be used
        fail(exc)
    if not settings.api.auth:
        message = ("API keys are off (api.auth = false): every request acts for the user "
                   "`anonymous` (development only)")
        if json_logs:  # a log line like every other, not raw text in a JSON stream
            logging.getLogger("pipeline.gateway").warning(message)
        else:
            typer.echo(f"warning: {message}", err=True)
    uvicorn.run(app, host=settings.api.host, port=settings.api.port, access_log=False,
                log_level=settings.app.log_level, server_header=False,
                # JSON: uvicorn's loggers keep no handlers of their own and reach the root's.
                log_config=None if json_logs else uvicorn.config.LOGGING_CONFIG,
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
