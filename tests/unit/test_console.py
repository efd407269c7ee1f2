"""The admin console's server (hostd/console/): no VM, no browser.

A pool database filled the way the controller fills it (tests/fakepool.py),
the console on a free port of 127.0.0.1 in a thread of the test.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from sfmpi.errors import UsageError
from sfmpi.hostd.console import server as console_server
from sfmpi.hostd.console.server import CHART_DIR, ConsoleError, chart_file, make_server
from sfmpi.hostd.pool.status import pool_status
from sfmpi.paths import Paths
from tests.fakepool import FakePool


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

    def __init__(self, server):
        self.conn = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=10)
        self.conn.request("GET", "/events")
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
