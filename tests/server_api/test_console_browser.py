"""The operator's console in a real browser: Debian's chromium driven by Selenium (chromium-driver)
against a real server on which a short simulation ran (3 devices, 2 rounds of the small model,
server-side evaluation of every model version). Logs in through the form, opens the task page and
checks that the rounds table and the evaluation curve show the real rounds and versions. The
screenshot goes to the test's tmp_path.

Skipped, loudly, only when no browser can be had (`apt-get install -y chromium chromium-driver`, which
.ci/run does); under FACEFL_FORBID_SKIPS=1 (CI) that skip is a failure.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from facefl.data import write_image_folder
from simulator import SimulationConfig, simulate
from tests.conftest import ADMIN, SECRET, LiveServer

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    driver = shutil.which("chromedriver") or (CHROMEDRIVER if Path(CHROMEDRIVER).exists() else None)
    if chromium is None or driver is None:
        pytest.skip(
            "NO BROWSER: the console's real-browser test needs Debian's chromium and chromium-driver "
            f"(found chromium={chromium}, chromedriver={driver}); install them with "
            "`apt-get install -y chromium chromium-driver` (.ci/run does)"
        )
    return chromium, driver


def headless_chromium(chromium: str, driver: str, downloads: Path) -> Any:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1300", f"--user-data-dir={downloads}"):  # fmt: skip
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def run_simulation(tmp_path: Path) -> tuple[LiveServer, int]:
    eval_dir = write_image_folder(tmp_path / "heldout", range(500, 512), images_per_identity=4, image_size=32)
    server = LiveServer(tmp_path / "srv", FACEFL_EVAL_SETS=json.dumps({"heldout": str(eval_dir)})).start()
    try:
        result = simulate(
            SimulationConfig(
                devices=3, rounds=2, model="small", data="synthetic", ids_per_device=3, images_per_id=4,
                heldout_ids=4, server=server.base_url, admin_token=ADMIN, enrollment_secret=SECRET,
                eval_set="heldout", workers=1, seed=5, progress=False, work_dir=str(tmp_path / "sim"),
            )
        )  # fmt: skip
    except BaseException:
        server.stop()
        raise
    assert [r.status for r in result.rounds] == ["aggregated", "aggregated"], result.errors
    return server, result.task_id


@pytest.fixture
def simulated(tmp_path: Path) -> Iterator[tuple[LiveServer, int]]:
    server, task_id = run_simulation(tmp_path)
    try:
        yield server, task_id
    finally:
        server.stop()


def test_task_page_in_a_real_browser(simulated: tuple[LiveServer, int], tmp_path: Path) -> None:
    chromium, driver_path = browser_binaries()
    server, task_id = simulated
    from selenium.webdriver.common.by import By

    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN}"}) as api:
        rounds = api.get(f"/v1/tasks/{task_id}/rounds").json()
        versions = api.get("/v1/models", params={"task_id": task_id}).json()
    aggregated = [r for r in rounds if r["status"] == "aggregated"]
    assert len(aggregated) == 2
    evaluated = {v["version"] for v in versions if "eval" in v["metrics"]}
    assert {r["result_version"] for r in aggregated} <= evaluated  # the simulator waited for each

    browser = headless_chromium(chromium, driver_path, tmp_path / "profile")
    try:
        browser.get(f"{server.base_url}/console/tasks/{task_id}")
        assert "/console/login" in browser.current_url  # the session comes first
        browser.find_element(By.NAME, "token").send_keys(ADMIN)
        browser.find_element(By.CSS_SELECTOR, "form[action='/console/login'] button").click()
        assert browser.current_url == f"{server.base_url}/console/tasks/{task_id}"
        cookie = browser.get_cookie("facefl_console")
        assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert browser.execute_script("return document.cookie") == ""  # HttpOnly: no script can read it

        # the rounds table: both aggregated rounds, newest first, with their model versions
        cells = {}
        for tr in browser.find_elements(By.CSS_SELECTOR, "table.rounds tbody tr"):
            tds = [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            cells[tds[0]] = tds
        for r in aggregated:
            row = cells[f"#{r['number']}"]
            assert row[1].startswith("aggregated")
            assert f"v{r['base_version']} → v{r['result_version']}" in row[2]
            assert row[4].startswith(f"{r['reported']} / {r['target_reports']}")
        # the evaluation curve: one marker per evaluated version on each series, keyed by version
        svg = browser.find_element(By.CSS_SELECTOR, "svg.chart-eval")
        accuracy = svg.find_element(By.CSS_SELECTOR, "g.series-0")
        assert accuracy.get_attribute("data-label") == "generic accuracy"
        keys = {int(c.get_attribute("data-key")) for c in accuracy.find_elements(By.TAG_NAME, "circle")}
        assert keys == evaluated and len(keys) == 3  # the initial version and one per round
        assert len(accuracy.find_element(By.TAG_NAME, "polyline").get_attribute("points").split()) == 3
        # the task is completed: nothing to watch, the page does not reload itself
        assert not browser.find_elements(By.CSS_SELECTOR, "meta[http-equiv='refresh']")
        browser.save_screenshot(str(tmp_path / "console-task.png"))
        assert (tmp_path / "console-task.png").stat().st_size > 10_000

        # a round's page from the table, then back: the participants are the devices that reported
        browser.find_element(By.LINK_TEXT, f"#{aggregated[0]['number']}").click()
        statuses = [
            td.text for td in browser.find_elements(By.CSS_SELECTOR, "table.participants td:nth-child(2)")
        ]
        assert statuses.count("reported") == aggregated[0]["reported"]
    finally:
        browser.quit()
