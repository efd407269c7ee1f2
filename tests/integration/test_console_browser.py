"""The console's page in a real browser (headless Chromium), against a pool
database with no pool behind it (tests/fakepool.py): no VM.

What it reads of the page are the hooks the pool tests reuse
(docs/console.md): the element ids vmcount-POOL and events-POOL and
window.sfmpiConsole. The screenshot lands in tests/artifacts/console.png.
"""
from __future__ import annotations

import time
from pathlib import Path

import psutil
import pytest

from sfmpi.hostd.console.server import make_server
from sfmpi.hostd.pool.status import pool_status
from tests.browser import Chromium
from tests.fakepool import FakePool

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
BROWSER_NAMES = ("chromium", "chromedriver", "chrome_crashpad_handler")


def browser_pids() -> set[tuple[int, float]]:
    """Every chromium-family process on the host (pid, start time): read only, to tell ours apart.
    A zombie is not counted: it has ended, and only waits for its parent (or init) to reap it."""
    found = set()
    for p in psutil.process_iter(["pid", "name", "create_time", "status"]):
        if (p.info["name"] or "").startswith(BROWSER_NAMES) and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.add((p.info["pid"], p.info["create_time"]))
    return found


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SFMPI_HOME", str(tmp_path))
    return tmp_path


def test_page_draws_a_pool_and_follows_it(home):
    before = browser_pids()
    pool = FakePool(home, "web", vms=2)
    browser = Chromium()
    try:
        for vm in pool.vms:
            pool.report(vm, 20.0, 128)
        with make_server(home, port=0).start() as server, browser:
            browser.open(server.url)
            browser.wait_js("window.sfmpiConsole && window.sfmpiConsole.ready()")
            assert browser.js("sfmpiConsole.pools()") == ["web"]

            # The VM count shown is pool_status's.
            expected = pool_status(home, "web")["vm_count"]
            assert browser.js("sfmpiConsole.vmCount('web')") == expected == 2
            assert browser.text("vmcount-web") == f"VMs: {expected}"
            assert browser.text("state-web") == "serving"
            assert browser.text("frontend-web") == pool.frontend
            assert browser.js("document.querySelectorAll('#params-web tr').length") == 9

            # New samples: the charts grow.
            points = browser.js("sfmpiConsole.points('web')")
            for i in range(3):
                for vm in pool.vms:
                    pool.report(vm, 30.0 + 10 * i, 130 + i)
            browser.wait_js(f"sfmpiConsole.points('web') >= {points + 12}", timeout=15)
            assert browser.js("document.querySelectorAll('#vms-web .vm').length") == 2

            # A new event: in the list, with its kind.
            pool.db.event("scale-out", None, "starting 1 worker(s) by clone: requests are waiting")
            browser.wait_js("sfmpiConsole.events('web').includes('scale-out')", timeout=15)
            assert browser.js("sfmpiConsole.events('web')") == ["up", "scale-out"]
            kinds = browser.js("[...document.querySelectorAll('#events-web li')].map(li => li.dataset.kind)")
            assert sorted(kinds) == ["scale-out", "up"]

            # A VM more: the count follows.
            pool.db.add_vm("web-w3", pool.db.reserve_ip(4), "10.0.0.13")
            pool.db.event("serving", "web-w3", "joined the balancer")
            browser.wait_js("sfmpiConsole.vmCount('web') === 3", timeout=15)
            assert browser.text("vmcount-web") == "VMs: 3" and pool_status(home, "web")["vm_count"] == 3

            # A second pool appears by itself.
            other = FakePool(home, "api", vms=1)
            try:
                browser.wait_js("sfmpiConsole.pools().includes('api')", timeout=15)
                browser.wait_js("sfmpiConsole.vmCount('api') === 1", timeout=5)
            finally:
                other.stop()

            time.sleep(1.2)  # one more push, so that the screenshot shows the last of it
            browser.screenshot(ARTIFACTS / "console.png")
            assert browser.console_errors() == []
    finally:
        browser.stop()
        browser.stop()  # a second stop is harmless
        pool.stop()
    assert browser.leftovers() == []
    assert browser_pids() - before == set(), "a chromium or chromedriver process of this test is left"
    assert (ARTIFACTS / "console.png").stat().st_size > 10_000
