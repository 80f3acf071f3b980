"""Settings that change without a restart: reload, validate in full, apply all or nothing.

A running process keeps one ``LiveSettings``. ``reload()`` loads every layer again exactly as
the process did at start (same environment, files and overrides), and then either applies the
new ``Settings`` whole or refuses it whole:

* an invalid change is refused with the full report, and the running settings stay;
* a change to a key outside ``LIVE_KEYS`` (the broker, the database, the model preset, the
  device...) is refused with a message naming the keys that need a restart: a process cannot
  swap its broker connection or its loaded model under running jobs, and silently ignoring the
  edit would leave an operator believing it took effect;
* otherwise the new object replaces the old one, the listeners rebuild what they derived from it
  (the rate limiter, the breakers, the batcher's size), and the diff is logged as dotted keys with
  secrets masked.

Settings objects are frozen, so a job that started with the old object keeps a consistent view
of it to its end; the next job sees the new one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr

from pipeline.config.export import leaves
from pipeline.config.loader import load_layered
from pipeline.config.problem import MASK
from pipeline.config.schema import Settings
from pipeline.errors import SettingsError

log = logging.getLogger(__name__)

# What may change live, as dotted prefixes. Everything here is read per job or per admission
# (rate limit, breaker, quotas, backpressure, flags, experiments, the batcher's size and wait,
# time limits of jobs not yet started, monitoring thresholds), so a new value takes effect at
# the next job without touching a connection or a loaded model.
LIVE_KEYS: tuple[str, ...] = (
    "rate_limit.",
    "circuit_breaker.",
    "quotas.",
    "features.",
    "experiments.",
    "webhooks.",
    "generation.max_batch_size",
    "generation.batch_wait_ms",
    "worker.soft_time_limit",
    "worker.hard_time_limit",
    "worker.time_limit_per_second",
    "worker.time_limit_cap",
    "generation.window_stride",
    "monitoring.backlog_threshold",
    "monitoring.error_rate_threshold_percent",
    "monitoring.latency_threshold",
    "app.settings_poll_interval",
)

# Inside a live prefix, yet fixed for the life of a process: the broker is chosen at start.
NEEDS_RESTART: tuple[str, ...] = ("features.embedded_broker",)

# The Celery remote-control command every worker answers (``settings reload`` broadcasts it).
RELOAD_COMMAND = "reload_settings"

Outcome = Literal["applied", "unchanged", "invalid", "restart_required", "failed"]


def is_live(key: str) -> bool:
    if key in NEEDS_RESTART:
        return False
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in LIVE_KEYS)


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def text(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def _flat(settings: Settings) -> dict[str, Any]:
    """Dotted key -> comparable value; a secret compares by value but shows only as a mask."""
    out: dict[str, Any] = {}
    for key, value in leaves(settings.model_dump()):
        out[key] = ("secret", value.get_secret_value()) if isinstance(value, SecretStr) else value
    return out


def _shown(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "secret":
        return MASK if value[1] else None
    return value.value if hasattr(value, "value") and not isinstance(value, (list, dict)) else value


def diff(old: Settings, new: Settings) -> list[Change]:
    """Every dotted key whose value differs, secrets masked; keys only on one side included."""
    a, b = _flat(old), _flat(new)
    return [Change(k, _shown(a.get(k)), _shown(b.get(k)))
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


@dataclass(frozen=True)
class ReloadResult:
    outcome: Outcome
    message: str
    changes: tuple[Change, ...] = ()
    errors: tuple[str, ...] = ()

    @property
    def applied(self) -> bool:
        return self.outcome == "applied"

    def as_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "message": self.message,
                "changes": [{"key": c.key, "old": c.old, "new": c.new} for c in self.changes],
                "errors": list(self.errors)}


Listener = Callable[[Settings, Settings], None]


@dataclass
class LiveSettings:
    """The process's current settings, and how to load them again.

    ``env``, ``files``, ``overrides`` and ``cwd`` are the arguments the process loaded its
    settings with; a reload repeats them, so an edit to any layer file or environment variable
    the process was started with is seen (environment variables only change for a new process,
    so in practice: the files).
    """

    current: Settings
    env: str | None = None
    files: Sequence[str | Path] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)
    cwd: Path = field(default_factory=Path.cwd)
    on_result: Callable[[ReloadResult], None] | None = None
    _listeners: list[Listener] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def subscribe(self, listener: Listener) -> None:
        """``listener(old, new)`` runs after each applied change, in the reloading thread."""
        self._listeners.append(listener)

    def watched_files(self) -> list[Path]:
        """The layer files a reload reads: the same set as the current load."""
        try:
            layered = load_layered(self.env, files=self.files, overrides=self.overrides, cwd=self.cwd)
        except SettingsError:
            return []
        return [p for _, p in layered.files]

    def reload(self, reason: str = "requested") -> ReloadResult:
        with self._lock:  # two reloads at once (a file edit and a SIGHUP) apply in turn
            result = self._reload(reason)
        level = logging.INFO if result.outcome in ("applied", "unchanged") else logging.ERROR
        log.log(level, "settings reload (%s): %s", reason, result.message)
        if self.on_result is not None:
            try:
                self.on_result(result)
            except Exception:  # a metrics failure must not undo a reload
                log.exception("recording the settings reload failed")
        return result

    def _reload(self, reason: str) -> ReloadResult:
        try:
            layered = load_layered(self.env, files=self.files, overrides=self.overrides, cwd=self.cwd)
        except SettingsError as exc:  # a file gone or not TOML
            return ReloadResult("invalid", f"refused, the running settings stay: {exc.message}",
                                errors=(exc.message,))
        if layered.settings is None:
            report = layered.report.text()
            return ReloadResult("invalid", "refused, the running settings stay; the new settings "
                                f"are invalid:\n{report}", errors=tuple(report.splitlines()))
        changes = tuple(diff(self.current, layered.settings))
        if not changes:
            return ReloadResult("unchanged", "no change")
        frozen = [c.key for c in changes if not is_live(c.key)]
        if frozen:
            return ReloadResult("restart_required",
                                "refused, the running settings stay: a restart is needed to change "
                                f"{', '.join(frozen)} (nothing was applied)", changes=changes)
        old, new = self.current, layered.settings
        for listener in self._listeners:
            try:
                listener(old, new)
            except Exception as exc:
                # Put back what the listeners before this one changed: nothing half-applied.
                log.exception("applying the new settings failed; putting the old ones back")
                for undo in self._listeners:
                    try:
                        undo(new, old)
                    except Exception:
                        log.exception("restoring the old settings failed")
                return ReloadResult("failed", f"refused, applying failed: {type(exc).__name__}: {exc}",
                                    changes=changes)
        self.current = new
        return ReloadResult("applied", "applied: " + "; ".join(c.text() for c in changes),
                            changes=changes)


class FileWatcher:
    """Polls the layer files' modification stamps and reloads when one changes.

    Polling (every ``interval`` seconds) rather than inotify: the files may sit on a network
    mount or a Kubernetes ConfigMap (a symlink swap), where change events are not delivered, and
    a stat of a handful of files a second costs nothing.

    ``poke`` is an optional counter another process can raise to say "reload now" (a prefork
    worker's main process tells its pool processes so: a signal would end a pool process,
    billiard treats SIGHUP as a termination signal). It is read every ``TICK_S``, even while
    the file polling is off.
    """

    TICK_S = 0.5

    def __init__(self, live: LiveSettings, *,
                 interval: float | Callable[[], float] = 2.0,
                 poke: Callable[[], int] | None = None) -> None:
        """``interval`` may be a callable, read before each poll, so that the poll interval is
        itself a live setting; 0 pauses the file polling (a reload then takes SIGHUP or the
        command)."""
        self.live = live
        self._interval = interval if callable(interval) else (lambda: interval)
        self._poke = poke
        self._poked = poke() if poke is not None else 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Listed once (a full load), again after each reload: a poll is only a few stats.
        self._paths = live.watched_files()
        self._stamps = self._read()

    def _read(self) -> dict[Path, tuple[int, int] | None]:
        stamps: dict[Path, tuple[int, int] | None] = {}
        for path in self._paths:
            try:
                st = os.stat(path)
                stamps[path] = (st.st_mtime_ns, st.st_size)
            except OSError:
                stamps[path] = None
        return stamps

    def check(self) -> ReloadResult | None:
        """One poll: reload if a file changed since the last poll."""
        stamps = self._read()
        if stamps == self._stamps:
            return None
        return self._reload("a settings file changed")

    def check_poke(self) -> ReloadResult | None:
        """Reload if the ``poke`` counter moved since the last look."""
        if self._poke is None or self._poke() == self._poked:
            return None
        self._poked = self._poke()
        return self._reload("told by the worker's main process")

    def _reload(self, reason: str) -> ReloadResult:
        result = self.live.reload(reason)
        self._paths = self.live.watched_files() or self._paths
        self._stamps = self._read()
        return result

    def start(self) -> FileWatcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="settings-watcher", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        last_poll = time.monotonic()
        while True:
            interval = self._interval()
            if self._stop.wait(min(interval, self.TICK_S) if interval > 0 else self.TICK_S):
                return
            try:
                if self.check_poke() is None and interval > 0 \
                        and time.monotonic() - last_poll >= interval:
                    last_poll = time.monotonic()
                    self.check()
            except Exception:  # the watcher must outlive a bad poll
                log.exception("watching the settings files failed")
