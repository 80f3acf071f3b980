"""The effective settings as environment variables, or as a Kubernetes ConfigMap plus Secret.

Each value is TOML-encoded, the form Dynaconf's env loader parses (``MUSICGEN_X__Y=value``,
layer 6 in ``layers.py``): exporting a tree and loading with those variables set gives equal
Settings. Values are written literally, as ``docker --env-file`` and Kubernetes take them: no
shell quoting. ``None`` leaves are left out (TOML has no null; unset is their default anyway).

Secret values (the SecretStr fields) are masked unless ``reveal_secrets=True``: the caller
decides, never a default.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from enum import Enum
from typing import Any

import yaml
from pydantic import SecretStr

from pipeline.config.layers import ENV_SWITCHER, ENVVAR_PREFIX
from pipeline.config.problem import MASK
from pipeline.config.report import SECRET_PATHS
from pipeline.config.schema import Settings

# Chosen by MUSICGEN_ENV (the environment section), never by a key of its own.
_NOT_EXPORTED = {"app.environment"}


def leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted.path, value)`` for every leaf of a nested mapping; lists are leaves."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from leaves(value, f"{path}.")
        else:
            yield path, value


def env_name(dotted: str) -> str:
    """``model.cache_size`` -> ``MUSICGEN_MODEL__CACHE_SIZE``."""
    return f"{ENVVAR_PREFIX}_{dotted.upper().replace('.', '__')}"


def is_secret(dotted: str, value: Any = None) -> bool:
    return isinstance(value, SecretStr) or dotted in SECRET_PATHS


def toml_value(value: Any) -> str:
    """One value in TOML's inline syntax (JSON's string escapes are valid TOML basic strings)."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool | int | float | str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot export {type(value).__name__} as a TOML value")


def _tree(settings: Settings | Mapping[str, Any]) -> Mapping[str, Any]:
    # python mode keeps SecretStr objects, so a secret is recognised by its type as well as its path.
    return settings.model_dump() if isinstance(settings, Settings) else settings


def _environment(tree: Mapping[str, Any]) -> str | None:
    app = tree.get("app")
    env = app.get("environment") if isinstance(app, Mapping) else None
    return None if env is None else str(env.value if isinstance(env, Enum) else env)


def variables(settings: Settings | Mapping[str, Any], *,
              reveal_secrets: bool = False) -> list[tuple[str, str, bool]]:
    """``(NAME, value, is_secret)`` for every exported leaf, ``MUSICGEN_ENV`` first."""
    tree = _tree(settings)
    out: list[tuple[str, str, bool]] = []
    env = _environment(tree)
    if env is not None:
        out.append((ENV_SWITCHER, env, False))  # read raw by the loader, not as TOML
    for dotted, value in leaves(tree):
        if value is None or dotted in _NOT_EXPORTED:
            continue
        secret = is_secret(dotted, value)
        shown = toml_value(value) if reveal_secrets or not secret else MASK
        out.append((env_name(dotted), shown, secret))
    return out


def to_env(settings: Settings | Mapping[str, Any], *, reveal_secrets: bool = False) -> list[str]:
    """``NAME=value`` lines; secret values are ``**********`` unless ``reveal_secrets``."""
    return [f"{name}={value}" for name, value, _ in variables(settings, reveal_secrets=reveal_secrets)]


def to_k8s(settings: Settings | Mapping[str, Any], *, name: str = "musicgen-pipeline",
           reveal_secrets: bool = False) -> str:
    """A ConfigMap ``name`` (non-secret keys) and a Secret ``name-secrets`` (secret keys only).

    Without ``reveal_secrets`` the Secret holds ``**********`` placeholders to fill in before
    applying it. Use both with ``envFrom`` on the worker and producer containers.
    """
    rows = variables(settings, reveal_secrets=reveal_secrets)
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/managed-by": "musicgen-pipeline"}
    config_map = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels},
        "data": {k: v for k, v, secret in rows if not secret},
    }
    secret = {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": f"{name}-secrets", "labels": labels},
        "stringData": {k: v for k, v, secret in rows if secret},
    }
    # With no stream given, safe_dump_all returns the text; yaml has no types, so it is Any.
    return str(yaml.safe_dump_all([config_map, secret], sort_keys=False, allow_unicode=True))
