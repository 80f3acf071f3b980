"""Model experiments (A/B): which preset runs a request that pins no model.

``experiments.<name>`` in the settings splits such requests over presets by percent. At enqueue,
``resolve()`` asks :func:`assign` for the request's user: the first experiment by name that is
switched on, inside its time window and open to the user's tier decides, and the user lands
on a variant by a stable hash of ``"<experiment>:<user_id>"``, so the same user always gets the
same variant in every process (``hash()`` is salted per process; SHA-256 is not). The job and
its ledger row record the experiment and the variant, which ``stats --by variant`` compares.

A variant whose circuit breaker is open is no reason to fail a request that the control can
serve: the producer re-targets the job with :func:`control_fallback`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from pydantic import ValidationError

from pipeline.config.presets import model_settings_for
from pipeline.config.schema import ExperimentSettings, Settings
from pipeline.contract.jobs import JobSpec, queue_for
from pipeline.contract.user_context import UserContext
from pipeline.errors import PipelineError

__all__ = ["Assignment", "UnservedVariant", "assign", "bucket", "control_fallback", "is_active",
           "pick_variant", "unserved_variants"]

_SPAN = float(2**64)  # the hash's first 8 bytes as an integer, scaled into [0, 1)


@dataclass(frozen=True)
class Assignment:
    """The experiment a request fell into and its variant (a model preset)."""

    experiment: str
    variant: str
    control: str

    @property
    def is_control(self) -> bool:
        return self.variant == self.control


def is_active(experiment: ExperimentSettings, tier: str, now: datetime) -> bool:
    """Switched on, ``start <= now < end`` (each bound optional) and open to ``tier``."""
    if not experiment.enabled:
        return False
    if experiment.start is not None and now < experiment.start:
        return False
    if experiment.end is not None and now >= experiment.end:
        return False
    return experiment.tiers is None or tier in experiment.tiers


def bucket(experiment: str, user_id: str) -> float:
    """Where ``user_id`` falls in ``[0, 1)`` for ``experiment``: the same in every process.

    The experiment's name is part of the key, so a user's side in one experiment says nothing
    about their side in another.
    """
    digest = hashlib.sha256(f"{experiment}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SPAN


def pick_variant(experiment: ExperimentSettings, point: float) -> str:
    """The variant whose slice of the cumulative percents holds ``point`` (in ``[0, 1)``).

    Variants are laid out in name order, not in the order of the settings files (merged layers
    may list them differently in different processes). Percents are scaled by their total, so a
    split built in code without the settings rules (which demand 100) still covers every user.
    """
    ordered = sorted(experiment.variants.items())
    target = point * sum(percent for _, percent in ordered)
    cumulative = 0.0
    for name, percent in ordered:
        cumulative += percent
        if target < cumulative:
            return name
    return ordered[-1][0]  # float rounding at the very top of the range


def assign(settings: Settings, user: UserContext, now: datetime) -> Assignment | None:
    """The variant ``user`` gets, from the first active experiment by name; None when no
    experiment applies. Call it only for a request that pins no model (``resolve()`` does)."""
    if now.utcoffset() is None:
        raise ValueError("now must be an aware datetime (experiments' windows are aware)")
    for name in sorted(settings.experiments):
        experiment = settings.experiments[name]
        if is_active(experiment, user.tier, now):
            return Assignment(name, pick_variant(experiment, bucket(name, user.user_id)),
                              experiment.control)
    return None


def control_fallback(spec: JobSpec, settings: Settings) -> JobSpec | None:
    """``spec`` re-targeted at its experiment's control, recorded as ``variant=control``; None
    when the job is on no experiment, already on the control, or the control cannot take it.

    The control is checked the way ``resolve()`` checks a preset (its window, melody support)
    and the new spec is validated again, so a fallback never queues what a worker would refuse.
    """
    if spec.experiment is None or spec.variant is None:
        return None
    experiment = settings.experiments.get(spec.experiment)
    if experiment is None or spec.variant == experiment.control:
        return None
    try:
        control = model_settings_for(settings, experiment.control)
    except PipelineError:
        return None
    if spec.duration > control.max_duration or (spec.melody is not None and not control.melody):
        return None
    try:
        return JobSpec.model_validate({**spec.model_dump(), "model": experiment.control,
                                       "variant": experiment.control})
    except ValidationError:
        return None


@dataclass(frozen=True)
class UnservedVariant:
    """A variant of a running or coming experiment whose queue no live worker consumes."""

    experiment: str
    variant: str
    queue: str


def unserved_variants(settings: Settings, served_queues: Collection[str],
                      now: datetime) -> list[UnservedVariant]:
    """Each variant of a switched-on experiment that has not ended whose queue is not among
    ``served_queues`` (what the live workers consume): its jobs would wait for nobody."""
    out = []
    for name in sorted(settings.experiments):
        experiment = settings.experiments[name]
        if not experiment.enabled or (experiment.end is not None and now >= experiment.end):
            continue
        for variant in sorted(experiment.variants):
            if queue_for(variant) not in served_queues:
                out.append(UnservedVariant(name, variant, queue_for(variant)))
    return out
