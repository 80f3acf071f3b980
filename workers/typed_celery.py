"""Celery's decorators, with the decorated function's signature kept for mypy.

Celery ships no type information, so ``@signal.connect`` and ``@app.task`` are untyped and
``mypy --strict`` reports every function they decorate (``untyped-decorator``): the function
would become ``Any`` and calls to it would go unchecked. Going through these two wrappers keeps
the check without a blanket ignore; they add no behaviour of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, Protocol, TypeVar

__all__ = ["receiver", "task"]

P = ParamSpec("P")
R = TypeVar("R")


class Signal(Protocol):
    """What a receiver needs of a Celery signal (``celery.utils.dispatch.Signal``)."""

    def connect(self, *args: Any, **kwargs: Any) -> Any: ...


def receiver(
    signal: Signal, *, weak: bool = False, **options: Any
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Connect the decorated function to ``signal`` and return it unchanged.

    ``weak`` is False by default, unlike Celery's: our receivers are closures over an app's
    settings, and a weak reference would let them be collected (silently never called) as
    soon as the function that defined them returns. ``options`` go to ``signal.connect``
    (``sender``, ``dispatch_uid``).
    """

    def connect(fn: Callable[P, R]) -> Callable[P, R]:
        signal.connect(fn, weak=weak, **options)
        return fn

    return connect


def task(app: Any, **options: Any) -> Callable[[Callable[P, R]], Any]:
    """``@app.task(**options)``: registers the function as a task on ``app``.

    The function body is checked against its own annotations; the Task object that comes back
    is Celery's, which has no types (hence ``Any``).
    """

    def register(fn: Callable[P, R]) -> Any:
        return app.task(**options)(fn)

    return register
