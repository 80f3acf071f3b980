"""Cross-field and per-environment rules that one field's type cannot express.

They run on the merged raw tree (before or beside pydantic), so a bad port and a production
secret that is missing are reported in the same run. Each rule reads the values it needs
defensively: a value that is missing or of the wrong type is pydantic's to report, not ours.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from pipeline.config.presets import known_presets
from pipeline.config.problem import Problem, get
from pipeline.config.schema import QuotaSettings, WorkerSettings
from pipeline.contract.long_form import WINDOW_STRIDE_S
from pipeline.contract.time_limits import job_time_limits
from pipeline.infra.brokers import REDIS_SCHEMES, kind_of

Raw = Mapping[str, Any]

WEAK_SECRETS = {"password", "changeme", "secret", "admin", "flower", "redis", "123456", "musicgen"}
MIN_SECRET_LENGTH = 16


def _num(raw: Raw, dotted: str) -> float | None:
    value = get(raw, dotted)
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _secret(raw: Raw, dotted: str) -> str | None:
    value = get(raw, dotted)
    return None if value is None else str(value)


def _is_production(raw: Raw) -> bool:
    return bool(get(raw, "app.environment") == "production")


@dataclass(frozen=True)
class Rule:
    """A named check; ``check`` returns a Problem or None."""

    name: str
    check: Callable[[Raw], Problem | None]


def _greater(a: str, b: str, fix: str) -> Rule:
    def check(raw: Raw) -> Problem | None:
        va, vb = _num(raw, a), _num(raw, b)
        if va is None or vb is None or va > vb:
            return None
        return Problem(a, get(raw, a), f"{a} must be greater than {b} ({vb:g})", fix)
    return Rule(f"{a} > {b}", check)


def _not_less(a: str, b: str, fix: str) -> Rule:
    def check(raw: Raw) -> Problem | None:
        va, vb = _num(raw, a), _num(raw, b)
        if va is None or vb is None or va >= vb:
            return None
        return Problem(a, get(raw, a), f"{a} must be at least {b} ({vb:g})", fix)
    return Rule(f"{a} >= {b}", check)


def _strong_secret(path: str, what: str, *, required_when: Callable[[Raw], bool]) -> Rule:
    """A secret must be present where ``required_when`` says, and strong wherever production runs."""
    def check(raw: Raw) -> Problem | None:
        value = _secret(raw, path)
        if not value:
            if not required_when(raw):
                return None
            return Problem(path, None, f"{what} is required here",
                           f"set it in .secrets.toml or the MUSICGEN_{path.upper().replace('.', '__')} "
                           "environment variable", secret=True)
        if _is_production(raw) and (len(value) < MIN_SECRET_LENGTH or value.lower() in WEAK_SECRETS):
            return Problem(path, value, f"{what} must be a strong secret in production "
                           f"(at least {MIN_SECRET_LENGTH} characters, not a common word)",
                           "generate one: python -c 'import secrets; print(secrets.token_urlsafe(24))'",
                           secret=True)
        return None
    return Rule(f"{path}: present and strong", check)


def _production_debug_off(raw: Raw) -> Problem | None:
    if _is_production(raw) and get(raw, "app.debug") is True:
        return Problem("app.debug", True, "debug must be disabled in production", "set app.debug = false")
    return None


def _production_needs_broker(raw: Raw) -> Problem | None:
    if get(raw, "app.environment") in ("staging", "production") and not get(raw, "broker.url"):
        return Problem("broker.url", None, "staging and production need a Redis or RabbitMQ broker "
                       "(the embedded broker is for development only)",
                       "set broker.url = \"redis://host:6379/0\" or \"amqp://user@host:5672/vhost\"")
    return None


# --- which broker (pipeline/infra/brokers.py): some rules hold for one kind only ------------------

def _broker_kind(raw: Raw) -> str | None:
    """``redis``, ``sentinel`` or ``amqp`` for a URL we know, else None (embedded or unknown)."""
    url = get(raw, "broker.url")
    if not isinstance(url, str) or not url:
        return None
    try:
        kind = kind_of(url).value
    except ValueError:
        return None  # _broker_scheme_known reports it
    return kind


def _not_on_rabbitmq(rule: Rule) -> Rule:
    """``rule`` unless the broker is RabbitMQ, which has no visibility timeout: a dead
    consumer's messages come back when its connection goes, not after a timeout."""
    def check(raw: Raw) -> Problem | None:
        return None if _broker_kind(raw) == "amqp" else rule.check(raw)
    return Rule(rule.name, check)


def _broker_scheme_known(raw: Raw) -> Problem | None:
    url = get(raw, "broker.url")
    if not isinstance(url, str) or not url:
        return None
    try:
        kind_of(url)
    except ValueError as exc:
        return Problem("broker.url", url, str(exc), "redis://host:6379/0, sentinel://host:26379 "
                       "(with broker.master_name) or amqp://user@host:5672/vhost")
    return None


def _results_on_redis(raw: Raw) -> Problem | None:
    # With RabbitMQ the queues are the only thing on the broker: results, breakers, rate limits,
    # cancels and delivery counts need a Redis, and the result backend's is the one they use.
    if _broker_kind(raw) != "amqp":
        return None
    backend = get(raw, "broker.result_backend")
    fix = "set broker.result_backend = \"redis://host:6379/0\" (or sentinel://...)"
    if not backend:
        return Problem("broker.result_backend", None, "a RabbitMQ broker needs a Redis result "
                       "backend (results and the shared breaker, rate-limit and cancel state)", fix)
    if str(backend).split("://", 1)[0].lower() not in REDIS_SCHEMES:
        return Problem("broker.result_backend", backend, "with a RabbitMQ broker the result "
                       "backend must be a Redis (the shared breaker, rate-limit and cancel state "
                       "live there too)", fix)
    return None


def _replica_wait_on_redis(raw: Raw) -> Problem | None:
    wanted = get(raw, "broker.wait_replicas")
    if not wanted or _broker_kind(raw) in ("redis", "sentinel"):
        return None
    return Problem("broker.wait_replicas", wanted, "waiting for replicas is Redis's WAIT; "
                   "RabbitMQ confirms a publish itself (a quorum queue once a majority has it)",
                   "set broker.wait_replicas = 0, or use a redis:// or sentinel:// broker")


def _production_redis_secured(raw: Raw) -> Problem | None:
    url = get(raw, "broker.url")
    if not _is_production(raw) or not isinstance(url, str) or not url:
        return None
    parts = urlsplit(url.split(";")[0])
    if parts.scheme in ("rediss", "amqps") or parts.password or get(raw, "broker.password"):
        return None
    return Problem("broker.url", url, "a production broker needs a password or TLS",
                   "set broker.password (a secret) or use a rediss:// or amqps:// URL")


def _broker_url_has_no_password(raw: Raw) -> Problem | None:
    # A password inside the URL would be printed wherever the URL is; it belongs in broker.password
    # (broker.result_backend_password for the result backend).
    for path, secret in (("broker.url", "broker.password"),
                         ("broker.result_backend", "broker.result_backend_password")):
        url = get(raw, path)
        if isinstance(url, str) and any(urlsplit(c).password for c in url.split(";")):
            return Problem(path, url, f"{path} must not embed a password",
                           f"move it to {secret} (kept secret) and drop it from the URL", secret=True)
    return None


def _production_flower_auth(raw: Raw) -> Problem | None:
    if _is_production(raw) and not get(raw, "monitoring.flower_user"):
        return Problem("monitoring.flower_user", None, "Flower basic auth must be on in production",
                       "set monitoring.flower_user and monitoring.flower_password")
    return None


def _api_auth_outside_development(raw: Raw) -> Problem | None:
    # Every spelling pydantic reads as false counts: "false" from an env var must not slip by.
    value = get(raw, "api.auth")
    off = value is not None and str(value).strip().lower() in {"0", "off", "f", "false", "n", "no"}
    env = get(raw, "app.environment")
    if off and env in ("staging", "production"):
        return Problem("api.auth", value, f"the HTTP gateway must require API keys in {env} "
                       "(auth off is for development only)", "set api.auth = true and create keys "
                       "with `musicgen-pipeline keys create USER`")
    return None


def _default_tier_exists(raw: Raw) -> Problem | None:
    tiers, default = get(raw, "quotas.tiers"), get(raw, "quotas.default_tier")
    if isinstance(tiers, Mapping) and isinstance(default, str) and default not in tiers:
        return Problem("quotas.default_tier", default, "the default tier must be one of quotas.tiers",
                       f"use one of: {', '.join(sorted(tiers))}")
    return None


def _timezone_known(raw: Raw) -> Problem | None:
    tz = get(raw, "quotas.timezone")
    if not isinstance(tz, str):
        return None
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        return Problem("quotas.timezone", tz, "must be an IANA time zone", "use e.g. \"UTC\" or \"Europe/Paris\"")
    return None


def _threads_fill_a_batch(raw: Raw) -> Problem | None:
    # Each threads-pool slot holds one job: with fewer slots than a batch, no batch ever fills
    # and every one of them waits out generation.batch_wait_ms for company that cannot come.
    slots, batch = _num(raw, "worker.concurrency"), _num(raw, "generation.max_batch_size")
    if get(raw, "worker.pool") != "threads" or slots is None or batch is None or slots >= batch:
        return None
    return Problem("worker.concurrency", get(raw, "worker.concurrency"),
                   f"the threads pool needs at least generation.max_batch_size ({batch:g}) slots "
                   "to fill a batch",
                   "unset worker.concurrency (default: 2 x generation.max_batch_size) or raise it")


# --- experiments (pipeline/ops/experiments.py): one rule per kind of problem --------------------
# A rule yields one Problem, so each reports its first offending experiment (by name) and names
# the others in its text: all kinds of problem still show at once, whichever experiment has them.

def _experiments(raw: Raw) -> list[tuple[str, Mapping[str, Any]]]:
    found = get(raw, "experiments")
    if not isinstance(found, Mapping):
        return []
    return sorted((str(k), v) for k, v in found.items() if isinstance(v, Mapping))


def _variants(exp: Mapping[str, Any]) -> Mapping[str, Any] | None:
    variants = exp.get("variants")
    return variants if isinstance(variants, Mapping) and variants else None


def _first_of(found: list[Problem]) -> Problem | None:
    if not found:
        return None
    first = found[0]
    if len(found) == 1:
        return first
    others = ", ".join(p.path for p in found[1:])
    return Problem(first.path, first.value, f"{first.rule} (also: {others})", first.fix)


def _experiment_percents(raw: Raw) -> Problem | None:
    found = []
    for name, exp in _experiments(raw):
        variants = _variants(exp)
        if variants is None:
            continue
        try:
            total = sum(float(v) for v in variants.values() if not isinstance(v, bool))
        except (TypeError, ValueError):
            continue  # a value that is not a number is pydantic's to report
        if abs(total - 100.0) > 1e-6:
            found.append(Problem(f"experiments.{name}.variants", dict(variants),
                                 f"the variants' percents must sum to 100, not {total:g}",
                                 "adjust the percents so that they add up to 100"))
    return _first_of(found)


def _experiment_presets_known(raw: Raw) -> Problem | None:
    known = known_presets()
    found = []
    for name, exp in _experiments(raw):
        unknown = [str(v) for v in _variants(exp) or {} if v not in known]
        if not unknown:
            continue
        hints = []
        for variant in unknown:
            close = difflib.get_close_matches(variant[:64], known, n=1)
            hints.append(f"'{variant}': did you mean '{close[0]}'?" if close else f"'{variant}'")
        found.append(Problem(f"experiments.{name}.variants", unknown,
                             "a variant must be a known model preset",
                             f"{'; '.join(hints)} (known presets: {', '.join(known)})"))
    return _first_of(found)


def _experiment_control(raw: Raw) -> Problem | None:
    found = []
    for name, exp in _experiments(raw):
        variants, control = _variants(exp), exp.get("control")
        if variants is not None and isinstance(control, str) and control not in variants:
            found.append(Problem(f"experiments.{name}.control", control,
                                 "the control must be one of the experiment's variants",
                                 f"use one of: {', '.join(map(str, variants))}"))
    return _first_of(found)


def _experiment_tiers(raw: Raw) -> Problem | None:
    tiers = get(raw, "quotas.tiers")
    if not isinstance(tiers, Mapping):
        tiers = QuotaSettings().tiers
    found = []
    for name, exp in _experiments(raw):
        wanted = exp.get("tiers")
        if not isinstance(wanted, list):
            continue
        unknown = [t for t in wanted if isinstance(t, str) and t not in tiers]
        if unknown:
            found.append(Problem(f"experiments.{name}.tiers", unknown,
                                 "an experiment's tiers must be among quotas.tiers",
                                 f"use some of: {', '.join(sorted(tiers))}"))
    return _first_of(found)


def _aware(value: Any) -> datetime | None:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime) or value.utcoffset() is None:
        return None  # not a time, or a naive one: pydantic reports it
    return value


def _experiment_window(raw: Raw) -> Problem | None:
    found = []
    for name, exp in _experiments(raw):
        start, end = _aware(exp.get("start")), _aware(exp.get("end"))
        if start is not None and end is not None and end <= start:
            found.append(Problem(f"experiments.{name}.end", end.isoformat(),
                                 f"must be after experiments.{name}.start ({start.isoformat()})",
                                 "set end later than start, or unset it"))
    return _first_of(found)


def _flag_tiers_exist(raw: Raw) -> Problem | None:
    # A misspelt tier in a flag rule matches nobody: the flag would be silently off for the tier
    # it was meant for. Flags are checked in name order; the first one with a bad tier is named.
    tiers = get(raw, "quotas.tiers")
    if not isinstance(tiers, Mapping):
        tiers = QuotaSettings().tiers
    features = get(raw, "features")
    for name, rule in sorted(features.items() if isinstance(features, Mapping) else []):
        wanted = rule.get("tiers") if isinstance(rule, Mapping) else None
        if not isinstance(wanted, list):
            continue  # no tiers, or not a list: pydantic's to report
        unknown = [t for t in wanted if isinstance(t, str) and t not in tiers]
        if not unknown:
            continue
        hints = []
        for tier in unknown:
            close = difflib.get_close_matches(tier, list(tiers), n=1)
            hints.append(f"'{tier}': did you mean '{close[0]}'?" if close else f"'{tier}'")
        return Problem(f"features.{name}.tiers", unknown, "a flag's tiers must be among quotas.tiers",
                       f"{'; '.join(hints)} (tiers: {', '.join(sorted(tiers))})")
    return None

# --- storage and webhooks (pipeline/infra/storage_backends.py, pipeline/webhooks.py) ---------------

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")  # S3's bucket naming rules


def _storage_url(raw: Raw) -> Problem | None:
    url = get(raw, "storage.url")
    if url is None or url == "":
        return None
    fix = ("use file:///absolute/shared/folder or s3://bucket/prefix, or unset it for "
           "storage.output_dir")
    parts = urlsplit(str(url))
    if parts.scheme == "s3":
        if not _BUCKET.match(parts.netloc):
            return Problem("storage.url", url, "an s3:// URL must name a bucket "
                           "(3-63 lower-case letters, digits, dots, hyphens)", fix)
        return None
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            return Problem("storage.url", url, "a file:// URL must name an absolute folder on "
                           "this machine (file:///path)", fix)
        return None
    return Problem("storage.url", url, "storage.url must be a file:// or s3:// URL", fix)


def _storage_keys_in_pairs(raw: Raw) -> Problem | None:
    # A secret without its key id would silently fall back to boto3's own credential chain.
    if get(raw, "storage.secret_access_key") and not get(raw, "storage.access_key_id"):
        return Problem("storage.access_key_id", None, "storage.secret_access_key is set without "
                       "its storage.access_key_id", "set both, or neither (boto3's own chain: "
                       "environment, instance role)")
    return None


def _stride_inside_window(raw: Raw) -> Problem | None:
    # Each next window is prompted with window - stride seconds: a stride at or past the
    # window leaves no prompt (or a gap) and the clip would not continue.
    stride, window = _num(raw, "generation.window_stride"), _num(raw, "model.max_duration")
    if stride is None or window is None or 0 < stride < window:
        return None
    return Problem("generation.window_stride", get(raw, "generation.window_stride"),
                   f"generation.window_stride must be above 0 and below the model's window "
                   f"(model.max_duration, {window:g} s)",
                   f"use audiocraft's {WINDOW_STRIDE_S:g} s, or any value under the window (a "
                   "shorter stride is a longer prompt and more windows)")


def _visibility_covers_long_jobs(raw: Raw) -> Problem | None:
    # The hard limit of the longest job allowed (pipeline/contract/time_limits.py) on the raw tree.
    names = ("broker.visibility_timeout", "worker.soft_time_limit", "worker.hard_time_limit",
             "worker.time_limit_per_second", "worker.time_limit_cap", "generation.max_duration")
    values = [_num(raw, name) for name in names]
    if any(v is None for v in values):
        return None
    visibility, soft, hard, per_second, cap, longest = (float(v or 0) for v in values)
    # The raw values, unvalidated (pydantic reports a bad one), so model_construct.
    limits: dict[str, Any] = {"soft_time_limit": soft, "hard_time_limit": hard,
                              "time_limit_per_second": per_second, "time_limit_cap": cap}
    worker = WorkerSettings.model_construct(**limits)
    longest_hard = job_time_limits(worker, longest).hard
    if visibility > longest_hard:
        return None
    return Problem("broker.visibility_timeout", get(raw, "broker.visibility_timeout"),
                   f"broker.visibility_timeout must exceed the hard limit of the longest job "
                   f"({longest_hard:g} s for generation.max_duration, pipeline/contract/time_limits.py)",
                   "raise broker.visibility_timeout, or lower worker.time_limit_per_second or "
                   "worker.time_limit_cap")


def _recovery_before_visibility(raw: Raw) -> Problem | None:
    # workers/recovery.py: a dead worker's jobs come back after its beats stop for
    # heartbeat_interval x missed_beats, plus up to one scan_interval. Past the visibility
    # timeout the broker has redelivered them already and the heartbeat buys nothing; half of
    # it at most for the silence leaves a margin for the scan and a slow Redis.
    url = get(raw, "broker.url")
    if get(raw, "recovery.enabled") is False or not isinstance(url, str) \
            or url.split("://", 1)[0].lower() not in REDIS_SCHEMES:
        return None
    values = [_num(raw, name) for name in ("broker.visibility_timeout",
                                           "recovery.heartbeat_interval",
                                           "recovery.missed_beats", "recovery.scan_interval")]
    if any(v is None for v in values):
        return None
    visibility, interval, missed, scan = (float(v or 0) for v in values)
    if interval * missed <= visibility / 2 and interval * missed + scan < visibility:
        return None
    return Problem("recovery.heartbeat_interval", get(raw, "recovery.heartbeat_interval"),
                   f"recovery.heartbeat_interval x recovery.missed_beats ({interval * missed:g} s) "
                   f"must be at most half of broker.visibility_timeout ({visibility:g} s), and "
                   f"with recovery.scan_interval ({scan:g} s) below it: the broker would "
                   "redeliver a dead worker's jobs before the heartbeat recovery did",
                   "lower recovery.heartbeat_interval, missed_beats or scan_interval")


RULES: tuple[Rule, ...] = (
    _greater("generation.max_duration", "generation.default_duration",
             "raise generation.max_duration or lower generation.default_duration"),
    _not_less("generation.default_duration", "generation.min_duration",
              "raise generation.default_duration to at least generation.min_duration"),
    _greater("worker.hard_time_limit", "worker.soft_time_limit",
             "the hard limit kills the process: set it above the soft limit"),
    _not_on_rabbitmq(_greater("broker.visibility_timeout", "worker.hard_time_limit",
                       "a job redelivered while still running would run twice: raise "
                       "broker.visibility_timeout")),
    _not_on_rabbitmq(Rule("long jobs: visibility covers the scaled hard limit", _visibility_covers_long_jobs)),
    Rule("long form: stride inside the window", _stride_inside_window),
    Rule("recovery: dead workers found before the visibility timeout", _recovery_before_visibility),
    _greater("worker.max_memory_percent", "worker.cleanup_threshold_percent",
             "set worker.cleanup_threshold_percent below worker.max_memory_percent"),
    _greater("validation.melody_max_duration", "validation.melody_min_duration",
             "raise validation.melody_max_duration"),
    _greater("worker.retry_backoff_max", "worker.retry_backoff", "raise worker.retry_backoff_max"),
    Rule("production: debug off", _production_debug_off),
    Rule("staging/production: Redis broker", _production_needs_broker),
    Rule("broker: a scheme we support", _broker_scheme_known),
    Rule("RabbitMQ: results (and shared state) on Redis", _results_on_redis),
    Rule("broker: replica wait on Redis only", _replica_wait_on_redis),
    Rule("production: Redis password or TLS", _production_redis_secured),
    Rule("broker URL without password", _broker_url_has_no_password),
    Rule("production: Flower auth", _production_flower_auth),
    Rule("staging/production: API auth", _api_auth_outside_development),
    _strong_secret("monitoring.flower_password", "the Flower password",
                   required_when=lambda raw: bool(get(raw, "monitoring.flower_user"))),
    _strong_secret("broker.password", "the broker password", required_when=lambda raw: False),
    _strong_secret("broker.result_backend_password", "the result backend password",
                   required_when=lambda raw: False),
    _strong_secret("database.password", "the database password", required_when=lambda raw: False),
    Rule("quotas: default tier exists", _default_tier_exists),
    Rule("quotas: time zone", _timezone_known),
    Rule("threads pool: slots for a batch", _threads_fill_a_batch),
    Rule("features: flag tiers exist", _flag_tiers_exist),
    Rule("experiments: percents sum to 100", _experiment_percents),
    Rule("experiments: variants are known presets", _experiment_presets_known),
    Rule("experiments: control is a variant", _experiment_control),
    Rule("experiments: tiers exist", _experiment_tiers),
    Rule("experiments: end after start", _experiment_window),
    Rule("storage: url is a folder or a bucket", _storage_url),
    Rule("storage: s3 keys in pairs", _storage_keys_in_pairs),
    _strong_secret("storage.secret_access_key", "the object storage secret key",
                   required_when=lambda raw: bool(get(raw, "storage.access_key_id"))),
    # Unsigned events would let anyone who learns a receiver's URL forge job results.
    _strong_secret("webhooks.secret", "the webhook signing secret",
                   required_when=lambda raw: bool(get(raw, "webhooks.allowed_hosts")
                                                   or get(raw, "webhooks.public_hosts") is True)),
)


def check_rules(raw: Raw) -> list[Problem]:
    """Run every rule and return every problem found (never stops at the first)."""
    return [p for rule in RULES if (p := rule.check(raw)) is not None]
