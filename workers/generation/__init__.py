"""Generation: the one loop per worker process that runs the jobs' model calls.

``ticket`` is a job's place in a loop and how it is answered; ``scheduler`` the pure decisions
(which batch to form, which tickets to admit or release); ``loop`` the contract the job runner
depends on (``GenerationLoop``) and the loop thread's upkeep; ``hf_loop`` and ``engine_loop`` the
two loops that carry the decisions out (HF ``generate`` per batch, or the static engine step by
step); ``offline`` a list of items through an engine without a loop thread (self-check, tests,
benchmarks; it imports torch, so it is not re-exported here).
"""

from workers.generation.engine_loop import Engine, EngineFactory, EngineLoop
from workers.generation.hf_loop import BatchAbandoned, GenerateFn, HfLoop
from workers.generation.loop import BatchStats, GenerationLoop
from workers.generation.ticket import Ticket

__all__ = [  # noqa: RUF022 - grouped by use, as house style asks
    # the contract
    "GenerationLoop",
    "Ticket",
    "BatchStats",
    # the loops
    "HfLoop",
    "GenerateFn",
    "BatchAbandoned",
    "EngineLoop",
    "Engine",
    "EngineFactory",
]
