"""The HTTP gateway for real: the Procfile's `api` line on a free port, keys made by the
`keys create` command, real Redis and the module's shared worker with the tiny model. A job
over HTTP end to end (SSE to its final state, the audio with Range), another key's view,
a cancel, and the web page in headless Chromium (Selenium, as test_flower_browser.py does):
enqueue from the page, watch its progress bar move, play the result.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from .conftest import Worker, base_env, held, release, sse_events, wait_for
from .test_flower_browser import ARTIFACTS, CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS
from .test_procfile import Proc, Procfile, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass
class Api:
    """The running gateway: its base URL, the Procfile line, and two users' headers."""

    base: str
    proc: Proc
    alice: dict[str, str]
    bob: dict[str, str]


def _key(workdir: Path, env: dict[str, str], user: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "keys", "create", user, "--json"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    key: str = json.loads(done.stdout)["key"]
    return key


@pytest.fixture(scope="module")
def api(shared_worker: Worker, workdir: Path, redis_url: str,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    # The worker's own settings (same Redis, database and storage), the gateway on a free port.
    env = base_env(workdir, redis_url, MUSICGEN_API__PORT=str(free_port()),
                   MUSICGEN_API__RATE="600/minute")
    keys = {user: _key(workdir, env, user) for user in ("alice", "bob")}
    procfile = Procfile(workdir, tmp_path_factory.mktemp("api"))
    proc = procfile.start("api", env)
    base = f"http://127.0.0.1:{env['MUSICGEN_API__PORT']}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    proc.wait_for("ready on /readyz", up, timeout=60)
    yield Api(base, proc, *({"Authorization": f"Bearer {keys[u]}"} for u in ("alice", "bob")))
    log = proc.terminate()
    for key in keys.values():  # the access log names keys by their prefix only
        assert key.split("_", 2)[2] not in log  # the secret (which may hold "_")
    procfile.stop_all()


def test_a_job_over_http_from_enqueue_to_its_audio(api: Api, shared_worker: Worker) -> None:
    faults = Path(shared_worker.env["FAULTS_DIR"])
    with httpx.Client(base_url=api.base, timeout=httpx.Timeout(60)) as client:
        made = client.post("/v1/jobs", headers=api.alice, json={
            "prompt": "soft synth pads FAULT:hold-progress=gw-sse", "duration": 1.0,
            "model": "tiny", "format": "wav", "seed": 3})
        assert made.status_code == 202, made.text
        job_id = made.json()["id"]

        seen: list[tuple[str, Any]] = []
        with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=api.alice) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            for event, data in sse_events(stream.iter_lines()):
                seen.append((event, data))
                if event == "progress" and data["progress"]["fraction"] > 0:
                    assert held(faults, "gw-sse")  # the job waits at its first step...
                    release(faults, "gw-sse")      # ...which the stream reported: let it go on
        fractions = [d["progress"]["fraction"] for e, d in seen if e == "progress"]
        assert any(0 < f < 1 for f in fractions), seen
        assert fractions == sorted(fractions)
        last_event, final = seen[-1]
        assert last_event == "state" and final["status"] == "succeeded", seen
        assert final["result"]["seed"] == 3 and final["audio_url"] == f"/v1/jobs/{job_id}/audio"

        audio = client.get(final["audio_url"], headers=api.alice)
        assert audio.status_code == 200 and audio.headers["content-type"] == "audio/wav"
        assert audio.content[:4] == b"RIFF" and audio.content[8:12] == b"WAVE"
        head = client.get(final["audio_url"], headers={**api.alice, "Range": "bytes=0-43"})
        assert head.status_code == 206 and head.content == audio.content[:44]
        assert head.headers["content-range"] == f"bytes 0-43/{len(audio.content)}"

        # Another key: the job does not exist for it. No key: not even a lookup.
        for path in (f"/v1/jobs/{job_id}", final["audio_url"]):
            other = client.get(path, headers=api.bob)
            assert other.status_code == 404 and other.json()["code"] == "job_not_found"
        assert client.get(f"/v1/jobs/{job_id}").json()["code"] == "unauthorized"


def test_a_queued_job_is_cancelled_over_http(api: Api) -> None:
    with httpx.Client(base_url=api.base, timeout=30) as client:
        # No worker serves this preset's queue here: the job stays queued until cancelled.
        made = client.post("/v1/jobs", headers=api.alice,
                           json={"prompt": "never played", "model": "musicgen-small"})
        assert made.status_code == 202, made.text
        job_id = made.json()["id"]
        assert client.delete(f"/v1/jobs/{job_id}", headers=api.bob).status_code == 404
        cancelled = client.delete(f"/v1/jobs/{job_id}", headers=api.alice).json()
        assert cancelled == {"id": job_id, "cancelled": True, "status": "cancelled"}
        events = client.get(f"/v1/jobs/{job_id}/events", headers=api.alice).text
        assert events.startswith("retry: 2000\n\nid: final\nevent: state\n") and '"status": "cancelled"' in events


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options,
                              service=Service(CHROMEDRIVER,
                                              log_output=str(tmp_path / "chromedriver.log")))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_the_page_enqueues_shows_progress_and_plays_the_result(
        api: Api, shared_worker: Worker, browser: webdriver.Chrome) -> None:
    faults = Path(shared_worker.env["FAULTS_DIR"])
    browser.get(f"{api.base}/")
    WebDriverWait(browser, 30).until(
        lambda d: len(Select(d.find_element(By.ID, "model")).options) > 1, "models not loaded")
    browser.find_element(By.ID, "api-key").send_keys(api.alice["Authorization"].split()[1])
    browser.find_element(By.ID, "prompt").send_keys("page test FAULT:hold-progress=gw-page")
    duration = browser.find_element(By.ID, "duration")
    duration.clear()
    duration.send_keys("1")
    Select(browser.find_element(By.ID, "model")).select_by_value("tiny")
    Select(browser.find_element(By.ID, "format")).select_by_value("wav")
    browser.find_element(By.ID, "generate").click()

    # The progress bar moves while the job is held at its first step.
    wait_for(lambda: held(faults, "gw-page"), 60, "the page's job to reach its first step")
    bar = "return document.getElementById('progress').value"
    WebDriverWait(browser, 30).until(lambda d: (d.execute_script(bar) or 0) > 0,
                                     "the progress bar never moved")
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "gateway-page-progress.png"))
    release(faults, "gw-page")

    player = "return document.getElementById('player').duration"
    WebDriverWait(browser, 60).until(lambda d: (d.execute_script(player) or 0) > 0,
                                     "the audio element reports no duration")
    assert 0.5 < browser.execute_script(player) < 2.0  # the 1 s job's file
    assert browser.find_element(By.ID, "error").text == ""
    link = browser.find_element(By.ID, "download")
    assert (link.get_attribute("href") or "").startswith("blob:")
    assert link.get_attribute("download")
    log = browser.execute_script("return window.progressLog")
    assert log[-1] == 1.0 and any(0 < f < 1 for f in log), log
    shot = ARTIFACTS / "gateway-page.png"
    assert browser.save_screenshot(str(shot))
    print(f"screenshots: {ARTIFACTS / 'gateway-page-progress.png'} {shot}")
    assert shot.stat().st_size > 10_000
