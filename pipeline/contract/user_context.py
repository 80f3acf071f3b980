"""Who a request is for, as the deployment's rules see it: the user and their quota tier.

Flags and experiments decide per user; the producer builds one ``UserContext`` per request
(the tier is read from the quota tables, the default tier for a user who has no row yet) and
passes it to everything that decides, so a decision never queries the database again.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class UserContext:
    user_id: str
    tier: str
