"""The dashboard's evaluation views in a real browser: a version's evaluation against its
parent (old/new accuracy, worst classes, the confusion plot) and the page comparing two
versions side by side."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, expect

from dmc_client import Client
from server.settings import ServerSettings
from tests.core.toy import save_colour_folder
from tests.server.conftest import (
    ADMIN_KEY,
    LEARNER_OVERRIDES,
    MEMORY_SCHEDULE,
    free_port,
    live_server,
)
from tests.server.dashboard.test_dashboard import (  # noqa: F401  (fixtures)
    LiveServer,
    _shot,
    _sign_in,
    browser,
)

LOADED = "img => img.complete && img.naturalWidth > 0"


@pytest.fixture
def evaluated(
    settings_factory: Callable[..., ServerSettings], tmp_path: Path
) -> Iterator[LiveServer]:
    """A server with an evaluation set and two versions, each evaluated by its job."""
    settings = settings_factory(
        port=free_port(),
        session_secret="dashboard-test-secret-0123456789",
        learner_overrides=LEARNER_OVERRIDES | MEMORY_SCHEDULE,
    )
    with (
        live_server(settings, timeout=30) as url,
        httpx.Client(base_url=url, headers={"X-API-Key": ADMIN_KEY}, timeout=30) as api,
        Client(url, ADMIN_KEY, poll_seconds=0.05) as dmc,
    ):
        colours = {"red": 0, "green": 1, "blue": 2, "yellow": 3}
        dmc.add_evaluation_set("colours", save_colour_folder(tmp_path / "e", colours, 3, 7))
        for name, classes in (("a", {"red": 0, "green": 1}), ("b", {"blue": 2, "yellow": 3})):
            dmc.add_classes(save_colour_folder(tmp_path / name, classes, 4, 1), progress=False)
        yield LiveServer(url, settings, api)


def test_version_evaluation_and_comparison(browser: Browser, evaluated: LiveServer) -> None:  # noqa: F811
    page = browser.new_page()
    _sign_in(page, evaluated)
    page.goto(f"{evaluated.url}/admin/versions/2")
    section = page.locator("section.evaluation")
    expect(section).to_have_count(1)
    expect(section.locator("h3")).to_contain_text("against parent v1")
    expect(section.locator("tr[data-group='old'] td").first).to_have_text("6")
    expect(section.locator("tr[data-group='new'] td").first).to_have_text("6")
    expect(page.locator("#gate")).to_have_attribute("data-passed", "true")
    page.wait_for_function(f"() => ({LOADED})(document.querySelector('section.evaluation img'))")
    _shot(page, "version-evaluation")

    page.click("a[href='/admin/compare']")
    page.select_option("select[name=a]", "1")
    page.select_option("select[name=b]", "2")
    page.click("#pick button[type=submit]")
    expect(page).to_have_url(re.compile(r"/admin/compare\?a=1&b=2$"))
    table = page.locator("table.side-by-side[data-set='colours']")
    expect(table.locator("tr[data-class]")).to_have_count(4)
    # v1 knows neither blue nor yellow: no accuracy of its own on them.
    expect(table.locator("tr[data-class='blue'] td").nth(1)).to_have_text("–")
    expect(table.locator("tr[data-class='blue'] td").nth(2)).to_have_text(re.compile(r"%$"))
    expect(page.locator("#summary")).to_contain_text("blue, yellow")
    _shot(page, "compare")
    page.close()
