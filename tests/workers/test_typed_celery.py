"""The typed wrappers behave like Celery's own decorators, and mypy sees through them."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery.utils.dispatch import Signal

from workers.typed_celery import receiver, task

REPO = Path(__file__).resolve().parents[2]


def _connect_closure(signal: Signal, seen: list[Any]) -> None:
    # A receiver defined inside a function, as setup_metrics and install_signals define theirs:
    # nothing holds it once this returns, so only a strong reference keeps it connected.
    @receiver(signal)
    def _got(sender: Any = None, **kwargs: Any) -> None:
        seen.append((sender, kwargs.get("value")))


def test_receiver_stays_connected_after_its_definer_returns() -> None:
    signal = Signal(name="test_typed_celery")
    seen: list[Any] = []
    _connect_closure(signal, seen)
    gc.collect()
    signal.send(sender="node-1", value=3)
    assert seen == [("node-1", 3)]


def test_receiver_returns_the_function_unchanged() -> None:
    signal = Signal(name="test_typed_celery_same")

    def handler(**_: Any) -> int:
        return 7

    assert receiver(signal)(handler) is handler
    assert signal.send(sender=None) == [(handler, 7)]


def test_task_registers_on_the_app_with_its_options() -> None:
    app = Celery("typed-celery-test", set_as_current=False)

    @task(app, name="typed.add", shared=False, acks_late=True)
    def add(x: int, y: int) -> int:
        return x + y

    registered = app.tasks["typed.add"]  # `add` is a proxy that resolves to this task
    assert registered.acks_late is True and add.name == "typed.add"
    assert add(2, 3) == 5  # Task.__call__ runs the body in this process


@pytest.mark.slow
def test_mypy_strict_keeps_the_decorated_signatures(tmp_path: Path) -> None:
    # Checked with the project's own [tool.mypy] (strict, pydantic plugin): no untyped-decorator,
    # and a wrong call to a connected receiver is still an error.
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import Any\n"
        "from celery import Celery\n"
        "from celery.signals import worker_ready\n"
        "from workers.typed_celery import receiver, task\n"
        "app = Celery('x')\n"
        "@receiver(worker_ready)\n"
        "def ready(sender: Any = None, **_: Any) -> None: ...\n"
        "@task(app, name='x.t')\n"
        "def t(n: int) -> int:\n"
        "    return n\n"
        "ready(sender=1, extra='ok')\n"
        "ready(1, 2)\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"),
         "--cache-dir", str(tmp_path / "cache"), str(sample)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, done.stdout + done.stderr
    assert "sample.py:12:" in errors[0] and "[call-arg]" in errors[0]
