"""The dashboard at ``GET /`` in a real headless Chromium (selenium): it asks
for the token once, shows what the API says (nodes, storage and GPUs,
models and copies, transfers, jobs with their steps, services), puts hostile
values in as text, and the docs page lists the OpenAPI document's routes.
A screenshot is saved (``$MESHNODE_ARTIFACTS`` or the test's directory)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.needs import unavailable

from .test_process import Proc, wait

TOKEN = "dash-" + "Tk7" * 12
SECRET = "dash-" + "Sc9" * 12
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER = "/usr/bin/chromedriver"

pytestmark = pytest.mark.slow


@pytest.fixture
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed")
    binary = next((b for b in CHROMIUM if os.path.exists(b)), None)
    if binary is None or not os.path.exists(DRIVER):
        unavailable("chromium and chromium-driver are not installed (Debian: apt install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def api(url: str, path: str) -> Any:
    r = httpx.get(url + path, headers={"authorization": f"Bearer {TOKEN}"}, timeout=10)
    r.raise_for_status()
    return r.json()


def until(check: Callable[[], Any], what: str, timeout_s: float = 20) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            got = check()
            if got:
                return got
        except Exception:  # the page is still being filled
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"the dashboard never showed {what}")
        time.sleep(0.2)


def test_the_dashboard_shows_the_mesh_as_the_api_does(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    extra = ("--api-tokens", TOKEN, "--cluster-secret", SECRET, "--fake-gpus", "1x24GiB", "--gpu-interval", "0.5")
    a = Proc("dash-a", tmp_path, None, extra).start()
    b = Proc("dash-b", tmp_path, a.address, extra).start()
    try:
        auth = {"authorization": f"Bearer {TOKEN}"}
        wait(lambda: len(api(a.url, "/nodes")["nodes"]) == 2, what="2 nodes")
        src = tmp_path / "weights"
        src.mkdir()
        (src / "w.bin").write_bytes(os.urandom(3_000_000))
        r = httpx.post(a.url + "/models/org/dash/download", headers=auth, timeout=10,
                       json={"source_url": src.as_uri(), "target_device": "dash-a:disk"})
        assert r.status_code == 202, r.text
        hostile = "<img src=x onerror=alert(1)>"
        r = httpx.post(a.url + "/models/org/typed/register", headers=auth, timeout=10, json={"model_type": hostile})
        assert r.status_code == 201, r.text
        wait(lambda: "dash-a:disk" in api(b.url, "/models/org/dash")["locations"], what="the copy on a")
        r = httpx.post(b.url + "/jobs", headers=auth, timeout=10, json={"name": "stage", "actions": [
            {"action_id": "to_b", "action_type": "copy", "model_name": "org/dash", "devices": ["dash-a:disk", "dash-b:disk"]},
            {"action_id": "check", "action_type": "health_check", "target_url": f"{a.url}/health", "dependencies": ["to_b"]}]})
        assert r.status_code == 202, r.text
        wait(lambda: api(b.url, "/jobs")["jobs"][0]["status"] == "completed", what="the job's end")

        browser.get(a.url + "/")
        until(lambda: browser.find_element(By.ID, "token-form").is_displayed(), "the token form")
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "token-save").click()

        def rows(table: str) -> dict[str, list[str]]:
            """The table as shown now; read again when the page redraws it under the read."""
            from selenium.common.exceptions import StaleElementReferenceException

            for _ in range(20):
                try:
                    out = {}
                    for tr in browser.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr[data-key]"):
                        out[tr.get_attribute("data-key")] = [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                    return out
                except StaleElementReferenceException:
                    time.sleep(0.05)
            raise AssertionError(f"the {table} table kept being redrawn")

        until(lambda: len(rows("nodes")) == 2 and len(rows("jobs")) == 1, "both nodes and the job")
        # Each table against the API, read now.
        nodes = rows("nodes")
        for n in api(a.url, "/nodes")["nodes"]:
            cells = nodes[n["node_id"]]
            assert cells[1] == n["state"] == "alive" and cells[2] == n["address"]
            assert "of" in cells[3] and "gpu0:" in cells[5] and "24.0 GiB" in cells[5], cells
            assert cells[6] == (", ".join(n["models"]) or "-")
        models = rows("models")
        for m in api(a.url, "/models")["models"]:
            cells = models[m["model_name"]]
            assert cells[3] == m["status"] and cells[4] == (", ".join(m["locations"]) or "-"), (cells, m)
        assert models["org/typed"][1] == hostile  # shown as text
        assert browser.find_elements(By.CSS_SELECTOR, "#models img") == []  # never as HTML
        transfers = rows("transfers")
        api_transfers = api(a.url, "/transfers")["transfers"]
        assert set(transfers) == {t["transfer_id"] for t in api_transfers}
        assert {cells[3] for cells in transfers.values()} == {"done"}
        (job,) = api(a.url, "/jobs")["jobs"]
        cells = rows("jobs")[job["job_id"]]
        assert cells[1:3] == ["stage", "completed"]
        assert cells[3] == "to_b (copy): completed, check (health_check): completed"
        assert rows("services") == {}  # none runs: the table says so
        assert TOKEN not in browser.page_source
        assert browser.execute_script("return sessionStorage.getItem('meshnode-token')") == TOKEN

        shots = Path(os.environ.get("MESHNODE_ARTIFACTS", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        shot = shots / "dashboard.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

        # The docs page: every route of the OpenAPI document.
        browser.get(a.url + "/docs")
        doc = httpx.get(a.url + "/openapi.json", timeout=10).json()
        want = {f"{m.upper()} {p}" for p, ops in doc["paths"].items() for m in ops}
        shown = until(lambda: {e.get_attribute("data-route")
                               for e in browser.find_elements(By.CSS_SELECTOR, "[data-route]")}, "the routes")
        assert shown == want and "GET /models" in shown
    finally:
        for p in (a, b):
            p.kill()
