"""`musicgen-pipeline models`: build the tiny local models tests and offline demos run on."""

from __future__ import annotations

from pathlib import Path

import typer

models_app = typer.Typer(help="Model utilities.", no_args_is_help=True)


@models_app.command("make-tiny")
def make_tiny_cmd(
    path: Path = typer.Argument(Path(".musicgen/models"), help="folder that receives tiny/ and tiny-melody/"),
    seed: int = typer.Option(0, help="initialisation seed"),
) -> None:
    """Build a tiny randomly initialised MusicGen and MusicGen-Melody (they sound like noise).

    Saved exactly like real checkpoints, so the `tiny` and `tiny-melody` presets load them
    through the same from_pretrained() path as facebook/musicgen-*. Needs the `worker` extra.
    """
    try:
        from workers.runtime.tiny import make_tiny
    except ImportError as exc:  # torch/transformers missing: the base install
        typer.echo(f"error: the worker extra is not installed ({exc.name}); "
                   "pip install 'musicgen-pipeline[worker]'", err=True)
        raise typer.Exit(1) from exc
    for name, melody in (("tiny", False), ("tiny-melody", True)):
        target = make_tiny(path / name, melody=melody, seed=seed)
        typer.echo(f"{name}: {target} (random weights: it sounds like noise)")
