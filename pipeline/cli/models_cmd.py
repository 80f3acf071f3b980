"""`musicgen-pipeline models`: put a preset's checkpoint on this node (download from the Hub or
import a folder, for `model.offline = true` workers), and build the tiny local models tests and
offline demos run on."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.cli.common import EnvOption, SetsOption, fail, load_or_exit, parse_sets
from pipeline.errors import PipelineError

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


@models_app.command("download")
def download_cmd(
    presets: list[str] = typer.Argument(..., help="model presets, e.g. musicgen-small"),
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """Download each preset's checkpoint from the Hugging Face Hub into model.cache_dir (the
    Hub cache offline workers read), resuming a partial download, and verify the files.
    HF_ENDPOINT selects a mirror; model.hub_token (or HF_TOKEN) opens gated repos."""
    from pipeline.infra.model_files import download

    settings = load_or_exit(env, parse_sets(sets))
    for preset in presets:
        try:
            snapshot = download(settings, preset)
        except PipelineError as exc:
            fail(exc)
        typer.echo(f"{preset}: {snapshot.source} -> {snapshot.path} ({snapshot.files} files, verified)")


@models_app.command("import")
def import_cmd(
    preset: str = typer.Argument(..., help="the model preset the files are for"),
    path: str = typer.Argument(..., help="a checkpoint folder (config.json and the weights), "
                                         "local or s3://bucket/prefix (storage.* credentials)"),
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """Import a checkpoint folder (local, or in the deployment's bucket) as PRESET's files, for
    nodes without Hub access: verified, then copied into model.cache_dir in the Hub's layout,
    where offline workers look."""
    from pipeline.infra.model_files import import_from

    settings = load_or_exit(env, parse_sets(sets))
    try:
        snapshot = import_from(settings, preset, path)
    except PipelineError as exc:
        fail(exc)
    typer.echo(f"{preset}: {path} -> {snapshot.path} ({snapshot.files} files, verified)")
