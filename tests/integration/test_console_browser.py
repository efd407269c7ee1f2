"""The console's pages in a real browser (headless Chromium), against a pool
database with no pool behind it (tests/fakepool.py), and hostd's state
database and stats.db written through their own classes: no VM.

What it reads of the pages are the hooks the pool tests reuse
(docs/console.md): the element ids vmcount-POOL and events-POOL and
window.sfmpiConsole; on the page of a VM, window.sfmpiVm and the charts'
Chart.js objects. The screenshots land in tests/artifacts/console.png and
console-vm.png.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import psutil
import pytest

from sfmpi.hostd.console.server import make_server
from sfmpi.hostd.monitor.history import StatsHistory
from sfmpi.hostd.pool.status import pool_status
from sfmpi.hostd.state.records import VmRecord, VmRole, VmState
from sfmpi.hostd.state.store import Store
from sfmpi.paths import Paths
from tests.browser import Chromium
from tests.fakepool import MIB, FakePool

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


def put_vm(home: Path, name: str, cpus: int, resources: dict | None = None) -> None:
    """A running VM in hostd's state database, with `resources` as hostd keeps them."""
    store = Store(Paths(home).db)
    try:
        store.put_vm(VmRecord(name=name, role=VmRole.PARENT, state=VmState.RUNNING,
                              spec={"mem_mb": 1024, "cpus": cpus}, overlay="", ram_path="", qmp_path="",
                              agent_path="", log_path="", serial_log="", family=name))
        if resources is not None:
            body = json.loads(store.db.execute("SELECT body FROM vms WHERE name = ?", (name,)).fetchone()[0])
            store.db.execute("UPDATE vms SET body = ? WHERE name = ?",
                             (json.dumps(body | {"resources": resources}), name))
    finally:
        store.close()


class Load:
    """Ten minutes of a busy VM, a sample every 10 s: CPU in waves over two vCPUs,
    disk reads 1 MiB/s, reception 50 kB/s; and its controller's steps every 20 s."""

    def __init__(self, home: Path, start: float):
        self.history = StatsHistory(home / "stats.db")
        self.i, self.at = 0, start
        self.counters = dict.fromkeys(("disk_read_bytes", "disk_write_bytes", "net_rx_bytes", "net_tx_bytes"), 0)

    def sample(self, dt: float = 10.0) -> None:
        cpu = 45 + 35 * math.sin(self.i / 6)
        for key, per_s in (("disk_read_bytes", MIB), ("disk_write_bytes", MIB // 4 * (1 + self.i % 3)),
                           ("net_rx_bytes", 50_000), ("net_tx_bytes", 20_000)):
            self.counters[key] += int(per_s * dt)
        self.history.add([{"at": self.at, "vm": "web", "cpu_percent": round(cpu, 1),
                           "vcpu_percent": [round(cpu * 0.6, 1), round(cpu * 0.35, 1)],
                           "mem_pss_bytes": (300 + self.i) * MIB, **self.counters}])
        if self.i % 2 == 0:
            self.history.add_step({"at": self.at, "control": "default", "measurement": round(cpu, 1),
                                   "target": 60.0, "error": round(60 - cpu, 1), "integral": 0.0,
                                   "actuation": round(max(5.0, min(100.0, 100 - cpu)), 1)})
        self.i += 1
        self.at += dt


def test_vm_page_draws_its_statistics_settings_and_controller(home):
    before = browser_pids()
    put_vm(home, "web", 2, {"cpu_limit": 150.0, "mem_limit": 768 * MIB, "net_rate": 100_000_000,
                            "priority": "high"})
    put_vm(home, "batch", 1)
    load = Load(home, time.time() - 620)  # up to 30 s ago: the samples of the test's last part are the newest
    load.history.put_control("default", {
        "name": "default", "members": {"web": {"class": "high", "measure": "cpu_percent", "target": 60.0},
                                       "batch": {"class": "best-effort"}},
        "period_s": 2.0, "kp": 0.5, "ki": 0.2, "min_limit": 5.0, "max_limit": 100.0})
    for _ in range(60):
        load.sample()
    browser = Chromium()
    try:
        with make_server(home, port=0).start() as server, browser:
            # The index lists the VMs; each name is a link to the VM's page.
            browser.open(server.url)
            browser.wait_js("window.sfmpiConsole && window.sfmpiConsole.ready()")
            assert browser.js("sfmpiConsole.vms()") == ["web", "batch"]
            assert browser.js("[...document.querySelectorAll('#vm-rows a')].map(a => a.getAttribute('href'))") == [
                "/vm?name=web", "/vm?name=batch"]
            browser.js("document.querySelector('#vm-rows tr[data-vm=\"web\"] a').click()")
            browser.wait_js("location.pathname === '/vm' && window.sfmpiVm && window.sfmpiVm.ready()")
            browser.track()
            assert browser.js("sfmpiVm.name()") == "web" and browser.text("vm-state") == "running"

            # Four charts of the VM and one of its controller, each a Chart.js object with its points:
            # 60 samples; a rate for each but the first, which has nothing before it in the window.
            assert browser.js("document.querySelectorAll('canvas').length") == 5
            drawn = "Chart.getChart(document.getElementById(arguments[0])).data.datasets.map(d => d.data.length)"
            assert browser.js(drawn, "chart-cpu") == [60, 60, 60]  # the whole QEMU, vCPU 0, vCPU 1
            assert browser.js(drawn, "chart-mem") == [60]
            assert browser.js(drawn, "chart-disk") == browser.js(drawn, "chart-net") == [59, 59]
            assert browser.js(drawn, "chart-control-default") == [30, 30, 30]  # measurement, target, actuation
            assert browser.js("sfmpiVm.points('cpu')") == {"QEMU (all threads)": 60, "vCPU 0": 60, "vCPU 1": 60}
            assert browser.js("sfmpiVm.controllers()") == ["default"]
            disk_read = browser.js("Chart.getChart(document.getElementById('chart-disk')).data.datasets[0].data"
                                   ".map(p => p.y)")
            assert disk_read == pytest.approx([MIB] * 59, rel=1e-4)  # 1 MiB/s, from the counter

            # Its settings, as hostd keeps them, in the page's words; and its record.
            settings = browser.js("[...document.querySelectorAll('#settings tr')]"
                                  ".map(tr => [tr.dataset.setting, tr.cells[1].textContent])")
            assert settings == [["priority", "high"], ["cpu_limit", "150 % of one core"], ["mem_limit", "768 MiB"],
                                ["net_rate", "100 Mbit/s"]]
            summary = browser.js("Object.fromEntries([...document.querySelectorAll('#vm-summary tr')]"
                                 ".map(tr => [tr.dataset.field, tr.cells[1].textContent]))")
            assert summary["vCPUs"] == "2" and summary["memory"] == "1024 MiB" and summary["role"] == "parent"

            # The controller: its target, this VM's class in it, the latest step, its members.
            assert browser.text("target-default") == "60.0 %"
            assert browser.js("document.querySelector('#control-default .state').textContent") == "this VM: high"
            last = load.history.steps("default")[-1]
            assert browser.text("actuation-default") == f"{last['actuation']:.1f} %"
            assert browser.text("measurement-default") == f"{last['measurement']:.1f} %"
            assert browser.js("[...document.querySelectorAll('#members-default tr[data-vm]')].map(tr => "
                              "tr.dataset.vm)") == ["web", "batch"]

            # Live: new samples and steps are drawn within a push or two.
            for _ in range(2):
                load.sample()
            browser.wait_js("sfmpiVm.points('cpu')['QEMU (all threads)'] === 62", timeout=15)
            assert browser.js(drawn, "chart-disk") == [61, 61]
            browser.wait_js("sfmpiVm.points('default').target === 31", timeout=5)
            assert browser.js("sfmpiVm.state()") == "running"

            time.sleep(1.2)  # one more push, so that the screenshot shows the last of it
            browser.screenshot(ARTIFACTS / "console-vm.png")
            assert browser.console_errors() == []

            # A VM the console does not know: the page says so, naming those there are.
            browser.open(server.url + "vm?name=nope")
            message = browser.wait_js("window.sfmpiVm && sfmpiVm.error()", timeout=15)
            assert message == "no VM named 'nope' on this host (VMs: web, batch)"
            assert browser.text("vm-error") == message and not browser.js("sfmpiVm.ready()")
    finally:
        browser.stop()
        load.history.close()
    assert browser.leftovers() == []
    assert browser_pids() - before == set(), "a chromium or chromedriver process of this test is left"
    assert (ARTIFACTS / "console-vm.png").stat().st_size > 10_000
