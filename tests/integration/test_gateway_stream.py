"""The page's "stream" box for real (issue 25): this module's worker and gateway run the static
engine with streaming on (test_streaming.py's ``STREAMING``); a job held after its first chunks
plays in its card from the signed stream URL, and the player ends on the finished file."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By

from .conftest import Worker, WorkerFactory, held, release, wait_for
from .test_gateway import Api, api, browser, card, generate, open_page, until
from .test_streaming import STREAMING

pytestmark = [pytest.mark.integration, pytest.mark.slow]
__all__ = ["api", "browser"]  # fixtures this module's tests use, defined in test_gateway


@pytest.fixture(scope="module")
def shared_worker(workdir: Path, redis_url: str,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """The module's worker, streaming (the ``api`` fixture gives its gateway the same settings,
    so that the gateway accepts ``stream: true``); threads, as test_streaming.py runs it."""
    factory = WorkerFactory(workdir, redis_url, tmp_path_factory.mktemp("worker"))
    yield factory.start(pool="threads", faults=True, **STREAMING)
    factory.stop_all()


# The card's player as the test reads it: where it plays from and what it has.
PLAYER = """const p = document.querySelector('li.job[data-id="' + arguments[0] + '"] .player');
return {src: p.currentSrc || p.src, buffered: p.buffered.length, ready: p.readyState,
        playing: p.closest('li').dataset.playing || '', duration: p.duration || 0,
        network: p.networkState, error: p.error && p.error.code, mp3: p.canPlayType('audio/mpeg'),
        paused: p.paused, time: p.currentTime};"""


def test_the_page_plays_a_stream_while_the_job_generates(
        api: Api, shared_worker: Worker, browser: webdriver.Chrome) -> None:
    faults = Path(shared_worker.env["FAULTS_DIR"])
    hold = f"gw-page-stream-{uuid.uuid4().hex[:6]}"
    # A long clip held late (8 s of it made): headless Chromium reported nothing buffered from
    # the ~2 s that a 3 s clip held after 120 steps had published (readyState 0, still loading).
    open_page(browser, api.base, api.alice, duration="10")
    browser.find_element(By.ID, "stream").click()
    job = generate(browser, f"FAULT:hold-after={hold}:400 a streamed piece")
    assert browser.execute_script("return window.sentRequests")[-1]["stream"] is True

    def player() -> dict[str, Any]:
        found: dict[str, Any] = browser.execute_script(PLAYER, job)
        return found

    wait_for(lambda: held(faults, hold), 120, "the job to be held after its first chunks")
    try:
        until(browser, "the stream to play",
              lambda: player()["buffered"] > 0 or player()["ready"] >= 2, 60)
    except TimeoutException:
        heard = 0
        with httpx.stream("GET", player()["src"], timeout=10) as stream:
            try:
                for block in stream.iter_bytes():
                    heard += len(block)
            except httpx.ReadTimeout:
                pass
        pytest.fail(f"the stream did not play: {player()}; the URL gives {heard} bytes")
    live = player()
    assert "/stream?token=" in live["src"] and live["playing"] == "stream", live
    with httpx.Client(base_url=api.base, headers=api.alice, timeout=30) as client:
        status = client.get(f"/v1/jobs/{job}").json()["status"]
    assert status in ("started", "progress"), status  # still generating: heard before the end
    assert held(faults, hold)
    release(faults, hold)

    until(browser, "the finished file in the player", lambda: player()["playing"] == "file"
          and player()["duration"] > 0, 120)
    done = player()
    assert f"/v1/jobs/{job}/audio?token=" in done["src"], done
    assert card(browser, job)["status"] == "succeeded"
    assert 9.5 < done["duration"] < 10.5, done
    assert browser.find_element(By.ID, "error").text == ""
