"""Per-user feature flags (pipeline/contract/flags.py): rollout, stickiness, independence, the decision
order, the settings errors, and the two readers in resolve() (issue 14)."""

from __future__ import annotations

import typing
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from pydantic import ValidationError

from pipeline.client.resolve import resolve
from pipeline.config import load_layered, load_settings
from pipeline.config.schema import FeatureSettings, Settings
from pipeline.contract.flags import FLAGS, FlagRule, bucket, decide, enabled
from pipeline.contract.jobs import GenerationRequest
from pipeline.contract.user_context import UserContext
from pipeline.errors import InvalidRequest, SettingsError, UnsupportedOption

USERS = [UserContext(f"user-{i}", "free") for i in range(10_000)]


def share(features: FeatureSettings, name: str, users: list[UserContext] = USERS) -> float:
    return sum(enabled(features, name, u) for u in users) / len(users)


# --- rollout ----------------------------------------------------------------------------------

def test_a_25_percent_rollout_reaches_25_percent_of_10000_users() -> None:
    features = FeatureSettings(priority_boost=FlagRule(percentage=25))
    assert 0.23 <= share(features, "priority_boost") <= 0.27


def test_a_user_stays_on_the_same_side() -> None:
    features = FeatureSettings(priority_boost=FlagRule(percentage=50))
    first = [enabled(features, "priority_boost", u) for u in USERS[:2000]]
    assert [enabled(features, "priority_boost", u) for u in USERS[:2000]] == first
    # A fresh settings object (another process, a reload) puts everyone on the same side.
    fresh = FeatureSettings.model_validate(features.model_dump())
    assert fresh is not features
    assert [enabled(fresh, "priority_boost", u) for u in USERS[:2000]] == first
    # Not salted per process (unlike hash()): the bucket is a fixed function of flag and user.
    assert round(bucket("priority_boost", "a"), 1) == 58.7


def test_two_flags_at_50_percent_pick_independent_halves() -> None:
    features = FeatureSettings(melody_conditioning=FlagRule(percentage=50),
                               priority_boost=FlagRule(percentage=50))
    both = sum(enabled(features, "melody_conditioning", u) and enabled(features, "priority_boost", u)
               for u in USERS) / len(USERS)
    assert 0.48 <= share(features, "melody_conditioning") <= 0.52
    assert 0.48 <= share(features, "priority_boost") <= 0.52
    assert 0.23 <= both <= 0.27  # the same hash for both flags would give ~0.50


def test_a_raised_percentage_keeps_everyone_who_had_the_flag() -> None:
    low = FeatureSettings(priority_boost=FlagRule(percentage=10))
    high = FeatureSettings(priority_boost=FlagRule(percentage=30))
    had = {u for u in USERS if enabled(low, "priority_boost", u)}
    assert had and all(enabled(high, "priority_boost", u) for u in had)


# --- the decision order -----------------------------------------------------------------------

def test_tiers_limit_the_flag_and_say_why() -> None:
    features = FeatureSettings(priority_boost=FlagRule(tiers=["premium", "enterprise"]))
    assert decide(features, "priority_boost", UserContext("u1", "premium")).enabled
    off = decide(features, "priority_boost", UserContext("u1", "free"))
    assert not off.enabled and off.reason == "tier free not in [premium, enterprise]"
    assert not enabled(features, "priority_boost", UserContext("u1", "free"))


def test_allow_beats_percentage() -> None:
    features = FeatureSettings(priority_boost=FlagRule(percentage=0, allow=["vip"]))
    vip = decide(features, "priority_boost", UserContext("vip", "free"))
    assert vip.enabled and vip.reason == "user in allow list"
    assert share(features, "priority_boost", USERS[:1000]) == 0.0


def test_allow_beats_tiers_and_deny_beats_allow() -> None:
    features = FeatureSettings(priority_boost=FlagRule(tiers=["enterprise"], allow=["vip", "both"],
                                                       deny=["both", "banned"]))
    assert enabled(features, "priority_boost", UserContext("vip", "free"))
    for user in ("both", "banned"):
        decision = decide(features, "priority_boost", UserContext(user, "enterprise"))
        assert not decision.enabled and decision.reason == "user in deny list"


def test_the_kill_switch_beats_everything() -> None:
    features = FeatureSettings(priority_boost=FlagRule(enabled=False, allow=["vip"]))
    decision = decide(features, "priority_boost", UserContext("vip", "enterprise"))
    assert not decision.enabled and "switched off" in decision.reason
    assert share(features, "priority_boost", USERS[:1000]) == 0.0


def test_the_bucket_reason_names_both_sides() -> None:
    features = FeatureSettings(priority_boost=FlagRule(percentage=25))
    on = next(u for u in USERS if bucket("priority_boost", u.user_id) < 25)
    off = next(u for u in USERS if bucket("priority_boost", u.user_id) >= 25)
    assert decide(features, "priority_boost", on).reason.endswith("< 25 %")
    assert decide(features, "priority_boost", off).reason.endswith(">= 25 %")


def test_decide_and_the_fast_check_agree() -> None:
    features = FeatureSettings(priority_boost=FlagRule(
        percentage=40, tiers=["free", "premium"], allow=["user-1", "user-2"], deny=["user-3"]))
    users = [UserContext(u.user_id, tier) for u in USERS[:3000]
             for tier in ("free", "enterprise")]
    assert all(decide(features, "priority_boost", u).enabled == enabled(features, "priority_boost", u)
               for u in users)


@pytest.mark.parametrize("value", [True, False])
def test_a_bool_flag_is_the_same_for_every_user(value: bool) -> None:
    features = FeatureSettings(priority_boost=value)
    assert share(features, "priority_boost", USERS[:1000]) == float(value)
    decision = decide(features, "priority_boost", UserContext("anyone", "free"))
    assert decision.enabled is value and "every user" in decision.reason


def test_a_new_settings_object_is_decided_by_its_own_rule() -> None:
    # Checks are compiled per settings object: a reloaded one must never reuse another's rule.
    user = UserContext("user-1", "free")
    for _ in range(3):
        assert not enabled(FeatureSettings(priority_boost=FlagRule(percentage=0)), "priority_boost", user)
        assert enabled(FeatureSettings(priority_boost=FlagRule(percentage=100)), "priority_boost", user)


# --- names and settings errors ----------------------------------------------------------------

def test_an_unknown_flag_name_is_an_error_with_a_hint() -> None:
    features = FeatureSettings()
    with pytest.raises(SettingsError) as raised:
        enabled(features, "priority_bost", UserContext("u", "free"))
    assert "did you mean 'priority_boost'?" in raised.value.message
    assert raised.value.field == "features.priority_bost"
    with pytest.raises(SettingsError):  # a deployment switch is not a per-user flag
        decide(features, "embedded_broker", UserContext("u", "free"))


def test_the_registry_is_the_schemas_per_user_flags() -> None:
    per_user = {name for name, info in FeatureSettings.model_fields.items()
                if FlagRule in typing.get_args(info.annotation)}
    assert set(FLAGS) == per_user == {"melody_conditioning", "priority_boost", "webhooks",
                                      "long_form", "streaming_generation"}
    assert all(info.description and info.reader for info in FLAGS.values())


def test_unknown_keys_in_features_get_a_did_you_mean(isolated_settings_env: Path) -> None:
    layered = load_layered("development", overrides={"features.melody_conditionng": True,
                                                     "features.priority_boost": {"percentag": 5}})
    found = {p.path: p for p in layered.report.errors}
    assert found["features.melody_conditionng"].fix == "did you mean 'melody_conditioning'?"
    assert found["features.priority_boost.percentag"].fix == "did you mean 'percentage'?"
    assert layered.settings is None


def test_a_bad_rule_value_is_reported_at_its_own_path(isolated_settings_env: Path) -> None:
    layered = load_layered("development", overrides={"features.priority_boost": {"percentage": 150},
                                                     "features.melody_conditioning": "maybe"})
    found = {p.path: p for p in layered.report.errors}
    assert set(found) == {"features.priority_boost.percentage", "features.melody_conditioning"}
    assert found["features.priority_boost.percentage"].fix == "use a value between 0.0 and 100.0"
    assert "rule table" in found["features.melody_conditioning"].rule


def test_a_tier_in_a_rule_must_be_a_quota_tier(isolated_settings_env: Path) -> None:
    bad = load_layered("development", overrides={"features.priority_boost": {"tiers": ["premum"]}})
    [problem] = [p for p in bad.report.errors if p.path == "features.priority_boost.tiers"]
    assert problem.value == ["premum"] and "did you mean 'premium'?" in problem.fix
    assert bad.settings is None
    good = load_layered("development", overrides={"features.priority_boost": {"tiers": ["premium"]}})
    assert good.report.ok, good.report.text()


def test_a_rule_can_come_from_an_environment_variable(isolated_settings_env: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSICGEN_FEATURES__PRIORITY_BOOST", '{percentage = 25, deny = ["u9"]}')
    settings = load_settings("development")
    assert settings.features.priority_boost == FlagRule(percentage=25, deny=["u9"])


def test_a_rule_refuses_unknown_keys_in_code_too() -> None:
    with pytest.raises(ValidationError):
        FlagRule.model_validate({"percent": 5})


# --- the readers in resolve() -----------------------------------------------------------------

def _settings(tmp_path: Path, **features: object) -> Settings:
    overrides = {"model.preset": "tiny-melody", **{f"features.{k}": v for k, v in features.items()}}
    return load_settings("development", cwd=tmp_path, overrides=overrides)


@pytest.fixture
def melody(tmp_path: Path) -> Path:
    """Two seconds of a 440 Hz tone: long enough, and at a rate the melody limits accept."""
    rate = 32000
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(2 * rate) / rate)
    path = tmp_path / "melody.wav"
    sf.write(path, tone.astype(np.float32), rate, subtype="PCM_16")
    return path


def _melody_request(user: str, melody: Path) -> GenerationRequest:
    return GenerationRequest(prompt="hum along", duration=1.0, melody=melody, user_id=user)


def test_melody_is_refused_outside_the_rollout_and_accepted_inside(tmp_path: Path,
                                                                   melody: Path) -> None:
    settings = _settings(tmp_path, melody_conditioning={"percentage": 50})
    inside = next(u.user_id for u in USERS if bucket("melody_conditioning", u.user_id) < 50)
    outside = next(u.user_id for u in USERS if bucket("melody_conditioning", u.user_id) >= 50)
    spec = resolve(_melody_request(inside, melody), settings, job_id="j1",
                   user=UserContext(inside, "free"))
    assert spec.melody is not None and spec.melody.path == str(melody.resolve())
    with pytest.raises(UnsupportedOption) as refused:
        resolve(_melody_request(outside, melody), settings, job_id="j2",
                user=UserContext(outside, "free"))
    assert refused.value.field == "melody"
    assert refused.value.message == "melody conditioning is switched off for this user"


def test_melody_switched_off_for_everyone_says_so(tmp_path: Path, melody: Path) -> None:
    for value in (False, {"enabled": False}):
        settings = _settings(tmp_path, melody_conditioning=value)
        with pytest.raises(UnsupportedOption) as refused:
            resolve(_melody_request("user-1", melody), settings, job_id="j1")
        assert refused.value.message == "melody conditioning is switched off in this deployment"


def test_priority_boost_raises_a_premium_users_job_one_level(tmp_path: Path) -> None:
    settings = _settings(tmp_path, priority_boost={"tiers": ["premium", "enterprise"]})

    def priority(tier: str, asked: int) -> int:
        request = GenerationRequest(prompt="pads", duration=1.0, user_id="u1", priority=asked)
        return resolve(request, settings, job_id="j1", user=UserContext("u1", tier)).priority

    assert priority("premium", 5) == 6
    assert priority("free", 5) == 5
    assert priority("premium", 9) == 9  # capped at the top...
    with pytest.raises(InvalidRequest):  # ...which is the contract's own top
        GenerationRequest(prompt="pads", priority=10)
    # Without a user context resolve() decides for the default tier (free): no boost.
    assert resolve(GenerationRequest(prompt="pads", duration=1.0, user_id="u1"), settings,
                   job_id="j1").priority == 5
