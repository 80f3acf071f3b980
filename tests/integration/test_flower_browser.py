"""Flower in a real browser: headless Chromium (Debian's, driven by Selenium through Debian's
chromedriver; nothing is downloaded) opens the password-protected dashboard that the Procfile's
flower line serves, finds the real worker and the jobs it finished, and saves a screenshot.
"""

from __future__ import annotations

import base64
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from .conftest import REPO, WorkerFactory, run_caller
from .test_procfile import Procfile, flower_env, start_flower

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = REPO / "artifacts"  # gitignored
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1400,1000")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            pytest.fail(f"{path} is missing: run .ci/install (Debian packages chromium, chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def procfile(workdir: Path, tmp_path: Path) -> Iterator[Procfile]:
    runner = Procfile(workdir, tmp_path)
    yield runner
    runner.stop_all()


def _text_of(driver: webdriver.Chrome, selector: str) -> str:
    # textContent, not .text: the rendered text wraps long names at hyphens ("w1\n-3f2a@test").
    elements = driver.find_elements(By.CSS_SELECTOR, selector)
    return "\n".join(e.get_attribute("textContent") or "" for e in elements)


def _rows(driver: webdriver.Chrome, table: str) -> list[str]:
    return [e.get_attribute("textContent") or ""
            for e in driver.find_elements(By.CSS_SELECTOR, f"{table} tbody tr")]


def test_flower_shows_the_worker_and_its_finished_jobs(
        browser: webdriver.Chrome, procfile: Procfile, workers: WorkerFactory, workdir: Path,
        redis_url: str, tmp_path: Path) -> None:
    password = "pw-" + secrets.token_urlsafe(18)
    # Flower first: it knows only the events it sees, so it must be up before the jobs run.
    flower, base = start_flower(procfile, flower_env(workdir, redis_url, tmp_path, password))
    worker = workers.start(queues="musicgen.tiny")
    jobs = [run_caller(workdir, redis_url, {"prompt": f"browser check {i}", "duration": 0.5,
                                            "seed": i, "format": fmt})
            for i, fmt in enumerate(("wav", "mp3"))]
    for job in jobs:
        assert "error" not in job, job
    job_ids = [job["job_id"] for job in jobs]

    # Without credentials the browser gets a 401 (headless Chromium leaves the page blank).
    browser.get(f"{base}/")
    navigation = "return performance.getEntriesByType('navigation')[0].responseStatus"
    assert browser.execute_script(navigation) == 401
    assert not browser.find_elements(By.ID, "workers-table")

    # Basic auth on every request the page makes (its API calls included), through the CDP.
    token = base64.b64encode(f"ops:{password}".encode()).decode()
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                            {"headers": {"Authorization": f"Basic {token}"}})
    ARTIFACTS.mkdir(exist_ok=True)

    browser.get(f"{base}/workers")
    WebDriverWait(browser, 30).until(lambda d: worker.name in _text_of(d, "#workers-table tbody"),
                                     f"worker {worker.name} not listed")
    row = next(r for r in _rows(browser, "#workers-table") if worker.name in r)
    assert "Online" in row, row  # the status column
    workers_png = ARTIFACTS / "flower-workers.png"
    assert browser.save_screenshot(str(workers_png))

    browser.get(f"{base}/tasks")  # Flower 2 fills this table from /tasks/datatable after load
    WebDriverWait(browser, 30).until(
        lambda d: all(job_id in _text_of(d, "#tasks-table tbody") for job_id in job_ids),
        f"jobs {job_ids} not listed")
    rows = _rows(browser, "#tasks-table")
    for job_id in job_ids:
        row_text = next(t for t in rows if job_id in t)
        assert "musicgen.generate" in row_text and "SUCCESS" in row_text, row_text
        assert worker.name in row_text, row_text
    assert password not in browser.page_source
    tasks_png = ARTIFACTS / "flower-tasks.png"
    assert browser.save_screenshot(str(tasks_png))
    print(f"screenshots: {workers_png} {tasks_png}")
    assert tasks_png.stat().st_size > 10_000  # a rendered page, not a blank one
    assert "15 detected, shutting down" in flower.terminate()
