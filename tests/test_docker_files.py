"""docker/: a static check. Docker cannot run here, so nothing is built or started.

What this checks: compose.yaml parses and declares the five services, each with a health check;
Redis keeps an append-only file; the worker reserves exactly one GPU, mounts the model cache
and gets time to finish a job on stop; both images run as a non-root user; the compose
environment plus the example secrets pass the production settings rules, so Flower (auth) and
beat (its health check) would start with them. What it cannot check: that the images build,
that the base images and wheels exist, or that the containers become healthy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
SERVICES = {"redis", "postgres", "worker", "flower", "beat", "api"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _instructions(dockerfile: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / dockerfile).read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _last(instructions: list[tuple[str, str]], name: str) -> str:
    values = [rest for word, rest in instructions if word == name]
    assert values, f"no {name}"
    return values[-1]


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, duration
    return int(match[1]) * (60 if match[2] == "m" else 1)


def test_compose_declares_every_service_each_with_a_healthcheck(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert SERVICES <= set(services)
    one_shots = {name for name, s in services.items() if s.get("restart") == "no"}
    assert one_shots == {"migrate", "models"}
    assert services["migrate"]["command"] == ["musicgen-pipeline", "db", "upgrade"]
    assert services["models"]["command"][:3] == ["musicgen-pipeline", "models", "download"]
    for name, service in services.items():
        if name not in one_shots:  # a one-shot exits: it has nothing to be healthy about
            test = service.get("healthcheck", {}).get("test")
            assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no health check"
        for dependency, spec in (service.get("depends_on") or {}).items():
            if dependency in one_shots:
                assert spec["condition"] == "service_completed_successfully"
            else:
                assert spec["condition"] == "service_healthy" and "healthcheck" in services[dependency]
    # Nothing creates the schema as a side effect, so the worker waits for the migration.
    assert "migrate" in services["worker"]["depends_on"]
    # An offline worker finds its checkpoint: it starts once the download has completed.
    assert "models" in services["worker"]["depends_on"]


def test_the_models_one_shot_fills_the_worker_cache_without_a_gpu(compose: dict[str, Any]) -> None:
    models, worker = compose["services"]["models"], compose["services"]["worker"]
    assert models["build"]["dockerfile"] == "docker/worker.Dockerfile"  # has huggingface_hub
    assert "models:/models" in models["volumes"]  # HF_HOME of the worker image
    assert not models.get("deploy") and not models["depends_on"]
    assert models["healthcheck"] == {"disable": True}
    assert models["environment"] == worker["environment"]  # the same settings, the same cache
    # Every preset it downloads is a shipped preset (the worker's own: see the production test).
    from pipeline.config.layers import settings_dir

    presets = models["command"][3:]
    assert presets and all((settings_dir() / "models" / f"{p}.toml").is_file() for p in presets)


def test_redis_keeps_an_append_only_file_on_a_volume(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "pg_isready" in " ".join(compose["services"]["postgres"]["healthcheck"]["test"])


def test_the_worker_reserves_one_gpu_and_mounts_the_model_cache(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]
    assert len(devices[0]["device_ids"]) == 1  # one worker per GPU
    assert "models:/models" in worker["volumes"] and "models" in compose["volumes"]
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"
    # The node name the health check pings is the one the worker takes.
    node = worker["command"][worker["command"].index("-n") + 1]
    assert node.replace("%h", "$$HOSTNAME") in " ".join(worker["healthcheck"]["test"])

    from pipeline.config.schema import WorkerSettings

    assert _seconds(worker["stop_grace_period"]) > WorkerSettings().shutdown_grace


def test_worker_image_is_cuda_non_root_with_the_cache_at_models() -> None:
    ins = _instructions("worker.Dockerfile")
    assert _last(ins, "FROM").startswith("nvidia/cuda:") and "runtime" in _last(ins, "FROM")
    user = _last(ins, "USER")
    assert user not in ("root", "0") and not user.startswith("0:")
    assert ("ENV", "HF_HOME=/models") in ins and '["/models"]' in _last(ins, "VOLUME")
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert "python3.11" in runs and "ffmpeg" in runs
    assert runs.index("torch==") < runs.index('".[worker,postgres,storage]"')  # torch first, then the extras
    assert "--constraint requirements.lock" in runs  # the versions CI tested
    assert _last(ins, "CMD") == '["musicgen-pipeline", "worker"]'  # exec form: gets SIGTERM itself


def test_app_image_is_slim_non_root_without_torch() -> None:
    ins = _instructions("app.Dockerfile")
    assert _last(ins, "FROM") == "python:3.11-slim"
    assert _last(ins, "USER") not in ("root", "0")
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert '".[flower,postgres,api,storage]"' in runs and "ffmpeg" in runs and "torch" not in runs
    assert "--constraint requirements.lock" in runs  # the versions CI tested


@pytest.mark.parametrize("dockerfile", ["worker.Dockerfile", "app.Dockerfile"])
def test_every_copied_path_exists_and_survives_the_dockerignore(dockerfile: str) -> None:
    ignore = (DOCKER / f"{dockerfile}.dockerignore").read_text(encoding="utf-8").splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for word, rest in _instructions(dockerfile):
        if word == "COPY":
            for source in rest.split()[:-1]:
                assert (REPO / source).exists(), source
                assert source.rstrip("/") in kept, f"{source} is excluded from the build context"


def test_flower_and_beat_run_from_the_app_image_with_the_project_commands(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("flower", "beat"):
        assert services[name]["build"]["dockerfile"] == "docker/app.Dockerfile"
        assert services[name]["command"] == ["musicgen-pipeline", name]
    assert services["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    assert "/healthcheck" in " ".join(services["flower"]["healthcheck"]["test"])
    assert "celerybeat@$$HOSTNAME" in " ".join(services["beat"]["healthcheck"]["test"])


def test_no_secret_is_written_into_compose(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        environment = service.get("environment") or {}
        assert not [k for k in environment if "PASSWORD" in k or "SECRET" in k], name
        assert service.get("env_file", ["secrets.env"]) == ["secrets.env"]


def _env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def test_compose_environment_with_the_example_secrets_passes_production_rules(
        compose: dict[str, Any], isolated_settings_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cli.beat_cmd import beat_argv
    from pipeline.cli.flower_cmd import flower_auth
    from pipeline.config import load_settings

    environment = {**compose["services"]["worker"]["environment"], **_env_file(DOCKER / "secrets.env.example")}
    assert compose["services"]["flower"]["environment"] == compose["services"]["worker"]["environment"]
    for key, value in environment.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setenv("MUSICGEN_APP__DATA_DIR", str(isolated_settings_env / "data"))  # /data is not ours here

    settings = load_settings()
    assert settings.app.environment.value == "production"
    # The models one-shot downloads the checkpoint this worker loads, offline.
    assert settings.model.offline
    assert settings.model.preset in compose["services"]["models"]["command"][3:]
    assert settings.broker.url == "redis://redis:6379/0" and settings.broker.password is not None
    assert settings.storage.output_dir == "/data/outputs"
    auth = flower_auth(settings)  # Flower would start: auth is set and usable
    assert auth is not None and auth.startswith("admin:")
    assert settings.monitoring.flower_port == 5555
    assert "--enable-remote-control" in beat_argv(settings)  # what beat's health check pings
