"""Model experiments end to end (issue 14): jobs that pin no model are split over two presets the
shared worker serves (tiny and tiny-melody, which takes text-only jobs too), each user's jobs
run on their variant, the real ledger rows record it, `stats --by variant` compares the two,
and `settings check` asks the live worker which variants it serves.

The ledger is shared with the other modules' jobs: everything here reads through this test's
own experiment name.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

import pipeline
from pipeline import GenerationRequest
from pipeline.cli import app as cli
from pipeline.config.checks import Status, check_experiments
from pipeline.contract.user_context import UserContext
from pipeline.ops.experiments import assign

from .conftest import Worker, base_env, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VARIANTS = ("tiny", "tiny-melody")


def test_variants_run_are_recorded_and_compared(shared_worker: Worker, workdir: Path,
                                                redis_url: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in base_env(workdir, redis_url).items():
        if key.startswith("MUSICGEN_"):
            monkeypatch.setenv(key, value)
    name = f"it-{uuid.uuid4().hex[:12]}"
    settings = pipeline.load_settings(cwd=workdir, overrides={"experiments": {name: {
        "variants": dict.fromkeys(VARIANTS, 50), "control": "tiny"}}})
    tier = settings.quotas.default_tier  # no quota row: the users are on the default tier
    by_variant: dict[str, list[str]] = {v: [] for v in VARIANTS}
    for i in range(200):
        user = f"{name}-user-{i}"
        got = assign(settings, UserContext(user, tier), datetime.now(UTC))
        assert got is not None
        if len(by_variant[got.variant]) < 2:
            by_variant[got.variant].append(user)
    assert all(len(users) == 2 for users in by_variant.values()), by_variant

    producer = pipeline.Producer(settings)
    try:
        handles = {variant: [producer.enqueue(GenerationRequest(
            prompt=f"experiment {user}", duration=0.5, format="wav", user_id=user))
            for user in users] for variant, users in by_variant.items()}
        for variant, jobs in handles.items():
            for handle in jobs:
                assert handle.wait(180).model == variant  # ran on the variant it was given

        def settled() -> bool:  # the worker settles the ledger just after storing a result
            rows = [r for r in producer.quota.ledger() if r["experiment"] == name]
            return len(rows) == 4 and all(r["status"] == "succeeded" for r in rows)

        wait_for(settled, 60, "the four ledger rows to settle")
        rows = [r for r in producer.quota.ledger() if r["experiment"] == name]
        assert sorted((r["variant"], r["model"]) for r in rows) == sorted(
            (v, v) for v in VARIANTS for _ in range(2))
    finally:
        producer.quota.close()

    out = CliRunner().invoke(cli, ["stats", "--by", "variant", "--since", "1h", "--json",
                                   "--experiment", name])
    assert out.exit_code == 0, out.output
    groups = json.loads(out.stdout)["by_variant"]
    assert [(g["experiment"], g["variant"]) for g in groups] == [(name, v) for v in VARIANTS]
    for g in groups:
        assert (g["jobs"], g["succeeded"], g["error_rate_percent"]) == (2, 2, 0.0)
        assert g["latency"]["count"] == 2 and 0 < g["latency"]["p50"] <= g["latency"]["p95"]
        assert g["audio_per_gpu_second"] is not None and g["audio_per_gpu_second"] > 0

    # The live worker consumes both variants' queues; musicgen-medium's has nobody.
    assert [r.status for r in check_experiments(settings, timeout=2.0)] == [Status.ok]
    unserved = settings.model_copy(update={"experiments": {
        **settings.experiments,
        "zz": settings.experiments[name].model_copy(
            update={"variants": {"tiny": 50.0, "musicgen-medium": 50.0}})}})
    [warning] = check_experiments(unserved, timeout=2.0)
    assert (warning.name, warning.status) == ("experiments.zz", Status.warn)
    assert "musicgen-medium" in warning.detail and "musicgen.musicgen-medium" in warning.detail
