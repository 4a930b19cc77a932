"""The admin dashboard in a real browser (Debian's chromium driven by Playwright) against a
real server process thread: sign-in, versions and rollback, live job progress, class
search, and refusal without the session cookie. Screenshots of every page are saved under
the test output folder ($DMC_TEST_OUTPUT, default ./test-output/dashboard)."""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from server.settings import ServerSettings
from tests.server.conftest import ADMIN_KEY, colour_pngs, free_port, live_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(os.environ.get("DMC_TEST_OUTPUT", "test-output")) / "dashboard"

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (make install)"
)


@dataclass
class LiveServer:
    url: str
    settings: ServerSettings
    api: httpx.Client

    def add_task(
        self, colours: list[int], per_class: int = 6, prefix: str = ""
    ) -> dict[str, object]:
        pairs = colour_pngs(colours, per_class)
        files = [("images", (f"{i}.png", data, "image/png")) for i, (_, data) in enumerate(pairs)]
        labels = [prefix + name for name, _ in pairs]
        response = self.api.post("/classes", files=files, data={"labels": labels})
        assert response.status_code == 202, response.text
        return response.json()  # type: ignore[no-any-return]

    def wait_job(self, job_id: int, states: tuple[str, ...], timeout: float = 60) -> dict:  # type: ignore[type-arg]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.api.get(f"/jobs/{job_id}").json()
            if job["state"] in states:
                return job  # type: ignore[no-any-return]
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} did not reach {states}: {job}")


@pytest.fixture
def live(settings_factory: Callable[..., ServerSettings]) -> Iterator[LiveServer]:
    """A uvicorn server in a thread with three versions made by three real jobs."""
    settings = settings_factory(port=free_port(), session_secret="dashboard-test-secret-0123456789")
    with (
        live_server(settings, timeout=30) as url,
        httpx.Client(base_url=url, headers={"X-API-Key": ADMIN_KEY}, timeout=30) as api,
    ):
        live = LiveServer(url, settings, api)
        for colours in ([0, 1], [2, 3], [4, 5]):
            job = live.add_task(colours)
            assert live.wait_job(int(job["job_id"]), ("succeeded",))["version_id"]  # type: ignore[arg-type]
        yield live


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _sign_in(page: Page, live: LiveServer) -> None:
    page.goto(f"{live.url}/admin/versions")
    expect(page).to_have_url(re.compile(r"/admin/login"))  # refused without the cookie
    _shot(page, "login")
    page.fill("#api_key", "not-a-key-at-all")
    page.click("button[type=submit]")
    expect(page.locator(".error")).to_contain_text("not valid")
    page.fill("#api_key", ADMIN_KEY)
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/admin/versions$"))


def test_sign_in_versions_and_rollback(browser: Browser, live: LiveServer) -> None:
    page = browser.new_page()
    _sign_in(page, live)
    cookie = next(c for c in page.context.cookies() if c["name"] == "dmc_session")
    assert cookie["httpOnly"] and cookie["secure"]

    rows = page.locator("#versions tbody tr")
    expect(rows).to_have_count(3)
    expect(page.locator("tr[data-version='3'] [data-active]")).to_be_visible()
    _shot(page, "versions")

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("tr[data-version='1'] button[name=activate]")
    expect(page.locator("tr[data-version='1'] [data-active]")).to_be_visible()
    expect(page.locator("tr[data-version='3'] [data-active]")).to_have_count(0)
    versions = live.api.get("/versions").json()
    assert [v["id"] for v in versions if v["active"]] == [1]

    page.click("a[href='/admin/versions/3']")
    expect(page.locator("#classes-by-task")).to_contain_text("magenta")
    plot = page.locator("img[alt='accuracy per task']")
    expect(plot).to_be_visible()
    loaded = "img => img.complete && img.naturalWidth > 0"
    page.wait_for_function(
        f"() => ({loaded})(document.querySelector(\"img[alt='accuracy per task']\"))"
    )
    assert page.request.get(f"{live.url}/admin/versions/3/accuracy.png").ok
    _shot(page, "version-detail")

    # The classes page lists the active version's classes: v1's after the rollback.
    page.goto(f"{live.url}/admin/classes?q=gr")
    expect(page.locator("#classes tbody tr")).to_have_count(1)
    expect(page.locator("#classes")).to_contain_text("green")
    _shot(page, "classes")
    page.close()


def test_the_version_tree_shows_the_active_branch_and_each_change(
    browser: Browser, live: LiveServer
) -> None:
    # v1 -> v2 -> v3; roll back to v1, then a removal and a rename build on it: v4, v5.
    api = live.api
    assert api.post("/versions/1/activate").status_code == 200
    removal = api.delete("/classes/red").json()
    assert live.wait_job(int(removal["job_id"]), ("succeeded",))["version_id"] == 4
    rename = api.patch("/classes/green", json={"name": "lime"}).json()
    assert live.wait_job(int(rename["job_id"]), ("succeeded",))["version_id"] == 5

    page = browser.new_page()
    _sign_in(page, live)
    rows = page.locator("#versions tbody tr")
    expect(rows).to_have_count(5)
    # Depth-first: v1, its abandoned branch v2 -> v3, then the active branch v4 -> v5.
    order = [rows.nth(i).get_attribute("data-version") for i in range(5)]
    assert order == ["1", "2", "4", "3", "5"] or order == ["1", "2", "3", "4", "5"]
    depths = {
        rows.nth(i).get_attribute("data-version"): rows.nth(i).get_attribute("data-depth")
        for i in range(5)
    }
    assert depths == {"1": "0", "2": "1", "3": "2", "4": "1", "5": "2"}
    branch = page.locator("#versions tbody tr[data-active-branch]")
    expect(branch).to_have_count(3)
    assert {branch.nth(i).get_attribute("data-version") for i in range(3)} == {"1", "4", "5"}
    expect(page.locator("tr[data-version='5'] [data-active]")).to_be_visible()
    expect(page.locator("tr[data-version='4'] [data-change]")).to_have_text("removed red")
    expect(page.locator("tr[data-version='5'] [data-change]")).to_have_text("renamed green to lime")
    expect(page.locator("tr[data-version='2'] [data-change]")).to_have_text("added blue, yellow")
    _shot(page, "version-tree")
    page.click("a[href='/admin/versions/5']")
    expect(page.locator("#classes-by-task")).to_contain_text("lime")
    expect(page.locator("#classes-by-task")).not_to_contain_text("red")
    page.close()


def test_running_job_progress_advances(browser: Browser, live: LiveServer) -> None:
    # The fourth task gets a long schedule so that its progress can be watched.
    live.settings.learner_overrides.update({"stage1.epochs": 60, "stage1.batch_size": 4})
    job_id = int(live.add_task([0, 5], per_class=4, prefix="dark ")["job_id"])  # type: ignore[arg-type]
    page = browser.new_page()
    _sign_in(page, live)
    page.goto(f"{live.url}/admin/jobs")
    selector = f"#pending-jobs tr[data-job='{job_id}'] [role=progressbar]"
    bar = page.locator(selector)
    expect(bar).to_be_visible(timeout=20_000)
    # True once the bar shows more than `least` percent (or the job left the table).
    above = """([selector, least]) => {
        const bar = document.querySelector(selector);
        return !bar || Number(bar.getAttribute("aria-valuenow")) > least;
    }"""
    page.wait_for_function(above, arg=[selector, 5], timeout=30_000)
    first = float(bar.get_attribute("aria-valuenow") or 0)
    assert first > 5
    _shot(page, "jobs")
    page.wait_for_function(above, arg=[selector, first], timeout=30_000)
    if bar.count():  # still running: it moved on; else it finished, past `first` too
        assert float(bar.get_attribute("aria-valuenow") or 0) > first
    page.once("dialog", lambda dialog: dialog.accept())
    cancel = page.locator(f"#pending-jobs tr[data-job='{job_id}'] button")
    if cancel.count():
        cancel.click()
    live.wait_job(job_id, ("cancelled", "succeeded"))
    page.close()


def test_requests_without_the_cookie_are_refused(live: LiveServer) -> None:
    with httpx.Client(base_url=live.url, follow_redirects=False) as anonymous:
        for path in ("/admin/versions", "/admin/jobs", "/admin/classes", "/admin/versions/1"):
            response = anonymous.get(path)
            assert response.status_code == 303 and "/admin/login" in response.headers["location"]
        assert anonymous.get("/admin/jobs.json").status_code in (303, 401)
        assert anonymous.post("/admin/versions/1/activate").status_code == 401
        assert anonymous.post("/admin/jobs/1/cancel").status_code == 401
        # An API key header is not a session: the dashboard still refuses.
        keyed = anonymous.post("/admin/versions/1/activate", headers={"X-API-Key": ADMIN_KEY})
        assert keyed.status_code == 401
    assert [v["id"] for v in live.api.get("/versions").json() if v["active"]] == [3]
