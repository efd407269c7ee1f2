"""The pool's balancer against a real HAProxy (no VM): servers are Python HTTP
servers in a network namespace this test makes, HAProxy runs in it with its
front end on the host's loopback, as a pool runs it."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest

from sfmpi.errors import PoolError, UsageError
from sfmpi.hostd.pool.haproxy import HAProxy

SLOW_SERVER = """
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(float(sys.argv[3]))
        body = sys.argv[2].encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer((sys.argv[1], 8080), H).serve_forever()
"""


@pytest.fixture
def netns():
    name = f"sfmpi-t{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    servers = []

    def serve(ip: str, answer: str, delay: float) -> None:
        subprocess.run(["ip", "-n", name, "addr", "add", f"{ip}/32", "dev", "lo"], check=True)
        servers.append(subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", SLOW_SERVER, ip, answer,
                                         str(delay)]))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c",
                               f"import socket; socket.create_connection(('{ip}', 8080), 1)"],
                              capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise AssertionError(f"test server {ip} did not start")
    yield name, serve
    for p in servers:
        p.terminate()
        p.wait(10)
    subprocess.run(["ip", "netns", "del", name], check=True)


@pytest.fixture
def balancer(netns):
    work = Path(tempfile.mkdtemp(prefix="sfmpi-hp-"))
    hp = HAProxy(work, f"/run/netns/{netns[0]}", 0, queue_timeout_s=20)
    with hp:
        yield hp, netns[1]
    assert not hp.alive()
    assert not [p for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "haproxy"
                and str(work) in " ".join(p.info["cmdline"] or [])], "HAProxy left running"
    shutil.rmtree(work)


def post(port: int, timeout: float = 30) -> tuple[float, str]:
    t = time.monotonic()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=b"x", method="POST")
    body = urllib.request.urlopen(req, timeout=timeout).read().decode()
    return time.monotonic() - t, body


def test_requests_reach_servers_in_the_namespace_and_queue_for_a_new_one(balancer):
    hp, serve = balancer
    serve("10.250.0.1", "A", 2.0)
    serve("10.250.0.2", "B", 0.0)
    hp.api.add_server("w1", "10.250.0.1", 8080, 1)
    hp.api.set_state("w1", "ready")
    results: list[tuple[float, str]] = []
    threads = [threading.Thread(target=lambda: results.append(post(hp.port))) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    time.sleep(0.3)
    stat = hp.api.stat()
    assert int(stat["BACKEND"]["qcur"]) == 2 and int(stat["w1"]["scur"]) == 1
    # A server added now takes the queued requests: none waits for w1, none is dropped.
    hp.api.add_server("w2", "10.250.0.2", 8080, 1)
    hp.api.set_state("w2", "ready")
    for t in threads:
        t.join()
    assert sorted(body for _, body in results) == ["A", "B", "B"]
    assert max(lat for lat, body in results if body == "B") < 1.5


def test_drain_finishes_what_is_in_flight_then_the_server_goes(balancer):
    hp, serve = balancer
    serve("10.250.0.3", "C", 1.5)
    serve("10.250.0.4", "D", 0.0)
    for name, ip in (("w1", "10.250.0.4"), ("w2", "10.250.0.3")):
        hp.api.add_server(name, ip, 8080, 1)
        hp.api.set_state(name, "ready")
    hp.api.set_state("w1", "maint")  # so the next request lands on w2
    got: list[tuple[float, str]] = []
    t = threading.Thread(target=lambda: got.append(post(hp.port)))
    t.start()
    time.sleep(0.5)
    hp.api.set_state("w1", "ready")
    hp.api.set_state("w2", "drain")
    assert post(hp.port)[1] == "D"        # new requests avoid the draining server
    t.join()
    assert got[0][1] == "C"               # the one in flight was not cut
    with pytest.raises(PoolError, match="refused"):
        hp.api.del_server("w2")          # HAProxy wants maintenance first
    hp.api.set_state("w2", "maint")
    hp.api.del_server("w2")
    assert "w2" not in hp.api.stat()


def test_a_busy_front_end_port_is_a_clear_error(netns, tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        hp = HAProxy(tmp_path, f"/run/netns/{netns[0]}", s.getsockname()[1])
        with pytest.raises(UsageError, match="cannot listen on 127.0.0.1"):
            hp.start()
        assert hp.proc is None
    finally:
        s.close()


def test_each_request_time_comes_from_haproxys_log(netns):
    """The request log (latency.py) gets one line per request from the real HAProxy: its time and status."""
    from sfmpi.hostd.pool.latency import RequestLog, percentile
    name, serve = netns
    serve("10.250.0.3", "C", 0.3)
    work = Path(tempfile.mkdtemp(prefix="sfmpi-hp-"))
    with RequestLog(work / "requests.sock") as requests, \
            HAProxy(work, f"/run/netns/{name}", 0, request_log=requests.path) as hp:
        hp.api.add_server("w1", "10.250.0.3", 8080, 4)
        hp.api.set_state("w1", "ready")
        took = [post(hp.port)[0] for _ in range(5)]
        deadline = time.monotonic() + 5
        got: list = []
        while len(got) < 5 and time.monotonic() < deadline:
            got += requests.drain()
            time.sleep(0.05)
    assert [status for _at, _ms, status in got] == [200] * 5
    # What HAProxy measured lies between the server's sleep and what the client saw.
    for _at, ms, _status in got:
        assert 300 <= ms <= max(took) * 1000 + 5, (got, took)
    assert 300 <= percentile([ms for _a, ms, _s in got], 95) <= max(took) * 1000 + 5
    assert not (work / "requests.sock").exists()
    shutil.rmtree(work)
