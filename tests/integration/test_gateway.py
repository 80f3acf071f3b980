"""The HTTP gateway for real: the Procfile's `api` line on a free port, keys made by the
`keys create` command, real Redis and the module's shared worker with the tiny model. A job
over HTTP end to end (SSE to its final state, the audio with Range), another key's view,
a cancel, and the web page in headless Chromium (Selenium, as test_flower_browser.py does):
enqueue from the page, watch its progress bar move through a dropped connection, play the
result, cancel a running job and ask for "more like this" from the history, then reload and
find the history again; a melody preset's upload from the page, sent again for "more
like this"; a refused "stream" box, and "continue this" on a finished job. The streaming page
(a worker and gateway that stream) is in test_gateway_stream.py.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
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
    # The worker's own settings (same Redis, database and storage, and whatever the module's
    # worker was started with: the engine, the features), the gateway on a free port.
    settings = {k: v for k, v in shared_worker.env.items() if k.startswith("MUSICGEN_")}
    env = base_env(workdir, redis_url, **{**settings, "MUSICGEN_API__PORT": str(free_port()),
                                          "MUSICGEN_API__RATE": "600/minute"})
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


# Each card of the page's history, as the page shows it (DOM order: newest first).
CARDS = """return [...document.querySelectorAll('#history li.job')].map((li) => ({
  id: li.dataset.id, status: li.dataset.status, cancel: li.dataset.cancel || '',
  prompt: li.querySelector('.prompt').textContent, seed: li.querySelector('.seed').textContent,
  text: li.querySelector('.status').textContent,
  progress: li.querySelector('progress').value, duration: li.querySelector('.player').duration || 0,
  download: li.querySelector('.download').download, href: li.querySelector('.download').href}))"""


def cards(browser: webdriver.Chrome) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = browser.execute_script(CARDS)
    return found


def card(browser: webdriver.Chrome, job_id: str) -> dict[str, Any]:
    return next(c for c in cards(browser) if c["id"] == job_id)


def until(browser: webdriver.Chrome, what: str, predicate: Any, timeout: float = 120) -> Any:
    """Wait for a DOM state (never for a duration); ``predicate``'s truthy value."""
    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(lambda d: predicate(), what)


def slug(prompt: str) -> str:
    """The page's file-name slug (app.js ``slug``) for an ASCII prompt."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).lstrip("-")[:48].rstrip("-")


class CuttableProxy:
    """A TCP proxy in front of the gateway for the browser, whose connections the test cuts,
    as a dropped network would: open streams break and new connections fail until ``restore``."""

    def __init__(self, target: str) -> None:
        self.target = httpx.URL(target)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.live: set[socket.socket] = set()
        self.down = False
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            if self.down:  # the network is gone: nothing connects
                client.close()
                continue
            upstream = socket.create_connection((self.target.host, self.target.port or 80))
            with self.lock:
                self.live |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:  # one side gone: the other goes too (each socket is one pump's source)
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
            with self.lock:
                self.live.discard(source)
            source.close()

    def cut(self) -> None:
        with self.lock:
            self.down, live, self.live = True, self.live, set()
        for end in live:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self.down = False

    def close(self) -> None:
        self.server.close()
        self.cut()


@pytest.fixture
def proxy(api: Api) -> Iterator[CuttableProxy]:
    cuttable = CuttableProxy(api.base)
    yield cuttable
    cuttable.close()


def open_page(browser: webdriver.Chrome, base: str, headers: dict[str, str],
              duration: str = "1") -> None:
    """The page at ``base``, its models loaded, the key of ``headers`` typed in, wav and
    ``duration`` seconds chosen: where every page test starts."""
    browser.get(f"{base}/")
    until(browser, "models loaded",
          lambda: len(Select(browser.find_element(By.ID, "model")).options) > 1, 30)
    browser.find_element(By.ID, "api-key").send_keys(headers["Authorization"].split()[1])
    Select(browser.find_element(By.ID, "format")).select_by_value("wav")
    field = browser.find_element(By.ID, "duration")
    field.clear()
    field.send_keys(duration)


def generate(browser: webdriver.Chrome, prompt: str) -> str:
    """Enqueue ``prompt`` from the form (1 s, wav, the default model); the new card's job id."""
    before = {c["id"] for c in cards(browser)}
    field = browser.find_element(By.ID, "prompt")
    field.clear()
    field.send_keys(prompt)
    browser.find_element(By.ID, "generate").click()
    new: list[str] = until(browser, f"a card for {prompt!r}", lambda: [
        c["id"] for c in cards(browser) if c["id"] not in before and c["prompt"] == prompt])
    assert cards(browser)[0]["id"] == new[0]  # on top of the history
    return new[0]


def test_the_page_keeps_a_history_to_play_cancel_and_vary(
        api: Api, shared_worker: Worker, browser: webdriver.Chrome, proxy: CuttableProxy) -> None:
    faults = Path(shared_worker.env["FAULTS_DIR"])
    run = uuid.uuid4().hex[:6]
    hold, stop = f"gw-page-{run}", f"gw-cancel-{run}"
    key = api.alice["Authorization"].split()[1]
    browser.get(f"{proxy.base}/")
    until(browser, "models loaded",
          lambda: len(Select(browser.find_element(By.ID, "model")).options) > 1, 30)
    model = Select(browser.find_element(By.ID, "model"))
    assert model.first_selected_option.get_attribute("value") == ""
    assert model.first_selected_option.text == "default (experiments apply)"
    melody = browser.find_element(By.ID, "melody-field")
    assert not melody.is_displayed()
    model.select_by_value("tiny-melody")  # /v1/models: melody true
    assert melody.is_displayed()
    model.select_by_value("tiny")
    assert not melody.is_displayed()
    model.select_by_value("")
    browser.find_element(By.ID, "api-key").send_keys(key)
    duration = browser.find_element(By.ID, "duration")
    duration.clear()
    duration.send_keys("1")
    Select(browser.find_element(By.ID, "format")).select_by_value("wav")

    # Enqueue: the request leaves the model unset; the card's bar moves while the job is held.
    prompt = f"Warm lo-fi piano FAULT:hold-progress={hold}"
    first = generate(browser, prompt)
    assert "model" not in browser.execute_script("return window.sentRequests")[-1]
    wait_for(lambda: held(faults, hold), 120, "the page's job to reach its first step")
    until(browser, "the progress bar to move", lambda: card(browser, first)["progress"] > 0)
    # Followed by EventSource on the view's signed events URL (it cannot send the key).
    followed = browser.execute_script(
        f'return document.querySelector(\'li.job[data-id="{first}"]\').dataset.stream')
    assert followed == "signed", followed

    # The stream drops (the network goes): the card says so, then resumes when it is back.
    proxy.cut()
    until(browser, "the lost connection to show",
          lambda: card(browser, first)["text"] == "connection lost, reconnecting…", 60)
    proxy.restore()
    until(browser, "the stream to reconnect",
          lambda: "connection lost" not in card(browser, first)["text"], 60)
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "gateway-page-progress.png"))
    release(faults, hold)

    # Play: the player reports the 1 s file's duration; the download is named for the clip.
    until(browser, "the audio element to report a duration",
          lambda: card(browser, first)["duration"] > 0)
    with httpx.Client(base_url=api.base, headers=api.alice, timeout=30) as client:
        seed = client.get(f"/v1/jobs/{first}").json()["result"]["seed"]
    shown = card(browser, first)
    assert shown["status"] == "succeeded" and 0.5 < shown["duration"] < 2.0, shown
    assert shown["seed"] == f"seed {seed}"
    assert shown["download"] == f"{slug(prompt)}-seed{seed}.wav", shown
    # Played from the job view's signed URL (no key in it, no blob): what <audio src> can use.
    assert f"/v1/jobs/{first}/audio?token=" in shown["href"], shown
    log = browser.execute_script("return window.progressLog")[first]
    assert log[-1] == 1.0 and any(0 < f < 1 for f in log), log
    assert browser.find_element(By.ID, "error").text == ""

    # Cancel a running job from its card: held at its first step, it stops at the next one.
    doomed = generate(browser, f"cancel me FAULT:hold-progress={stop}")
    wait_for(lambda: held(faults, stop), 120, "the second job to reach its first step")
    until(browser, "the second job to run", lambda: card(browser, doomed)["progress"] > 0)
    browser.find_element(By.CSS_SELECTOR, f'li.job[data-id="{doomed}"] .cancel').click()
    until(browser, "the cancel to be sent", lambda: card(browser, doomed)["cancel"] == "sent", 30)
    release(faults, stop)
    until(browser, "the card to show cancelled", lambda: card(browser, doomed)["status"] == "cancelled")

    # More like this: the default 3 variations, seeds +1..+3, each with its player.
    assert browser.find_element(By.ID, "variations").get_attribute("value") == "3"
    browser.find_element(By.CSS_SELECTOR, f'li.job[data-id="{first}"] .more').click()

    def variations() -> list[dict[str, Any]]:
        return [c for c in cards(browser) if c["prompt"] == prompt and c["id"] != first]

    until(browser, "three variations to play", lambda: len(variations()) == 3 and all(
        c["duration"] > 0 for c in variations()), 240)
    assert [c["seed"] for c in variations()] == [f"seed {seed + i}" for i in (3, 2, 1)]
    with httpx.Client(base_url=api.base, headers=api.alice, timeout=30) as client:
        listed = client.get("/v1/jobs", params={"limit": 20}).json()["jobs"]
        assert client.get(f"/v1/jobs/{doomed}").json()["status"] == "cancelled"
    ours = [j for j in listed if j["request"] and j["request"]["prompt"] == prompt]
    assert [j["result"]["seed"] for j in ours] == [seed + 3, seed + 2, seed + 1, seed], ours

    # Reload: the key is still in the tab, and the history lists the jobs again with players.
    browser.refresh()
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == key
    mine = {first, doomed, *(c["id"] for c in ours)}
    until(browser, "the history after a reload", lambda: mine <= {c["id"] for c in cards(browser)}
          and all(c["duration"] > 0 for c in cards(browser) if c["id"] in mine - {doomed}), 60)
    again = card(browser, first)
    assert again["download"] == f"{slug(prompt)}-seed{seed}.wav" and again["seed"] == f"seed {seed}"
    assert card(browser, doomed)["status"] == "cancelled"
    assert [c["id"] for c in cards(browser)][:5] == [c["id"] for c in ours[:3]] + [doomed, first]
    browser.set_window_size(1000, 1900)  # the whole history in the picture
    shot = ARTIFACTS / "gateway-page.png"
    assert browser.save_screenshot(str(shot))
    print(f"screenshots: {ARTIFACTS / 'gateway-page-progress.png'} {shot}")
    assert shot.stat().st_size > 10_000


def test_the_page_sends_a_melody_and_sends_it_again_for_more_like_this(
        api: Api, browser: webdriver.Chrome, tmp_path: Path) -> None:
    t = np.arange(32000 * 2) / 32000
    tune = tmp_path / "tune.wav"
    sf.write(tune, 0.3 * np.sin(2 * np.pi * 440 * t), 32000)
    open_page(browser, api.base, api.alice)
    Select(browser.find_element(By.ID, "model")).select_by_value("tiny-melody")
    browser.find_element(By.ID, "melody").send_keys(str(tune))  # a file input takes a path
    variations = browser.find_element(By.ID, "variations")
    variations.clear()
    variations.send_keys("1")
    prompt = f"hum along {uuid.uuid4().hex[:6]}"
    first = generate(browser, prompt)
    until(browser, "the melody job to play", lambda: card(browser, first)["duration"] > 0)

    # The gateway keeps no upload for the caller: the page resends the file it still has.
    browser.find_element(By.CSS_SELECTOR, f'li.job[data-id="{first}"] .more').click()
    until(browser, "the variation to play", lambda: [
        c for c in cards(browser) if c["prompt"] == prompt and c["id"] != first
        and c["duration"] > 0])
    with httpx.Client(base_url=api.base, headers=api.alice, timeout=30) as client:
        listed = client.get("/v1/jobs", params={"limit": 20}).json()["jobs"]
    ours = [j for j in listed if j["request"] and j["request"]["prompt"] == prompt]
    assert len(ours) == 2 and all(j["request"]["melody"] is True for j in ours), ours
    assert all(j["result"]["model"] == "tiny-melody" for j in ours), ours
    assert ours[0]["result"]["seed"] == ours[1]["result"]["seed"] + 1
    assert browser.find_element(By.ID, "error").text == ""


def test_the_page_outlasts_the_browsers_connection_limit(api: Api, browser: webdriver.Chrome) -> None:
    """A browser opens 6 connections to a host and an open event stream holds one: with 6 of
    the key's jobs waiting (no worker serves musicgen-small here), the page still enqueues and
    plays a new job, and shows the waiting ones cancelled."""
    with httpx.Client(base_url=api.base, headers=api.bob, timeout=30) as client:
        stuck = [client.post("/v1/jobs", json={"prompt": f"stuck {i}", "model": "musicgen-small"})
                 .json()["id"] for i in range(6)]
        try:
            open_page(browser, api.base, api.bob)
            until(browser, "the waiting jobs listed", lambda: set(stuck) <= {
                c["id"] for c in cards(browser) if c["status"] == "queued"}, 30)
            made = generate(browser, "a short one past the streams")
            until(browser, "the new job to play", lambda: card(browser, made)["duration"] > 0)
            for job_id in stuck:
                assert client.delete(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
            until(browser, "every waiting job shown cancelled", lambda: all(
                card(browser, job_id)["status"] == "cancelled" for job_id in stuck), 60)
        finally:
            for job_id in stuck:  # so that no later test finds them queued
                client.delete(f"/v1/jobs/{job_id}")


def test_the_page_says_a_refused_stream_and_continues_a_finished_job(
        api: Api, browser: webdriver.Chrome) -> None:
    """This module's worker and gateway run the default engine, which does not stream: a ticked
    "stream" box is refused with unsupported_option, shown, and unticked. Then "Continue this"
    on a finished 1 s job sends its audio back as the continuation of a longer job."""
    open_page(browser, api.base, api.alice)
    prompt = f"a tune to go on {uuid.uuid4().hex[:6]}"
    browser.find_element(By.ID, "prompt").send_keys(prompt)
    box = browser.find_element(By.ID, "stream")
    box.click()
    assert box.is_selected()
    browser.find_element(By.ID, "generate").click()
    error = until(browser, "the refusal shown", lambda: browser.find_element(By.ID, "error").text, 30)
    assert error.startswith("unsupported_option: stream=True"), error
    assert not box.is_selected()
    assert browser.find_element(By.ID, "stream-note").text.startswith("Unticked: ")
    assert browser.execute_script("return window.sentRequests")[-1]["stream"] is True
    assert not [c for c in cards(browser) if c["prompt"] == prompt]  # nothing was enqueued

    first = generate(browser, prompt)  # the box is unticked now: it goes through
    assert "stream" not in browser.execute_script("return window.sentRequests")[-1]
    assert browser.find_element(By.ID, "error").text == ""
    until(browser, "the clip to play", lambda: card(browser, first)["duration"] > 0)
    with httpx.Client(base_url=api.base, headers=api.alice, timeout=30) as client:
        clip = client.get(f"/v1/jobs/{first}").json()["result"]["duration"]

    browser.find_element(By.CSS_SELECTOR, f'li.job[data-id="{first}"] .continue').click()
    more: list[str] = until(browser, "the continuation's card", lambda: [
        c["id"] for c in cards(browser) if c["prompt"] == prompt and c["id"] != first], 30)
    until(browser, "the continuation to play", lambda: card(browser, more[0])["duration"] > 0, 180)
    with httpx.Client(base_url=api.base, headers=api.alice, timeout=30) as client:
        job = client.get(f"/v1/jobs/{more[0]}").json()
    assert job["status"] == "succeeded", job
    # The clip was uploaded (the echo says so, never the bytes) and is in the output.
    assert job["request"]["continuation"] is True and job["request"]["continuation_included"] is True
    assert job["request"]["duration"] == pytest.approx(clip + 1.0, abs=1e-3), job["request"]
    assert job["result"]["duration"] == pytest.approx(clip + 1.0, abs=0.05), job["result"]
    shown = card(browser, more[0])
    assert shown["duration"] == pytest.approx(clip + 1.0, abs=0.1), shown
    details = browser.find_element(By.CSS_SELECTOR, f'li.job[data-id="{more[0]}"] .details').text
    assert "continuation" in details.split(" · "), details  # the card says what it is
    assert browser.find_element(By.ID, "error").text == ""
