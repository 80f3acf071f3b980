"""Live settings: a reload is validated in full and applied whole, or refused whole."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.config import load_settings
from pipeline.config.live import FileWatcher, LiveSettings, diff, is_live
from pipeline.config.schema import Settings


def _write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    # A second edit in the same clock tick must still look changed to the watcher.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


@pytest.fixture
def layer(isolated_settings_env: Path) -> Path:
    path = isolated_settings_env / "live.toml"
    _write(path, '[default.rate_limit]\nrate = "20/minute"\n')
    return path


def _live(layer: Path) -> tuple[LiveSettings, list[tuple[Settings, Settings]]]:
    live = LiveSettings(current=load_settings(files=[layer]), files=[layer])
    seen: list[tuple[Settings, Settings]] = []
    live.subscribe(lambda old, new: seen.append((old, new)))
    return live, seen


def test_a_live_change_is_applied_and_reported_as_a_diff(layer: Path) -> None:
    live, seen = _live(layer)
    before = live.current
    _write(layer, '[default.rate_limit]\nrate = "3 per 10 seconds"\n'
                  '[default.circuit_breaker]\nthreshold = 9\n')
    result = live.reload("test")
    assert result.outcome == "applied", result.message
    assert {c.key: (c.old, c.new) for c in result.changes} == {
        "rate_limit.rate": ("20/minute", "3 per 10 seconds"),
        "circuit_breaker.threshold": (5, 9)}
    assert live.current.rate_limit.rate == "3 per 10 seconds"
    assert seen == [(before, live.current)]
    assert "rate_limit.rate: '20/minute' -> '3 per 10 seconds'" in result.message


def test_an_unchanged_reload_calls_no_listener(layer: Path) -> None:
    live, seen = _live(layer)
    assert live.reload().outcome == "unchanged"
    assert seen == []


def test_an_invalid_edit_is_refused_with_the_report_and_nothing_changes(layer: Path) -> None:
    live, seen = _live(layer)
    before = live.current
    _write(layer, '[default.rate_limit]\nrate = "lots"\n[default.circuit_breaker]\nthreshold = 9\n')
    result = live.reload()
    assert result.outcome == "invalid"
    assert "rate_limit.rate" in result.message and "the running settings stay" in result.message
    assert live.current is before and seen == []


def test_a_file_that_is_not_toml_is_refused(layer: Path) -> None:
    live, _ = _live(layer)
    _write(layer, "[default.rate_limit\n")
    result = live.reload()
    assert result.outcome == "invalid" and "not valid TOML" in result.message


def test_a_key_that_needs_a_restart_refuses_the_whole_change(layer: Path) -> None:
    live, seen = _live(layer)
    before = live.current
    _write(layer, '[default.rate_limit]\nrate = "1/second"\n'
                  '[default.model]\npreset = "musicgen-medium"\n')
    result = live.reload()
    assert result.outcome == "restart_required"
    needs_restart = result.message.split("a restart is needed to change ", 1)[1]
    assert "model.preset" in needs_restart and "rate_limit.rate" not in needs_restart
    assert live.current is before and seen == []


def test_a_failing_listener_puts_the_old_settings_back_everywhere(layer: Path) -> None:
    live = LiveSettings(current=load_settings(files=[layer]), files=[layer])
    applied: list[str] = []
    live.subscribe(lambda old, new: applied.append(new.rate_limit.rate))

    def broken(old: Settings, new: Settings) -> None:
        if new.rate_limit.rate != "20/minute":
            raise RuntimeError("cannot rebuild")

    live.subscribe(broken)
    _write(layer, '[default.rate_limit]\nrate = "1/second"\n')
    result = live.reload()
    assert result.outcome == "failed" and "cannot rebuild" in result.message
    assert applied == ["1/second", "20/minute"]  # applied, then undone
    assert live.current.rate_limit.rate == "20/minute"


def test_secrets_are_compared_but_never_shown(isolated_settings_env: Path) -> None:
    a = load_settings(overrides={"broker": {"password": "first-Pw-0123456789"}})
    b = load_settings(overrides={"broker": {"password": "second-Pw-0123456789"}})
    changes = diff(a, b)
    assert [c.key for c in changes] == ["broker.password"]
    assert "first-Pw" not in repr(changes) and "second-Pw" not in repr(changes)


def test_what_may_change_live_is_explicit() -> None:
    for key in ("rate_limit.rate", "circuit_breaker.reset_timeout", "quotas.tiers.free.daily",
                "features.melody_conditioning", "generation.max_batch_size",
                "worker.soft_time_limit", "monitoring.backlog_threshold"):
        assert is_live(key), key
    for key in ("broker.url", "database.url", "model.preset", "model.device",
                "features.embedded_broker", "generation.max_duration_extra", "worker.pool"):
        assert not is_live(key), key


def test_the_watcher_reloads_on_an_edit_and_only_then(layer: Path) -> None:
    live, seen = _live(layer)
    watcher = FileWatcher(live, interval=0)
    assert watcher.check() is None  # nothing changed since it started
    _write(layer, '[default.rate_limit]\nrate = "2/second"\n')
    result = watcher.check()
    assert result is not None and result.applied
    assert watcher.check() is None  # the edit is seen once
    assert [new.rate_limit.rate for _, new in seen] == ["2/second"]
