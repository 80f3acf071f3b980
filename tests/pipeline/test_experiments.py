"""Model experiments (issue 14): the settings and their rules, sticky assignment and the split,
tiers, time window and switch, pinned requests left alone, the fallback to the control through
a real Producer on real Redis, the ledger's columns on SQLite and PostgreSQL, the 0003 -> 0004
migration on a ledger with rows, and `stats --by variant`."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis
from alembic import command
from sqlalchemy import insert, inspect
from typer.testing import CliRunner

import pipeline
from pipeline.cli import app as cli
from pipeline.client.resolve import resolve
from pipeline.config import load_layered
from pipeline.config.checks import Status, check_experiments
from pipeline.config.export import to_env
from pipeline.config.rules import RULES
from pipeline.config.schema import ExperimentSettings, Settings
from pipeline.contract.jobs import GenerationRequest, JobSpec, queue_for
from pipeline.contract.user_context import UserContext
from pipeline.errors import InvalidRequest, ServiceUnavailable
from pipeline.infra import keys
from pipeline.ops.experiments import (
    assign,
    bucket,
    control_fallback,
    pick_variant,
    unserved_variants,
)
from pipeline.ops.stats import compute_variant_stats
from pipeline.quota import DEFAULT_TIERS, QuotaStore, current, make_engine, upgrade
from pipeline.quota.configured import prepare_database
from pipeline.quota.migrate import alembic_config
from pipeline.quota.tables import UsageLedger
from tests.pipeline.test_migrations import HEAD

if TYPE_CHECKING:
    from tests.pipeline.quota_conftest import FakeClock

# quota_store / quota_empty_db_url: a real SQLite file and a real PostgreSQL database each.
pytest_plugins = ["tests.pipeline.quota_conftest"]

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
SMALL, MEDIUM = "musicgen-small", "musicgen-medium"


def experiment(**fields: Any) -> ExperimentSettings:
    base: dict[str, Any] = {"variants": {SMALL: 90.0, MEDIUM: 10.0}, "control": SMALL}
    return ExperimentSettings(**{**base, **fields})


def settings_with(**experiments: ExperimentSettings) -> Settings:
    return Settings(experiments=experiments)


def user_on(settings: Settings, variant: str, tier: str = "free") -> UserContext:
    """The first of user-0, user-1, ... whom the settings put on ``variant``."""
    for i in range(10_000):
        user = UserContext(f"user-{i}", tier)
        got = assign(settings, user, NOW)
        if got is not None and got.variant == variant:
            return user
    raise AssertionError(f"nobody lands on {variant}")


# --- settings: every problem at once, each with its path and a fix ---------------------------

@dataclass(frozen=True)
class RuleCase:
    rule: str
    failing: dict[str, Any]
    passing: dict[str, Any]
    path: str


_SPLIT = {"experiments.trial.variants": {SMALL: 90, MEDIUM: 10},
          "experiments.trial.control": SMALL}
# One failing and one passing case per experiment rule, in the shape of test_settings_rules.py.
RULE_CASES = [
    RuleCase("experiments: percents sum to 100",
             {**_SPLIT, "experiments.trial.variants": {SMALL: 90, MEDIUM: 20}}, _SPLIT,
             "experiments.trial.variants"),
    RuleCase("experiments: variants are known presets",
             {**_SPLIT, "experiments.trial.variants": {SMALL: 90, "musicgen-mediun": 10}}, _SPLIT,
             "experiments.trial.variants"),
    RuleCase("experiments: control is a variant",
             {**_SPLIT, "experiments.trial.control": "musicgen-large"}, _SPLIT,
             "experiments.trial.control"),
    RuleCase("experiments: tiers exist",
             {**_SPLIT, "experiments.trial.tiers": ["free", "gold"]},
             {**_SPLIT, "experiments.trial.tiers": ["free", "premium"]}, "experiments.trial.tiers"),
    RuleCase("experiments: end after start",
             {**_SPLIT, "experiments.trial.start": "2026-12-02T00:00:00+00:00",
              "experiments.trial.end": "2026-12-02T01:00:00+02:00"},
             {**_SPLIT, "experiments.trial.start": "2026-12-02T00:00:00+00:00",
              "experiments.trial.end": "2026-12-03T00:00:00+00:00"}, "experiments.trial.end"),
]


@pytest.mark.usefixtures("isolated_settings_env")
@pytest.mark.parametrize("case", RULE_CASES, ids=[c.rule for c in RULE_CASES])
def test_each_experiment_rule_fails_and_passes(case: RuleCase) -> None:
    rule = next(r for r in RULES if r.name == case.rule)
    bad = load_layered(overrides=case.failing)
    problem = rule.check(bad.raw)
    assert problem is not None and problem.path == case.path and problem.fix
    assert problem in bad.report.errors and bad.settings is None
    good = load_layered(overrides=case.passing)
    assert rule.check(good.raw) is None
    assert good.report.ok, good.report.text()


@pytest.mark.usefixtures("isolated_settings_env")
def test_every_experiment_problem_is_reported_in_one_load() -> None:
    layered = load_layered(overrides={"experiments": {
        "a": {"variants": {SMALL: 80, "musicgen-mediun": 10}, "control": "musicgen-large",
              "tiers": ["gold"], "start": "2026-12-02T00:00:00+00:00",
              "end": "2026-12-01T00:00:00+00:00"},
        "b": {"variants": {SMALL: 0, MEDIUM: 60}, "control": SMALL,
              "start": "2026-12-02T00:00:00"},  # a zero percent and a naive time: pydantic's
    }})
    errors = {(p.path, p.rule.split(" (")[0]) for p in layered.report.errors}
    assert errors >= {
        ("experiments.a.variants", "the variants' percents must sum to 100, not 90"),
        ("experiments.a.variants", "a variant must be a known model preset"),
        ("experiments.a.control", "the control must be one of the experiment's variants"),
        ("experiments.a.tiers", "an experiment's tiers must be among quotas.tiers"),
        ("experiments.a.end", "must be after experiments.a.start"),
        ("experiments.b.variants.musicgen-small", "Input should be greater than 0"),
        ("experiments.b.start", "Input should have timezone info"),
    }, layered.report.text()
    preset = next(p for p in layered.report.errors if p.rule.startswith("a variant must"))
    assert "did you mean 'musicgen-medium'?" in preset.fix
    percents = next(p for p in layered.report.errors if p.rule.startswith("the variants'"))
    assert "also: experiments.b.variants" in percents.rule  # b sums to 60: named, not lost


@pytest.mark.usefixtures("isolated_settings_env")
def test_a_settings_file_with_toml_times_loads(isolated_settings_env: Path) -> None:
    (isolated_settings_env / "settings.local.toml").write_text(
        "[default.experiments.medium-trial]\n"
        'variants = { "musicgen-small" = 90, "musicgen-medium" = 10 }\n'
        'control = "musicgen-small"\ntiers = ["free"]\n'
        "start = 2026-12-01T00:00:00Z\nend = 2026-12-31T00:00:00+01:00\n")
    layered = load_layered()
    assert layered.settings is not None, layered.report.text()
    trial = layered.settings.experiments["medium-trial"]
    assert trial.variants == {SMALL: 90.0, MEDIUM: 10.0} and trial.tiers == ["free"]
    assert trial.end == datetime(2026, 12, 30, 23, 0, tzinfo=UTC)
    # Dumped as text (show, diff and export print dumps), which loads back as the same instant.
    lines = to_env(layered.settings)
    assert 'MUSICGEN_EXPERIMENTS__MEDIUM-TRIAL__END="2026-12-31T00:00:00+01:00"' in lines
    assert ExperimentSettings.model_validate(trial.model_dump()) == trial


# --- assignment -------------------------------------------------------------------------------

def test_the_bucket_is_sha256_of_experiment_and_user_the_same_in_every_process() -> None:
    digest = hashlib.sha256(b"trial:user-42").digest()
    assert bucket("trial", "user-42") == int.from_bytes(digest[:8], "big") / 2**64
    assert bucket("trial", "user-42") != bucket("other", "user-42")


def test_assignment_is_sticky_and_a_90_10_split_converges() -> None:
    settings = settings_with(trial=experiment())
    users = [UserContext(f"user-{i}", "free") for i in range(10_000)]
    first = [assign(settings, u, NOW) for u in users]
    again = [assign(settings, u, NOW + timedelta(hours=1)) for u in users]
    assert first == again  # the same user, the same variant
    medium = sum(1 for a in first if a is not None and a.variant == MEDIUM)
    assert 800 <= medium <= 1200, medium  # 10 % +- 2 %
    assert all(a is not None and a.experiment == "trial" and a.control == SMALL for a in first)


def test_variants_are_laid_out_in_name_order_over_the_cumulative_percents() -> None:
    trial = experiment(variants={MEDIUM: 10.0, SMALL: 90.0})  # file order does not matter
    assert pick_variant(trial, 0.0) == MEDIUM  # "musicgen-medium" < "musicgen-small"
    assert pick_variant(trial, 0.0999) == MEDIUM
    assert pick_variant(trial, 0.1001) == SMALL
    assert pick_variant(trial, 0.999999) == SMALL


def test_tiers_restrict_who_is_in_the_experiment() -> None:
    settings = settings_with(trial=experiment(tiers=["premium"]))
    assert assign(settings, UserContext("u", "free"), NOW) is None
    got = assign(settings, UserContext("u", "premium"), NOW)
    assert got is not None and got.experiment == "trial"


def test_the_time_window_includes_start_and_excludes_end() -> None:
    trial = experiment(start=NOW, end=NOW + timedelta(days=1))
    settings, user = settings_with(trial=trial), UserContext("u", "free")
    assert assign(settings, user, NOW - timedelta(seconds=1)) is None
    assert assign(settings, user, NOW) is not None
    assert assign(settings, user, NOW + timedelta(days=1) - timedelta(seconds=1)) is not None
    assert assign(settings, user, NOW + timedelta(days=1)) is None
    with pytest.raises(ValueError, match="aware"):
        assign(settings, user, NOW.replace(tzinfo=None))


def test_the_switch_and_the_first_active_experiment_by_name() -> None:
    user = UserContext("u", "free")
    only_b = {"a_off": experiment(enabled=False),
              "b_on": experiment(variants={MEDIUM: 100.0}, control=MEDIUM)}
    got = assign(settings_with(**only_b), user, NOW)
    assert got is not None and (got.experiment, got.variant) == ("b_on", MEDIUM)
    both = {**only_b, "a_off": experiment(variants={"musicgen-large": 100.0},
                                          control="musicgen-large")}
    got = assign(settings_with(**both), user, NOW)
    assert got is not None and got.experiment == "a_off"  # on again, and first by name
    assert assign(settings_with(trial=experiment(enabled=False)), user, NOW) is None


def test_resolve_assigns_only_requests_that_pin_no_model() -> None:
    settings = settings_with(trial=experiment(variants={MEDIUM: 100.0}, control=MEDIUM))
    user = UserContext("u", "free")
    free = resolve(GenerationRequest(prompt="x", duration=1.0, user_id="u"), settings,
                   job_id="j1", user=user)
    assert (free.model, free.experiment, free.variant) == (MEDIUM, "trial", MEDIUM)
    pinned = resolve(GenerationRequest(prompt="x", duration=1.0, user_id="u", model=SMALL),
                     settings, job_id="j2", user=user)
    assert (pinned.model, pinned.experiment, pinned.variant) == (SMALL, None, None)
    plain = resolve(GenerationRequest(prompt="x", duration=1.0), Settings(), job_id="j3")
    assert (plain.model, plain.experiment) == (Settings().model.preset, None)


def test_a_spec_records_the_variant_it_runs() -> None:
    spec = resolve(GenerationRequest(prompt="x", duration=1.0), Settings(), job_id="j")
    data = spec.model_dump()
    with pytest.raises(ValueError, match="together"):
        JobSpec.model_validate({**data, "experiment": "trial"})
    with pytest.raises(ValueError, match="is not the job's model"):
        JobSpec.model_validate({**data, "experiment": "trial", "variant": MEDIUM})
    with pytest.raises(ValueError, match="at most 64"):
        JobSpec.model_validate({**data, "experiment": "e" * 65, "variant": data["model"]})


def test_control_fallback_moves_only_a_non_control_variant_to_the_control() -> None:
    settings = settings_with(trial=experiment())
    on_medium = resolve(GenerationRequest(prompt="x", duration=1.0, user_id="m"), settings,
                        job_id="j1", user=user_on(settings, MEDIUM))
    moved = control_fallback(on_medium, settings)
    assert moved is not None
    assert (moved.model, moved.experiment, moved.variant) == (SMALL, "trial", SMALL)
    assert (moved.job_id, moved.seed, moved.prompt) == (on_medium.job_id, on_medium.seed, "x")
    assert control_fallback(moved, settings) is None  # already the control
    plain = resolve(GenerationRequest(prompt="x", duration=1.0), Settings(), job_id="j2")
    assert control_fallback(plain, settings) is None  # on no experiment
    assert control_fallback(on_medium, Settings()) is None  # the experiment is gone


def test_unserved_variants_name_experiment_variant_and_queue() -> None:
    settings = settings_with(trial=experiment(), old=experiment(end=NOW),
                             off=experiment(enabled=False))
    missing = unserved_variants(settings, {queue_for(SMALL)}, NOW)
    assert [(m.experiment, m.variant, m.queue) for m in missing] == [
        ("trial", MEDIUM, "musicgen.musicgen-medium")]  # ended and switched-off ones: no matter


@pytest.mark.usefixtures("new_keys_removed")
def test_settings_check_warns_for_variants_no_live_worker_serves(redis_url: str) -> None:
    settings = Settings.model_validate({"broker": {"url": redis_url},
                                        "experiments": {"trial": experiment().model_dump()}})
    # No worker listens on this Redis database: nobody answers, both variants are unserved.
    results = check_experiments(settings, timeout=0.3)
    assert [(r.name, r.status) for r in results] == [("experiments.trial", Status.warn)] * 2
    assert "variant musicgen-medium" in results[0].detail
    assert "musicgen.musicgen-medium" in results[0].detail
    assert check_experiments(Settings()) == []  # no experiments: no broadcast, no line


# --- the producer: a variant whose breaker is open falls back to the control -----------------

@pytest.fixture
def new_keys_removed(redis_url: str) -> Iterator[None]:
    """Deletes every key that appeared in the session's Redis database during the test: the
    queued messages (no worker serves these queues here), claims, states, breaker records and
    the bindings kombu and Celery's broadcasts declare. Keys that were there before stay."""
    client = redis.Redis.from_url(redis_url)
    before = set(client.scan_iter(count=1000))
    yield
    try:
        new = set(client.scan_iter(count=1000)) - before
        if new:
            client.delete(*new)
    finally:
        client.close()


@pytest.fixture
def producer(isolated_settings_env: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch,
             new_keys_removed: None) -> Iterator[pipeline.Producer]:
    monkeypatch.setenv("MUSICGEN_BROKER__URL", redis_url)
    monkeypatch.setenv("MUSICGEN_DATABASE__URL", f"sqlite:///{isolated_settings_env}/ledger.db")
    monkeypatch.setenv("MUSICGEN_QUOTAS__DEFAULT_TIER", "enterprise")
    settings = pipeline.load_settings(overrides={"experiments": {"trial": {
        "variants": {SMALL: 90, MEDIUM: 10}, "control": SMALL}}})
    prepare_database(settings)
    prod = pipeline.Producer(settings)
    yield prod
    prod.quota.close()
    prod.app.close()
    prod.app.redis.close()


def _open_breaker(prod: pipeline.Producer, preset: str) -> None:
    breaker = prod.policies.breaker(preset)
    assert breaker is not None
    for _ in range(breaker.threshold):
        breaker.record_failure()


def test_an_open_variant_breaker_falls_back_to_the_control(
        producer: pipeline.Producer, caplog: pytest.LogCaptureFixture) -> None:
    user = user_on(producer.settings, MEDIUM, tier="enterprise").user_id
    _open_breaker(producer, MEDIUM)
    job_id = f"exp-{uuid.uuid4().hex}"
    with caplog.at_level(logging.WARNING, logger="pipeline.client.producer"):
        handle = producer.enqueue(GenerationRequest(prompt="x", duration=1.0, user_id=user,
                                                    job_id=job_id))
    assert handle.status() is pipeline.JobStatus.queued  # accepted, not refused
    [row] = producer.quota.ledger(user_id=user)
    assert (row["job_id"], row["model"], row["experiment"], row["variant"]) == (
        job_id, SMALL, "trial", SMALL)
    assert any("variant musicgen-medium has its circuit breaker open" in r.getMessage()
               and "control musicgen-small" in r.getMessage() for r in caplog.records)
    queued = redis.Redis.from_url(producer.app.conf.broker_url, decode_responses=True)
    try:  # the message went to the control's queue, carrying the control as its variant
        [message] = [m for k in keys.queue_list_keys(queue_for(SMALL))
                     for m in queued.lrange(k, 0, -1) if job_id in m]
    finally:
        queued.close()
    # kombu's envelope holds Celery's body in base64: [args, kwargs, embed]; args[0] is the spec.
    args, _kwargs, _embed = json.loads(base64.b64decode(json.loads(message)["body"]))
    assert (args[0]["model"], args[0]["experiment"], args[0]["variant"]) == (SMALL, "trial", SMALL)


def test_an_open_control_breaker_still_refuses(producer: pipeline.Producer) -> None:
    user = user_on(producer.settings, MEDIUM, tier="enterprise").user_id
    _open_breaker(producer, MEDIUM)
    _open_breaker(producer, SMALL)
    with pytest.raises(ServiceUnavailable) as refused:
        producer.enqueue(GenerationRequest(prompt="x", duration=1.0, user_id=user))
    assert refused.value.details["breaker"] == SMALL  # the control's own breaker said no
    control_user = user_on(producer.settings, SMALL, tier="enterprise").user_id
    with pytest.raises(ServiceUnavailable):  # on the control already: no fallback to take
        producer.enqueue(GenerationRequest(prompt="x", duration=1.0, user_id=control_user))
    assert producer.quota.ledger() == []  # nothing was charged


# --- the ledger ---------------------------------------------------------------------------------

def test_the_ledger_records_experiment_and_variant(quota_store: QuotaStore) -> None:
    quota_store.reserve(job_id="in", user_id="alice", model=MEDIUM, requested_seconds=5.0,
                        experiment="trial", variant=MEDIUM)
    quota_store.reserve(job_id="out", user_id="alice", model=SMALL, requested_seconds=5.0)
    rows = {r["job_id"]: r for r in quota_store.ledger()}
    assert (rows["in"]["experiment"], rows["in"]["variant"]) == ("trial", MEDIUM)
    assert (rows["out"]["experiment"], rows["out"]["variant"]) == (None, None)
    with pytest.raises(InvalidRequest) as bad:
        quota_store.reserve(job_id="x", user_id="alice", model=SMALL, requested_seconds=5.0,
                            experiment="e" * 65, variant=SMALL)
    assert bad.value.field == "experiment"
    assert len(quota_store.ledger()) == 2


def test_0004_adds_the_columns_to_a_ledger_with_rows_and_goes_back(
        quota_empty_db_url: str) -> None:
    upgrade(quota_empty_db_url, "0003")
    engine = make_engine(quota_empty_db_url)
    try:
        before = {c["name"] for c in inspect(engine).get_columns("usage_ledger")}
        created = datetime(2026, 11, 21, 9, tzinfo=UTC)
        with engine.begin() as conn:
            conn.execute(insert(UsageLedger), [{
                "job_id": "old", "user_id": "alice", "model": SMALL, "requested_seconds": 8.0,
                "produced_seconds": 8.0, "gpu_seconds": 2.0, "status": "succeeded",
                "created_at": created, "finished_at": created + timedelta(seconds=3),
                "worker": "gpu-0", "attempts": 1, "batch_size": 2}])
        upgrade(quota_empty_db_url)  # through 0004 to whatever the head is now
        assert current(quota_empty_db_url) == HEAD
        store = QuotaStore(engine, tiers=DEFAULT_TIERS, default_tier="free")
        store.reserve(job_id="new", user_id="alice", model=MEDIUM, requested_seconds=8.0,
                      experiment="trial", variant=MEDIUM)
        rows = {r["job_id"]: r for r in store.ledger()}
        assert (rows["old"]["experiment"], rows["old"]["batch_size"]) == (None, 2)
        assert rows["new"]["variant"] == MEDIUM
        command.downgrade(alembic_config(quota_empty_db_url), "0003")
        assert current(quota_empty_db_url) == "0003"
        assert {c["name"] for c in inspect(engine).get_columns("usage_ledger")} == before
    finally:
        engine.dispose()


# --- stats --by variant ---------------------------------------------------------------------------

def _finish(store: QuotaStore, job_id: str, variant: str | None, status: str = "succeeded",
            experiment: str | None = "trial") -> None:
    store.reserve(job_id=job_id, user_id="alice", model=variant or SMALL, requested_seconds=4.0,
                  experiment=experiment if variant else None, variant=variant)
    store.mark_started(job_id, worker="w1@test", queue_wait_seconds=0.1)
    if status == "succeeded":
        store.mark_finished(job_id, status=status, produced_seconds=4.0, gpu_seconds=2.0)
    else:
        store.mark_finished(job_id, status=status, error_code="gpu_oom")


def test_stats_by_variant_compares_the_variants(quota_db_url: str, quota_store: QuotaStore,
                                                quota_clock: FakeClock,
                                                monkeypatch: pytest.MonkeyPatch,
                                                isolated_settings_env: Path) -> None:
    quota_clock.now = datetime.now(UTC) - timedelta(minutes=1)  # the command's window: real now
    for i in range(3):
        _finish(quota_store, f"s{i}", SMALL)
    _finish(quota_store, "m0", MEDIUM)
    _finish(quota_store, "m1", MEDIUM, status="failed")
    _finish(quota_store, "plain", None)  # no experiment: left out of this view
    _finish(quota_store, "other", MEDIUM, experiment="other")
    now = quota_clock()
    groups = compute_variant_stats(quota_store.ledger(), since=now - timedelta(hours=1),
                                   until=now + timedelta(minutes=1), experiment="trial")
    assert [(g.experiment, g.variant, g.stats.jobs) for g in groups] == [
        ("trial", MEDIUM, 2), ("trial", SMALL, 3)]
    monkeypatch.setenv("MUSICGEN_DATABASE__URL", quota_db_url)
    runner = CliRunner()
    out = runner.invoke(cli, ["stats", "--by", "variant", "--json"])
    assert out.exit_code == 0, out.output
    rows = {(r["experiment"], r["variant"]): r for r in json.loads(out.stdout)["by_variant"]}
    assert set(rows) == {("other", MEDIUM), ("trial", MEDIUM), ("trial", SMALL)}
    medium = rows[("trial", MEDIUM)]
    assert (medium["jobs"], medium["error_rate_percent"], medium["audio_per_gpu_second"]) == (
        2, 50.0, 2.0)
    assert medium["latency"]["p50"] is not None and medium["latency"]["count"] == 1
    text = runner.invoke(cli, ["stats", "--by", "variant", "--experiment", "trial"])
    assert text.exit_code == 0, text.output
    [line] = [x for x in text.stdout.splitlines() if x.split()[:2] == ["trial", MEDIUM]]
    assert line.split()[2:6] == ["2", "1", "1", "50.0%"]
    assert "other" not in text.stdout
    misuse = runner.invoke(cli, ["stats", "--experiment", "trial"])
    assert misuse.exit_code == 2 and "--by variant" in misuse.output
