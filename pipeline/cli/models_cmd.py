"""`musicgen-pipeline models`: build the tiny local models tests and offline demos run on."""

from __future__ import annotations

from pathlib import Path

import typer

models_app = typer.Typer(help="Model utilities.", no_args_is_help=True)


@models_app.command("make-tiny")
def make_tiny_cmd(
    path: Path = typer.Argument(Path(".musicgen/models"),
                                help="folder that receives tiny/, tiny-melody/ and tiny-stereo/"),
    seed: int = typer.Option(0, help="initialisation seed"),
) -> None:
    """Build a tiny randomly initialised MusicGen, MusicGen-Melody and stereo MusicGen (they
    sound like noise).

    Saved exactly like real checkpoints, so the `tiny`, `tiny-melody` and `tiny-stereo` presets load them
    through the same from_pretrained() path as facebook/musicgen-*. Needs the `worker` extra.
    """
    try:
        from workers.runtime.tiny import make_tiny
    except ImportError as exc:  # torch/transformers missing: the base install
        typer.echo(f"error: the worker extra is not installed ({exc.name}); "
                   "pip install 'musicgen-pipeline[worker]'", err=True)
        raise typer.Exit(1) from exc
    for name, melody, stereo in (("tiny", False, False), ("tiny-melody", True, False),
                                 ("tiny-stereo", False, True)):
        target = make_tiny(path / name, melody=melody, stereo=stereo, seed=seed)
        typer.echo(f"{name}: {target} (random weights: it sounds like noise)")
