"""Layer precedence alone (pipeline/config/layers.py): each layer beats the one below it, and
provenance (``source_of``) names the layer that won.

The packaged layers are replaced by a small synthetic set (``settings_dir`` patched) so a
change of a packaged value cannot make these tests pass or fail; the last tests use the real
packaged presets.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from pipeline.config import layers, load_layered

KEY = "generation.default_top_k"
ENV_VAR = "MUSICGEN_GENERATION__DEFAULT_TOP_K"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _section(value: int | None, section: str = "default") -> str:
    return "" if value is None else f"[{section}.generation]\ndefault_top_k = {value}\n"


# (layer, value it sets, the label source_of gives it), lowest precedence first.
LAYERS = [
    ("default", 1, "settings.toml"),
    ("environment", 2, "settings.toml [development]"),
    ("preset", 3, "preset alpha"),
    ("profile", 4, "profile low_latency"),
    ("settings.local.toml", 5, "settings.local.toml"),
    (".secrets.toml", 6, ".secrets.toml"),
    ("MUSICGEN_SETTINGS_FILES", 7, "MUSICGEN_SETTINGS_FILES:extra.toml"),
    ("--file", 8, "--file cli.toml"),
    ("env var", 9, f"env {ENV_VAR}"),
    ("override", 10, "override"),
]


@pytest.fixture
def packaged(isolated_settings_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A synthetic packaged settings dir: settings.toml, preset ``alpha``, profile ``low_latency``."""
    root = isolated_settings_env / "packaged"
    root.mkdir()
    monkeypatch.setattr(layers, "settings_dir", lambda: root)
    return root


def _stack(packaged: Path, cwd: Path, monkeypatch: pytest.MonkeyPatch, upto: int) -> dict[str, object]:
    """Write every layer up to ``upto`` (an index of LAYERS) with its value; return load kwargs."""
    value = {name: (v if i <= upto else None) for i, (name, v, _) in enumerate(LAYERS)}
    _write(packaged / "settings.toml", "[default.model]\npreset = \"alpha\"\n"
           "[default.app]\nprofile = \"low_latency\"\n"
           "[default.generation]\nmax_batch_size = 2\n"
           f"default_top_k = {value['default']}\n"
           + _section(value["environment"], "development") + _section(99, "production"))
    _write(packaged / "models" / "alpha.toml", "# alpha\n[default.model]\nsource = \"org/alpha\"\n"
           + _section(value["preset"]))
    _write(packaged / "profiles" / "low_latency.toml", "# fast\n" + _section(value["profile"]))
    # Layers above ``upto`` are removed, so the same cwd can be reloaded one layer lower.
    for name in ("settings.local.toml", ".secrets.toml"):
        (cwd / name).unlink(missing_ok=True)
        if value[name] is not None:
            _write(cwd / name, _section(value[name]))
    monkeypatch.delenv("MUSICGEN_SETTINGS_FILES", raising=False)
    if value["MUSICGEN_SETTINGS_FILES"] is not None:
        _write(cwd / "extra.toml", _section(value["MUSICGEN_SETTINGS_FILES"]))
        monkeypatch.setenv("MUSICGEN_SETTINGS_FILES", "extra.toml")
    kwargs: dict[str, object] = {"env": "development"}
    if value["--file"] is not None:
        kwargs["files"] = [_write(cwd / "cli.toml", _section(value["--file"]))]
    monkeypatch.delenv(ENV_VAR, raising=False)
    if value["env var"] is not None:
        monkeypatch.setenv(ENV_VAR, str(value["env var"]))
    if value["override"] is not None:
        kwargs["overrides"] = {KEY: value["override"]}
    return kwargs


@pytest.mark.parametrize("upto", range(1, len(LAYERS)),
                         ids=[f"{LAYERS[i][0]} beats {LAYERS[i - 1][0]}" for i in range(1, len(LAYERS))])
def test_each_layer_beats_the_one_below(upto: int, packaged: Path, isolated_settings_env: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs = _stack(packaged, isolated_settings_env, monkeypatch, upto)
    layered = load_layered(**kwargs)  # type: ignore[arg-type]
    _, value, label = LAYERS[upto]
    assert layered.report.ok, layered.report.text()
    assert layered.raw["generation"]["default_top_k"] == value
    assert layered.settings is not None and layered.settings.generation.default_top_k == value
    assert layered.source_of(KEY) == label
    # The layer below did set the key: it was beaten, not absent.
    below = load_layered(**_stack(packaged, isolated_settings_env, monkeypatch, upto - 1))  # type: ignore[arg-type]
    assert below.raw["generation"]["default_top_k"] == LAYERS[upto - 1][1]


def test_untouched_sibling_keeps_its_own_source(packaged: Path, isolated_settings_env: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Every layer sets a key of [generation]; max_batch_size still comes from settings.toml."""
    layered = load_layered(**_stack(packaged, isolated_settings_env, monkeypatch, len(LAYERS) - 1))  # type: ignore[arg-type]
    assert layered.raw["generation"]["max_batch_size"] == 2
    assert layered.source_of("generation.max_batch_size") == "settings.toml"
    assert layered.source_of("model.source") == "preset alpha"
    assert layered.source_of("model.cache_dir") == "default (schema)"
    assert layered.source_of("app.environment") == "MUSICGEN_ENV"


def test_environment_section_of_a_user_file_beats_its_default(packaged: Path, isolated_settings_env: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _stack(packaged, isolated_settings_env, monkeypatch, 0)
    _write(isolated_settings_env / "settings.local.toml",
           _section(20) + _section(21, "development") + _section(22, "staging"))
    layered = load_layered("development")
    assert layered.raw["generation"]["default_top_k"] == 21
    assert layered.source_of(KEY) == "settings.local.toml [development]"


def test_later_settings_files_entry_beats_earlier(packaged: Path, isolated_settings_env: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _stack(packaged, isolated_settings_env, monkeypatch, 0)
    _write(isolated_settings_env / "a.toml", _section(30))
    _write(isolated_settings_env / "b.toml", _section(31))
    monkeypatch.setenv("MUSICGEN_SETTINGS_FILES", "a.toml,b.toml")
    layered = load_layered("development")
    assert layered.raw["generation"]["default_top_k"] == 31
    assert layered.source_of(KEY) == "MUSICGEN_SETTINGS_FILES:b.toml"


def test_env_var_value_is_parsed_as_toml_and_nested(packaged: Path, isolated_settings_env: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    _stack(packaged, isolated_settings_env, monkeypatch, 0)
    monkeypatch.setenv("MUSICGEN_QUOTAS__TIERS__FREE__DAILY", "7")
    monkeypatch.setenv("MUSICGEN_VALIDATION__MELODY_FORMATS", '["wav"]')
    layered = load_layered("development")
    assert layered.raw["quotas"]["tiers"]["free"]["daily"] == 7
    assert layered.source_of("quotas.tiers.free.daily") == "env MUSICGEN_QUOTAS__TIERS__FREE__DAILY"
    assert layered.source_of("quotas.tiers.free.monthly") == "default (schema)"


@pytest.mark.parametrize("layer", ["settings.local.toml", "--file", "env var", "override"])
def test_a_list_replaces_the_list_below_it(layer: str, isolated_settings_env: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """TOML semantics: a layer's list is the list (Dynaconf's merge would concatenate them)."""
    kwargs: dict[str, object] = {"env": "development"}
    if layer == "settings.local.toml":
        _write(isolated_settings_env / layer, '[default.validation]\nmelody_formats = ["flac"]\n')
    elif layer == "--file":
        kwargs["files"] = [_write(isolated_settings_env / "x.toml",
                                  '[default.validation]\nmelody_formats = ["flac"]\n')]
    elif layer == "env var":
        monkeypatch.setenv("MUSICGEN_VALIDATION__MELODY_FORMATS", '["flac"]')
    else:
        kwargs["overrides"] = {"validation.melody_formats": ["flac"]}
    layered = load_layered(**kwargs)  # type: ignore[arg-type]
    assert layered.settings is not None
    assert layered.settings.validation.melody_formats == ["flac"]
    assert layered.source_of("validation.melody_formats") != "settings.toml"


def test_env_var_preset_picks_the_packaged_preset_file(isolated_settings_env: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSICGEN_MODEL__PRESET", "tiny")
    layered = load_layered("development")
    assert layered.report.ok, layered.report.text()
    assert ("preset tiny", layers.settings_dir() / "models" / "tiny.toml") in layered.files
    assert layered.settings is not None
    assert layered.settings.model.source == ".musicgen/models/tiny"
    assert layered.source_of("model.source") == "preset tiny"
    assert layered.source_of("model.preset") == "env MUSICGEN_MODEL__PRESET"


def test_unknown_preset_is_a_report_error_with_did_you_mean(isolated_settings_env: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSICGEN_MODEL__PRESET", "tinny")
    layered = load_layered("development")
    assert not layered.report.ok and layered.settings is None
    [problem] = [p for p in layered.report.errors if p.path == "model.preset"]
    assert problem.value == "tinny"
    assert "did you mean 'tiny'?" in problem.fix
    assert not any(label.startswith("preset") for label, _ in layered.files)
