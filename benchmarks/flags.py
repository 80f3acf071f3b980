"""What one feature-flag check costs, beside a plain dict lookup (target: under 10 µs).

    .venv/bin/python benchmarks/flags.py [--iterations 200000] [--repeats 5] [--smoke]

Four cases, each called in the same loop over the same pre-built users (so the loop's own cost
is in every row, and the dict row is the floor):

- dict: ``flags[name]`` on a plain dict of booleans (what a check cost before rules);
- bool flag: ``pipeline.contract.flags.enabled`` on a flag set to ``true``;
- percentage: a rule at 25 % (one blake2b of "flag:user" per check);
- tiers+allow+deny: a rule at 50 % for two tiers with 100-id allow and deny lists, for users on
  an allowed tier and in neither list, so every check goes the whole way to the hash.

ns per check is the median over --repeats timed loops of --iterations checks; "on" is the share
of checks that said yes (a sanity check: ~25 % for the 25 % rule).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

from pipeline.config.schema import FeatureSettings
from pipeline.contract.flags import FlagRule, enabled
from pipeline.contract.user_context import UserContext

TARGET_NS = 10_000.0
USERS = 1024


def _time(check: Callable[[UserContext], bool], users: list[UserContext], iterations: int,
          repeats: int) -> tuple[float, float]:
    """(median ns per check, share of checks that were on)."""
    rounds = max(1, iterations // len(users))
    times, on = [], 0
    for _ in range(repeats):
        on = 0
        start = time.perf_counter_ns()
        for _ in range(rounds):
            for user in users:
                if check(user):
                    on += 1
        times.append((time.perf_counter_ns() - start) / (rounds * len(users)))
    return statistics.median(times), on / (rounds * len(users))


def cases() -> dict[str, Callable[[UserContext], bool]]:
    """The four checks, each a callable of one user."""
    plain = {"melody_conditioning": True, "priority_boost": False}
    boolean = FeatureSettings(melody_conditioning=True)
    percentage = FeatureSettings(priority_boost=FlagRule(percentage=25.0))
    targeted = FeatureSettings(priority_boost=FlagRule(
        percentage=50.0, tiers=["premium", "enterprise"],
        allow=[f"vip-{i}" for i in range(100)], deny=[f"banned-{i}" for i in range(100)]))
    return {
        "dict": lambda user: plain["melody_conditioning"],
        "bool flag": lambda user: enabled(boolean, "melody_conditioning", user),
        "percentage": lambda user: enabled(percentage, "priority_boost", user),
        "tiers+allow+deny": lambda user: enabled(targeted, "priority_boost", user),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200_000, help="checks per timed loop")
    parser.add_argument("--repeats", type=int, default=5, help="timed loops per case")
    parser.add_argument("--smoke", action="store_true", help="one check, one loop (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.iterations, args.repeats = 1, 1
    if args.iterations < 1 or args.repeats < 1:
        sys.exit("--iterations and --repeats must be at least 1")

    users = [UserContext(f"user-{i}", "premium") for i in range(USERS)]
    results = {name: _time(check, users, args.iterations, args.repeats)
               for name, check in cases().items()}
    floor = results["dict"][0]

    print(f"python {sys.version.split()[0]}; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; {USERS} users, median of {args.repeats} x "
          f"{max(1, args.iterations // USERS) * USERS} checks")
    print()
    print(f"{'case':<18}{'ns/check':>10}{'x dict':>9}{'on':>8}")
    for name, (ns, share) in results.items():
        print(f"{name:<18}{ns:>10.0f}{ns / floor:>9.1f}{share:>8.1%}")
    worst = max(ns for name, (ns, _) in results.items() if name != "dict")
    verdict = "OK" if worst < TARGET_NS else "OVER BUDGET"
    print(f"\nslowest flag check {worst:.0f} ns vs target {TARGET_NS / 1000:.0f} µs: {verdict}")


if __name__ == "__main__":
    main()
