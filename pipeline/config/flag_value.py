"""The value of a per-user flag in the settings: a boolean or a rollout rule (:class:`FlagRule`).

The schema's ``FeatureSettings`` is typed with :data:`FlagValue`; how a rule is decided for a
user is pipeline/contract/flags.py, which reads those settings. Kept apart so that the schema does not
import the flags that import the schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError


class FlagRule(BaseModel):
    """A flag rolled out to part of the users: ``[features.<name>]`` as a table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="the kill switch: false turns the flag off for everyone")
    percentage: float = Field(100.0, ge=0.0, le=100.0, allow_inf_nan=False,
                              description="share of users (sticky per user) who get the flag")
    tiers: list[str] | None = Field(None, description="quota tiers that may get it; unset = every tier")
    allow: list[str] = Field(default_factory=list, description="user ids who always get it "
                                                               "(unless denied)")
    deny: list[str] = Field(default_factory=list, description="user ids who never get it")


_BOOL = TypeAdapter(bool)


def _flag_value(value: Any, handler: Any) -> bool | FlagRule:
    # Decided here rather than by pydantic's union: a union reports an error once per member
    # under the member's name (``features.x.FlagRule.percentage`` beside ``features.x.bool``),
    # where a table's mistake belongs at ``features.x.percentage`` with the rule's did-you-mean.
    if isinstance(value, Mapping | FlagRule):
        return FlagRule.model_validate(value)
    try:
        return _BOOL.validate_python(value)
    except ValidationError:
        raise PydanticCustomError(
            "flag_type", "a flag is true, false or a rule table (enabled, percentage, tiers, "
                         "allow, deny)") from None


FlagValue = Annotated[bool | FlagRule, WrapValidator(_flag_value)]
