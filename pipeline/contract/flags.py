"""Per-user feature flags: ``features.<name>`` is a boolean or a rollout rule.

A rule (:class:`FlagRule`) is decided for one user in a fixed order: switched off -> off; user in
``deny`` -> off; user in ``allow`` -> on; tier not in ``tiers`` -> off; else on iff the user's
bucket is below ``percentage``. The bucket is a stable hash of ``"<flag>:<user_id>"`` in
``[0, 100)``: the same user lands on the same side in every process and on every load (Python's
``hash()`` is salted per process; blake2b is not), and the flag's name in the key makes two flags
independent of each other.

A check sits on the request path, so it must stay far below 10 µs (``benchmarks/flags.py``): the
rules of a ``FeatureSettings`` are compiled once into frozensets and plain numbers, and kept for
as long as that (frozen) settings object lives.

Adding a flag: a ``bool | FlagRule`` field in ``FeatureSettings`` (config/schema.py) and one line
in :data:`FLAGS` naming its reader; a flag nobody reads is not added.
"""

from __future__ import annotations

import difflib
import hashlib
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.config.flag_value import FlagRule, FlagValue
from pipeline.config.schema import FeatureSettings
from pipeline.contract.user_context import UserContext
from pipeline.errors import SettingsError

__all__ = ["FLAGS", "Decision", "FlagInfo", "FlagRule", "FlagValue", "bucket", "decide", "enabled",
           "summary"]


@dataclass(frozen=True)
class FlagInfo:
    """What a flag switches, and the code that reads it (so `flags list` can say both)."""

    description: str
    reader: str


# The per-user flags: each has a field in FeatureSettings and a reader. features.embedded_broker
# is a deployment switch (no user to decide for) and stays out.
FLAGS: Mapping[str, FlagInfo] = {
    "melody_conditioning": FlagInfo("requests may carry a melody (melody presets only)",
                                    "pipeline/client/resolve.py _melody"),
    "priority_boost": FlagInfo("the user's jobs are queued one priority level higher",
                               "pipeline/client/resolve.py _spec"),
    "webhooks": FlagInfo("requests may carry a webhook_url (webhooks.allowed_hosts still apply)",
                         "pipeline/client/resolve.py _webhook"),
    "long_form": FlagInfo("durations past the model's window (windowed continuation)",
                          "pipeline/client/resolve.py resolve"),
    "streaming_generation": FlagInfo("requests may ask for stream=True (chunks as they generate)",
                                     "pipeline/client/resolve.py _stream"),
}


@dataclass(frozen=True)
class Decision:
    """A flag's value for one user, and why (``flags check`` prints both)."""

    enabled: bool
    reason: str


def bucket(name: str, user_id: str) -> float:
    """Where ``user_id`` falls in ``[0, 100)`` for flag ``name``: the same in every process."""
    digest = hashlib.blake2b(f"{name}:{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") * 100.0 / 2**64


class _Rule:
    """A FlagRule compiled for checks: sets and numbers, nothing parsed per call."""

    __slots__ = ("allow", "deny", "name", "on", "percentage", "rule", "tiers")

    def __init__(self, name: str, rule: FlagRule) -> None:
        self.name, self.rule = name, rule
        self.on, self.percentage = rule.enabled, rule.percentage
        self.allow, self.deny = frozenset(rule.allow), frozenset(rule.deny)
        self.tiers = None if rule.tiers is None else frozenset(rule.tiers)

    def __call__(self, user: UserContext) -> bool:
        if not self.on or user.user_id in self.deny:
            return False
        if user.user_id in self.allow:
            return True
        if self.tiers is not None and user.tier not in self.tiers:
            return False
        # The edges skip the hash: 100 % is everyone, 0 % nobody.
        return self.percentage >= 100.0 or (
            self.percentage > 0.0 and bucket(self.name, user.user_id) < self.percentage)

    def decide(self, user: UserContext) -> Decision:
        if not self.on:
            return Decision(False, "switched off (enabled = false)")
        if user.user_id in self.deny:
            return Decision(False, "user in deny list")
        if user.user_id in self.allow:
            return Decision(True, "user in allow list")
        if self.tiers is not None and user.tier not in self.tiers:
            return Decision(False, f"tier {user.tier} not in [{', '.join(self.rule.tiers or [])}]")
        point = bucket(self.name, user.user_id)
        on = self(user)  # the same test as the fast path, so the two can never disagree
        return Decision(on, f"bucket {point:.1f} {'<' if on else '>='} {self.percentage:g} %")


class _Constant:
    __slots__ = ("value",)

    def __init__(self, value: bool) -> None:
        self.value = value

    def __call__(self, user: UserContext) -> bool:
        return self.value

    def decide(self, user: UserContext) -> Decision:
        return Decision(self.value, f"set to {str(self.value).lower()} for every user")


# id(features) -> (a weak reference to it, its compiled flags). The reference tells a live entry
# from one whose object died and whose id was reused; its callback drops the entry with the object.
_COMPILED: dict[int, tuple[weakref.ref[FeatureSettings], dict[str, _Rule | _Constant]]] = {}


def _compiled(features: FeatureSettings) -> dict[str, _Rule | _Constant]:
    entry = _COMPILED.get(id(features))
    if entry is not None and entry[0]() is features:
        return entry[1]
    flags: dict[str, _Rule | _Constant] = {}
    for name in FLAGS:
        value = getattr(features, name)
        flags[name] = _Rule(name, value) if isinstance(value, FlagRule) else _Constant(bool(value))
    key = id(features)
    _COMPILED[key] = (weakref.ref(features, lambda _: _COMPILED.pop(key, None)), flags)
    return flags


def _unknown(name: str) -> SettingsError:
    close = difflib.get_close_matches(name, list(FLAGS), n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"known flags: {', '.join(FLAGS)}"
    return SettingsError(f"no per-user flag named {name!r}; {hint}", field=f"features.{name}",
                         details={"known_flags": list(FLAGS)})


def enabled(features: FeatureSettings, name: str, user: UserContext) -> bool:
    """Is flag ``name`` on for ``user``? The fast check readers call on every request.

    An unknown name is a ``SettingsError`` with a did-you-mean (a typo must not read as "off").
    """
    try:
        check = _compiled(features)[name]
    except KeyError:
        raise _unknown(name) from None
    return check(user)


def decide(features: FeatureSettings, name: str, user: UserContext) -> Decision:
    """Flag ``name`` for ``user`` with the reason (deny list, tier, bucket...), for people."""
    try:
        check = _compiled(features)[name]
    except KeyError:
        raise _unknown(name) from None
    return check.decide(user)


def summary(value: bool | FlagRule) -> str:
    """One line for ``flags list``: ``true``, or the rule's parts that narrow it."""
    if isinstance(value, bool):
        return str(value).lower()
    if not value.enabled:
        return "off (enabled = false)"
    parts = [f"{value.percentage:g} %"]
    if value.tiers is not None:
        parts.append(f"tiers [{', '.join(value.tiers)}]")
    if value.allow:
        parts.append(f"allow {len(value.allow)}")
    if value.deny:
        parts.append(f"deny {len(value.deny)}")
    return ", ".join(parts)
