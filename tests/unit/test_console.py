"""The admin console's server (hostd/console/): no VM, no browser.

A pool database filled the way the controller fills it (tests/fakepool.py),
hostd's state database and stats.db filled through their own classes (Store,
StatsHistory), the console on a free port of 127.0.0.1 in a thread of the test.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from sfmpi.errors import NotFound, UsageError
from sfmpi.hostd.console import server as console_server
from sfmpi.hostd.console.server import CHART_DIR, ConsoleError, chart_file, make_server
from sfmpi.hostd.console.state import check_vm_name, vm_list, vm_names, vm_snapshot, vm_view
from sfmpi.hostd.monitor.history import SCHEMA_V1, StatsHistory
from sfmpi.hostd.pool.status import pool_status
from sfmpi.hostd.state.records import VmRecord, VmRole, VmState
from sfmpi.hostd.state.store import Store
from sfmpi.paths import Paths
from tests.fakepool import MIB, FakePool


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SFMPI_HOME", str(tmp_path))
    return Paths.from_env().home


@pytest.fixture
def pool(home):
    p = FakePool(home, "web", vms=2)
    p.report(p.vms[0], 42.5, 180)
    p.report(p.vms[1], 3.0, 150)
    p.db.event("scale-out", None, "starting 1 worker(s)")
    yield p
    p.stop()


@pytest.fixture
def console(home, pool):
    server = make_server(home, port=0).start()
    yield server
    server.close()


def get(server, path: str, host: str | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


class EventStream:
    """A reader of /events: one (event, data) message at a time."""

    def __init__(self, server, path: str = "/events"):
        self.conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
        self.conn.request("GET", path)
        self.resp = self.conn.getresponse()

    def next(self) -> tuple[str, dict]:
        event, data = None, None
        while True:
            line = self.resp.readline().decode()
            assert line, "the event stream ended"
            line = line.rstrip("\n")
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
            elif line == "" and event:
                return event, data

    def close(self) -> None:
        self.conn.close()


def test_state_is_every_pool_as_pool_status_reads_it(console, home, pool):
    status, headers, body = get(console, "/api/state")
    assert status == 200 and headers["Content-Type"] == "application/json"
    state = json.loads(body)
    assert [p["name"] for p in state["pools"]] == ["web"]
    web = state["pools"][0]
    st = pool_status(home, "web")
    assert web["state"] == st["state"] == "serving"
    assert web["vm_count"] == st["vm_count"] == 2
    assert web["frontend"] == pool.frontend
    assert web["params"] == st["params"] and web["params"]["max_vm_count"] == 4
    assert [v["name"] for v in web["vms"]] == pool.vms
    assert [(s["vm"], s["cpu"], s["ram_mib"]) for s in web["samples"]] == [(pool.vms[0], 42.5, 180.0),
                                                                            (pool.vms[1], 3.0, 150.0)]
    assert [e["kind"] for e in web["events"]] == ["up", "scale-out"]
    assert web["last_sample_id"] == web["samples"][-1]["id"]
    assert state["window_ms"] == 15 * 60_000


def test_state_window_leaves_older_samples_out(console, pool):
    pool.report(pool.vms[0], 10.0, 100, at=int(time.time() * 1000) - 10 * 60_000)
    short = json.loads(get(console, "/api/state?minutes=5")[2])["pools"][0]
    long = json.loads(get(console, "/api/state?minutes=15")[2])["pools"][0]
    assert len(long["samples"]) == len(short["samples"]) + 1


def test_no_pools_is_an_empty_list(tmp_path):
    with make_server(tmp_path / "nothing-here", port=0).start() as server:
        assert json.loads(get(server, "/api/state")[2])["pools"] == []


def test_events_push_a_sample_inserted_after_connecting(console, pool):
    stream = EventStream(console)
    try:
        assert stream.resp.status == 200
        assert stream.resp.getheader("Content-Type") == "text/event-stream"
        event, snap = stream.next()
        assert event == "state" and [p["name"] for p in snap["pools"]] == ["web"]
        seen = snap["pools"][0]["last_sample_id"]
        pool.report(pool.vms[1], 77.0, 222)
        pool.db.event("scale-in", pool.vms[1], "idle")
        deadline = time.monotonic() + 10
        samples, events = [], []
        while not (samples and events) and time.monotonic() < deadline:
            event, update = stream.next()
            assert event == "update" and update["names"] == ["web"]
            web = update["pools"][0]
            assert web["vm_count"] == 2 and web["state"] == "serving" and web["params"]["max_vm_count"] == 4
            samples += web["samples"]
            events += web["events"]
        # Only what is new: the two samples and two events of the snapshot are not sent again.
        assert [(s["vm"], s["cpu"], s["ram_mib"]) for s in samples] == [(pool.vms[1], 77.0, 222.0)]
        assert samples[0]["id"] > seen
        assert [e["kind"] for e in events] == ["scale-in"]
    finally:
        stream.close()


def test_events_show_a_pool_that_appears_later(console, home):
    stream = EventStream(console)
    late = None
    try:
        stream.next()
        late = FakePool(home, "late", vms=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            _, update = stream.next()
            if "late" in update["names"]:
                break
        view = {p["name"]: p for p in update["pools"]}["late"]
        assert view["vm_count"] == 1 and [e["kind"] for e in view["events"]] == ["up"]
    finally:
        stream.close()
        if late:
            late.stop()


def test_a_client_that_goes_away_is_no_error(console, capsys):
    for _ in range(3):
        stream = EventStream(console)
        stream.next()
        stream.close()
    time.sleep(2.5)  # two pushes into closed connections
    assert get(console, "/api/state")[0] == 200
    assert "Traceback" not in capsys.readouterr().err


def test_unknown_paths_are_404(console):
    for path in ("/nope", "/static/", "/static/../server.py", "/api", "/api/state/x", "/static/chart.js"):
        assert get(console, path)[0] == 404, path


def test_page_and_its_scripts_are_served_from_here(console):
    status, headers, body = get(console, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"/static/chart.umd.js" in body and b"/static/console.js" in body
    assert b"http" not in body.replace(b"http-equiv", b"")  # nothing from elsewhere
    assert "connect-src 'self'" in headers["Content-Security-Policy"]
    status, headers, js = get(console, "/static/console.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert b"sfmpiConsole" in js and b"EventSource" in js
    assert get(console, "/static/console.css")[0] == 200


def test_chart_js_is_debians(console):
    status, headers, body = get(console, "/static/chart.umd.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert body == chart_file().read_bytes()
    assert chart_file().parent == CHART_DIR and b"Chart.js v" in body[:200]


def test_other_host_names_are_refused(console):
    assert get(console, "/api/state", host="evil.example:8470")[0] == 403
    assert get(console, "/api/state", host=f"localhost:{console.server_port}")[0] == 200
    assert get(console, "/api/state", host="127.0.0.1:9000")[0] == 200  # an SSH tunnel's port


def test_it_listens_on_127_0_0_1_only(console):
    assert console.server_address[0] == "127.0.0.1"
    assert console.url == f"http://127.0.0.1:{console.server_port}/"


def test_without_libjs_chart_js_it_does_not_start(home, tmp_path, monkeypatch):
    monkeypatch.setattr(console_server, "CHART_DIR", tmp_path / "empty")
    with pytest.raises(ConsoleError, match="libjs-chart.js"):
        console_server.make_server(home, 0)


def test_a_used_port_is_a_usage_error(home):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=f"port {port} on 127.0.0.1 is in use"):
            make_server(home, port)
    with pytest.raises(UsageError):
        make_server(home, 70000)


def test_cli_says_what_is_wrong_in_one_line(home):
    from sfmpi.cli import main
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["console", "--port", str(port)])
    assert result.exit_code == 2
    assert result.output.strip() == f"sfmpi: error: port {port} on 127.0.0.1 is in use: choose another with --port"
    result = CliRunner().invoke(main, ["console", "--port", "-1"])
    assert result.exit_code == 2 and result.output.count("\n") == 1


def test_cli_serves_until_sigterm(home, pool):
    """`sfmpi console` as a process: prints its URL, serves, exits 0 on SIGTERM."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sfmpi.cli", "console", "--port", str(port)],
                            env={**os.environ, "SFMPI_HOME": str(home)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == f"console: http://127.0.0.1:{port}/\n"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/state")
        assert json.loads(conn.getresponse().read())["pools"][0]["name"] == "web"
        conn.close()
        stream = threading.Thread(target=lambda: _hold_stream(port), daemon=True)
        stream.start()  # an open /events stream must not keep it from exiting
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _hold_stream(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("GET", "/events")
        resp = conn.getresponse()
        while resp.readline():
            pass
    except OSError:
        pass
    finally:
        conn.close()


# -- the page of a VM: hostd's state database and stats.db, written as hostd writes them ------------------------

CONTROL = {"name": "default", "members": {"web": {"class": "high", "measure": "cpu_percent", "target": 60.0},
                                          "batch": {"class": "best-effort"}},
           "period_s": 2.0, "kp": 0.5, "ki": 0.2, "min_limit": 5.0, "max_limit": 100.0}


def put_vm(home: Path, name: str, resources: dict | None = None, cpus: int = 2, mem_mb: int = 512,
           role: VmRole = VmRole.PARENT, state: VmState = VmState.RUNNING) -> None:
    """A VM in hostd's state database (Store.put_vm), with `resources` as hostd keeps them."""
    store = Store(Paths(home).db)
    try:
        store.put_vm(VmRecord(name=name, role=role, state=state, spec={"mem_mb": mem_mb, "cpus": cpus},
                              overlay="", ram_path="", qmp_path="", agent_path="", log_path="", serial_log="",
                              family=name, image="/images/base.qcow2"))
        if resources is not None:
            body = json.loads(store.db.execute("SELECT body FROM vms WHERE name = ?", (name,)).fetchone()[0])
            store.db.execute("UPDATE vms SET body = ? WHERE name = ?",
                             (json.dumps(body | {"resources": resources}), name))
    finally:
        store.close()


def vm_sample(vm: str, at: float, i: int, vcpus: int = 2, **counters) -> dict:
    """Sample i of a VM: CPU 10 + i %, vCPU k at k + i %, 100 + i MiB PSS, disk reads
    rising 1 MiB and network reception 1000 bytes per sample."""
    return {"at": at, "vm": vm, "cpu_percent": 10.0 + i, "vcpu_percent": [float(k + i) for k in range(vcpus)],
            "mem_pss_bytes": (100 + i) * MIB, "disk_read_bytes": i * MIB, "disk_write_bytes": 0,
            "net_rx_bytes": 1000 * i, "net_tx_bytes": 0} | counters


def stats(home: Path) -> StatsHistory:
    return StatsHistory(home / "stats.db")


@pytest.fixture
def vm_home(home):
    """web (2 vCPUs, settings) with 5 samples a second apart, batch (no settings, no samples),
    the controller `default` of both with 3 steps, and `other` of neither."""
    put_vm(home, "web", {"cpu_shares": 2048, "cpu_limit": 150.0, "mem_limit": 512 * MIB, "net_rate": 10_000_000,
                         "disk_bps": 10 * MIB, "disk_iops": 200, "priority": "high"})
    put_vm(home, "batch", cpus=1)
    h = stats(home)
    t0 = time.time() - 30
    h.add([vm_sample("web", t0 + i, i) for i in range(5)])
    h.put_control("default", CONTROL)
    h.put_control("other", CONTROL | {"name": "other", "members": {"db": {"class": "high"}}})
    for i in range(3):
        h.add_step({"at": t0 + 2 * i, "control": "default", "measurement": None if i == 0 else 50.0 + i,
                    "target": 60.0, "error": None if i == 0 else 10.0 - i, "integral": float(i),
                    "actuation": 100.0 - 10 * i, "note": "no sample yet" if i == 0 else ""})
        h.add_step({"at": t0 + 2 * i, "control": "other", "measurement": 1.0, "target": 2.0, "error": 1.0,
                    "integral": 0.0, "actuation": 50.0})
    h.close()
    return home, t0


@pytest.fixture
def vm_console(vm_home):
    server = make_server(vm_home[0], port=0).start()
    yield server
    server.close()


def api_vm(server, query: str) -> tuple[int, dict]:
    status, headers, body = get(server, f"/api/vm?{query}")
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(body)


def ys(points: list[dict]) -> list:
    return [p["y"] for p in points]


def test_vm_counters_are_charted_as_rates(vm_console, vm_home):
    """A counter rising 1 MiB a second is 1 MiB/s; the first sample of the window has no rate
    (nothing before it), so each rate series has one point fewer than the gauges."""
    status, view = api_vm(vm_console, "name=web")
    assert status == 200 and view["name"] == "web"
    s = view["series"]
    assert len(s["cpu"]) == len(s["pss_mib"]) == 5
    assert ys(s["disk_read"]) == pytest.approx([MIB] * 4, rel=1e-6)
    assert ys(s["net_rx"]) == pytest.approx([1000.0] * 4, rel=1e-6)
    assert ys(s["disk_write"]) == ys(s["net_tx"]) == [0.0] * 4
    assert [p["x"] for p in s["disk_read"]] == [p["x"] for p in s["cpu"][1:]]
    assert s["cpu"][0]["x"] == round(vm_home[1] * 1000)  # ms, as the page's time axis
    assert ys(s["cpu"]) == [10.0, 11.0, 12.0, 13.0, 14.0] and ys(s["pss_mib"]) == [100.0, 101.0, 102.0, 103.0, 104.0]
    assert view["last_at"] == pytest.approx(vm_home[1] + 4)


def test_vm_a_counter_that_goes_down_is_a_restart_and_no_point(home):
    put_vm(home, "web")
    h = stats(home)
    t0 = time.time() - 10
    h.add([vm_sample("web", t0, 0, disk_read_bytes=5 * MIB), vm_sample("web", t0 + 1, 1, disk_read_bytes=7 * MIB),
           vm_sample("web", t0 + 2, 2, disk_read_bytes=MIB), vm_sample("web", t0 + 4, 3, disk_read_bytes=3 * MIB)])
    h.close()
    s = vm_view(home, "web", t0 - 1)["series"]
    assert [(p["x"], p["y"]) for p in s["disk_read"]] == [(round((t0 + 1) * 1000), pytest.approx(2 * MIB)),
                                                          (round((t0 + 4) * 1000), pytest.approx(MIB))]
    assert len(s["net_rx"]) == 3  # the other counters went on rising: their points stay


def test_vm_rates_at_the_window_start_are_from_the_sample_before_it(home):
    put_vm(home, "web")
    h = stats(home)
    t0 = time.time() - 100
    h.add([vm_sample("web", t0, 0), vm_sample("web", t0 + 50, 1), vm_sample("web", t0 + 60, 2)])
    h.close()
    s = vm_view(home, "web", t0 + 10)["series"]
    assert len(s["cpu"]) == 2  # the sample before the window is not drawn ...
    assert ys(s["disk_read"]) == pytest.approx([MIB / 50, MIB / 10])  # ... but is the base of the first rate


def test_vm_vcpu_series_one_per_thread(vm_console):
    s = api_vm(vm_console, "name=web")[1]["series"]
    assert len(s["vcpu"]) == 2
    assert ys(s["vcpu"][0]) == [0.0, 1.0, 2.0, 3.0, 4.0] and ys(s["vcpu"][1]) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [p["x"] for p in s["vcpu"][1]] == [p["x"] for p in s["cpu"]]


def test_vm_record_and_settings(vm_console):
    view = api_vm(vm_console, "name=web")[1]
    vm = view["vm"]
    assert (vm["role"], vm["state"], vm["cpus"], vm["mem_mb"], vm["family"]) == ("parent", "running", 2, 512, "web")
    settings = {s["key"]: (s["value"], s["text"]) for s in view["settings"]}
    assert settings == {"priority": ("high", "high"), "cpu_shares": (2048, "2048"),
                        "cpu_limit": (150.0, "150 % of one core"), "mem_limit": (512 * MIB, "512 MiB"),
                        "disk_iops": (200, "200 IO/s"), "disk_bps": (10 * MIB, "10 MiB/s"),
                        "net_rate": (10_000_000, "10 Mbit/s")}
    assert [s["key"] for s in view["settings"]][:3] == ["priority", "cpu_shares", "cpu_limit"]
    assert all(s["meaning"] for s in view["settings"])
    batch = api_vm(vm_console, "name=batch")[1]
    assert batch["settings"] == [] and batch["vm"]["cpus"] == 1  # no `resources`: no settings
    assert batch["series"]["cpu"] == [] and batch["series"]["vcpu"] == []


def test_vm_controllers_it_is_a_member_of_with_their_steps(vm_console, vm_home):
    t0 = vm_home[1]
    web = api_vm(vm_console, "name=web")[1]
    assert [c["name"] for c in web["controllers"]] == ["default"]  # not `other`, which web is no member of
    c = web["controllers"][0]
    assert c["definition"] == CONTROL and c["class"] == "high"
    assert ys(c["target"]) == [60.0] * 3
    assert ys(c["actuation"]) == [100.0, 90.0, 80.0]
    assert ys(c["measurement"]) == [51.0, 52.0]  # the step without a measurement has no point
    assert [p["x"] for p in c["actuation"]] == [round((t0 + 2 * i) * 1000) for i in range(3)]
    assert c["last_step"] == {"at": pytest.approx(t0 + 4), "measurement": 52.0, "target": 60.0, "error": 8.0,
                              "integral": 2.0, "actuation": 80.0, "note": ""}
    batch = api_vm(vm_console, "name=batch")[1]["controllers"]
    assert [(c["name"], c["class"]) for c in batch] == [("default", "best-effort")]


def test_vm_window_leaves_older_samples_and_steps_out(vm_home):
    home, t0 = vm_home
    h = stats(home)
    h.add([vm_sample("web", time.time() - 10 * 60, 0)])
    h.add_step({"at": time.time() - 10 * 60, "control": "default", "measurement": 1.0, "target": 60.0,
                "error": 59.0, "integral": 0.0, "actuation": 100.0})
    h.close()
    short, long = vm_snapshot(home, "web", 5), vm_snapshot(home, "web", 15)
    assert len(long["series"]["cpu"]) == len(short["series"]["cpu"]) + 1 == 6
    assert len(long["controllers"][0]["actuation"]) == len(short["controllers"][0]["actuation"]) + 1 == 4
    assert short["window_ms"] == 5 * 60_000


def test_vm_bad_names_are_400(vm_console):
    for query in ("", "name=", "name=Web", "name=..%2Fstate", "name=web%0A", "name=-web", "name=web_1",
                  "name=" + "a" * 41, "name=%27%3Bdrop"):
        status, body = api_vm(vm_console, query)
        assert status == 400 and "bad VM name" in body["error"], query
        assert get(vm_console, f"/vm?{query}")[0] == 400, query
        assert get(vm_console, f"/events/vm?{query}")[0] == 400, query


def test_vm_names_are_hostds():
    """A parent's name as hostd/vm/parents.py allows it, and its clones' (PARENT-K, PARENT-rx)."""
    for name in ("web", "a", "0web", "web-2", "x" * 40, "x" * 40 + "-250", "x" * 40 + "-rx"):
        assert check_vm_name(name) == name
    for name in ("x" * 41, "x" * 40 + "-1000", "x" * 40 + "-tx", "web-rx\n", "Web", "", None, 3):
        with pytest.raises(UsageError):
            check_vm_name(name)


def test_vm_unknown_is_404_and_names_the_vms(vm_console):
    status, body = api_vm(vm_console, "name=nope")
    assert status == 404
    assert body == {"error": "no VM named 'nope' on this host (VMs: web, batch)", "name": "nope"}
    status, headers, _ = get(vm_console, "/events/vm?name=nope")
    assert status == 404 and headers["Content-Type"] == "application/json"
    # The page is served: it asks /api/vm, and says what that said.
    assert get(vm_console, "/vm?name=nope")[0] == 200


def test_vm_gone_but_with_statistics_is_shown_as_gone(vm_home):
    home, t0 = vm_home
    h = stats(home)
    h.add([vm_sample("old", t0 + i, i) for i in range(3)])
    h.close()
    view = vm_view(home, "old", t0 - 1)
    assert view["vm"]["state"] == "gone" and view["settings"] == [] and len(view["series"]["cpu"]) == 3
    assert vm_names(home) == ["web", "batch", "old"]


def test_vm_missing_databases_and_tables_are_nothing_to_show(home):
    assert vm_names(home) == [] and vm_list(home) == []
    with pytest.raises(NotFound, match="VMs: none"):
        vm_view(home, "web", 0)
    assert not (home / "stats.db").exists() and not Paths(home).db.exists()  # read-only: nothing created
    put_vm(home, "web")
    view = vm_view(home, "web", 0)  # a state database, no stats.db
    assert view["vm"]["state"] == "running" and view["series"]["cpu"] == [] and view["controllers"] == []
    db = sqlite3.connect(home / "stats.db")  # a stats.db of before the controllers: no control tables
    db.executescript(SCHEMA_V1)
    db.execute("INSERT INTO vm_sample (at, vm, cpu_percent, vcpu_percent, mem_pss_bytes, disk_read_bytes, "
               "disk_write_bytes, net_rx_bytes, net_tx_bytes) VALUES (?, 'web', 5, '[5]', 0, 0, 0, 0, 0)",
               (time.time(),))
    db.commit()
    db.close()
    view = vm_view(home, "web", 0)
    assert ys(view["series"]["cpu"]) == [5.0] and view["controllers"] == []
    with make_server(home, port=0).start() as server:
        assert api_vm(server, "name=web")[0] == 200


def test_vm_a_database_that_cannot_be_read_is_503(home):
    Paths(home).db.write_bytes(b"not a database at all, but long enough to be read as one" * 100)
    with make_server(home, port=0).start() as server:
        status, body = api_vm(server, "name=web")
        assert status == 503 and "cannot read VM web" in body["error"]
        state = json.loads(get(server, "/api/state")[2])  # the index stays up, and says why it lists none
        assert state["vms"] == [] and state["vms_error"]


def test_state_lists_the_vms_for_the_index(vm_console):
    state = json.loads(get(vm_console, "/api/state")[2])
    assert [(v["name"], v["state"], v["cpus"], v["mem_mb"]) for v in state["vms"]] == [("web", "running", 2, 512),
                                                                                      ("batch", "running", 1, 512)]
    web = state["vms"][0]
    assert web["cpu_percent"] == 14.0 and web["pss_mib"] == 104.0  # its latest sample
    assert state["vms"][1]["cpu_percent"] is None


def test_vm_events_push_only_what_is_new(vm_console, vm_home):
    home, t0 = vm_home
    stream = EventStream(vm_console, "/events/vm?name=web")
    try:
        event, snap = stream.next()
        assert event == "state" and snap["name"] == "web" and len(snap["series"]["cpu"]) == 5
        h = stats(home)
        h.add([vm_sample("web", t0 + 6, 6)])  # 2 s after the last: disk read 2 MiB in 2 s
        h.add_step({"at": t0 + 6, "control": "default", "measurement": 70.0, "target": 60.0, "error": -10.0,
                    "integral": 1.0, "actuation": 60.0})
        h.close()
        deadline = time.monotonic() + 10
        cpu, disk, steps = [], [], []
        while not (cpu and steps) and time.monotonic() < deadline:
            event, update = stream.next()
            assert event == "update" and update["known"] and update["vm"]["state"] == "running"
            assert update["settings"] and [c["name"] for c in update["controllers"]] == ["default"]
            cpu += update["series"]["cpu"]
            disk += update["series"]["disk_read"]
            steps += update["controllers"][0]["actuation"]
        assert ys(cpu) == [16.0] and ys(disk) == pytest.approx([MIB])  # the rate is from the last sample sent
        assert ys(steps) == [60.0]
    finally:
        stream.close()


def test_vm_events_say_when_the_vm_is_gone(home):
    put_vm(home, "web")
    with make_server(home, port=0).start() as server:
        stream = EventStream(server, "/events/vm?name=web")
        try:
            assert stream.next()[0] == "state"
            store = Store(Paths(home).db)
            store.delete_vm("web")
            store.close()
            _, update = stream.next()
            assert update == {"now": update["now"], "window_ms": 15 * 60_000, "name": "web", "known": False,
                              "error": "no VM named 'web' on this host (VMs: none)"}
        finally:
            stream.close()


def test_vm_page_and_its_scripts_are_served_from_here(vm_console):
    status, headers, body = get(vm_console, "/vm?name=web")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"/static/chart.umd.js" in body and b"/static/common.js" in body and b"/static/vm.js" in body
    assert b"http" not in body.replace(b"http-equiv", b"")
    assert b"<script>" not in body and b"style=" not in body  # nothing inline: the CSP allows no inline script
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    for name, hook in (("vm.js", b"sfmpiVm"), ("common.js", b"sfmpiCommon")):
        status, headers, js = get(vm_console, f"/static/{name}")
        assert status == 200 and headers["Content-Type"].startswith("text/javascript") and hook in js
    index = get(vm_console, "/")[2]
    assert b'id="vm-list"' in index and b"/static/common.js" in index
