"""sfmpi-agentd (native/agent), the guest agent, run on the host without a VM.

A socketpair stands in for hostd's virtio-serial port and a temporary path for
the clone-API socket. Re-identification runs in a scratch network namespace
with its own hostname (unshare --uts), and the files the agent writes
(/etc/hosts, /etc/hostname, /etc/machine-id, /etc/sfmpi/clone.d) live under
SFMPI_AGENT_ROOT. The clock is left alone: no test sends "time".
"""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from sfmpi import api

ROOT = Path(__file__).resolve().parents[2]
AGENTD = ROOT / "native/build/sfmpi-agentd"
IDENT = {"id": 2, "family": "p", "mac": "0a:5f:00:01:00:04", "ip": "10.100.1.6", "prefix": 24,
         "gateway": "10.100.1.1", "hostname": "p-2", "ticket": "t1", "host": "lab2", "mtu": 1450}


@pytest.fixture(scope="module", autouse=True)
def built():
    subprocess.run(["make", "-s", "-C", str(ROOT / "native"), "build/sfmpi-agentd"], check=True)


@pytest.fixture
def netns():
    name = f"sfid-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "d0", "type", "veth", "peer", "name", "d1"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


class Guest:
    """A running sfmpi-agentd: `host` is hostd's end of its port."""

    def __init__(self, root: Path, netns: str | None):
        self.root = root
        (root / "etc/sfmpi").mkdir(parents=True)
        (root / "run").mkdir()
        (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 parent\n")
        self.api_path = str(root / "api.sock")
        host, guest = socket.socketpair()
        argv = [str(AGENTD), "--port-fd", str(guest.fileno()), "--api-socket", self.api_path,
                "--python", sys.executable, "--realtime", "off"]
        if netns:
            argv = ["ip", "netns", "exec", netns, "unshare", "--uts", "--", *argv]
        env = dict(os.environ, SFMPI_AGENT_ROOT=str(root), PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(argv, pass_fds=(guest.fileno(),), env=env)
        guest.close()
        host.settimeout(20)
        self.host = host
        self.reader = host.makefile("rb")
        assert self.next()["ev"] == "ready"  # sent at start

    def send(self, msg: dict) -> None:
        self.host.sendall((json.dumps(msg) + "\n").encode())

    def next(self) -> dict:
        line = self.reader.readline()
        assert line, "the agent closed the port"
        return json.loads(line)

    def connect(self, request: dict) -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(20)
        for _ in range(200):
            try:
                s.connect(self.api_path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.02)
        s.sendall((json.dumps(request) + "\n").encode())
        return s

    @staticmethod
    def answer_of(s: socket.socket) -> dict:
        with s, s.makefile("rb") as f:
            return json.loads(f.readline())

    def call(self, request: dict) -> dict:
        return self.answer_of(self.connect(request))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.reader.close()
        self.host.close()


@pytest.fixture
def guest(tmp_path):
    g = Guest(tmp_path, None)
    yield g
    g.close()


@pytest.fixture
def ns_guest(tmp_path, netns):
    g = Guest(tmp_path, netns)
    g.netns = netns
    yield g
    g.close()


def hook(directory: Path, name: str, body: str, mode: int = 0o755) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(mode)


# -- the port: hostd's side ----------------------------------------------------

def test_ping_answers_ready(guest):
    guest.send({"op": "ping"})
    ev = guest.next()
    assert ev["ev"] == "ready" and ev["version"] == 2
    assert ev["hostname"] == socket.gethostname()
    assert isinstance(ev["uptime"], float) and len(ev["boot_id"]) == 36


@pytest.mark.parametrize("line", [b"{not json", b'{"id":1}', b"[1,2]", b'"ping"', b'{"op":null}', b'{"op":7}'])
def test_malformed_line(guest, line):
    guest.host.sendall(line + b"\n")
    assert guest.next() == {"ev": "error", "id": None, "message": "malformed request"}


def test_exec_goes_to_the_jobs_runner_and_its_events_come_back(guest):
    guest.send({"op": "exec", "id": 1, "argv": ["sh", "-c", "echo out; echo err >&2; exit 5"]})
    events = []
    while True:
        ev = guest.next()
        events.append(ev)
        if ev["ev"] == "exit":
            break
    assert events[-1] == {"ev": "exit", "id": 1, "code": 5}
    out = {fd: b"".join(base64.b64decode(e["data"]) for e in events if e["ev"] == "out" and e["fd"] == fd)
           for fd in (1, 2)}
    assert out == {1: b"out\n", 2: b"err\n"}
    guest.send({"op": "reboot", "id": 4})
    assert guest.next() == {"ev": "error", "id": 4, "message": "unknown op 'reboot'"}


def test_the_jobs_runner_runs_at_normal_priority(guest):
    guest.send({"op": "exec", "id": 2, "argv": ["python3", "-c", "import os; print(os.sched_getscheduler(0))"]})
    out = b""
    while (ev := guest.next())["ev"] != "exit":   # the output may come in more than one piece
        if ev["ev"] == "out":
            out += base64.b64decode(ev["data"])
    assert ev["code"] == 0 and out == b"0\n"  # SCHED_OTHER


# -- the clone-API socket: programs' side ---------------------------------------

def test_stray_answers_are_ignored(guest):
    reading = socket.socket(socket.AF_UNIX)  # a caller that has not sent its request yet
    reading.connect(guest.api_path)
    for re in (0, None, "x", 99):
        guest.send({"re": re, "ok": True})
    guest.send({"op": "ping"})
    assert guest.next()["ev"] == "ready"  # still alive, nothing answered
    reading.sendall(b'{"v":1,"op":"whoami"}\n')
    assert guest.answer_of(reading)["error"]["type"] == "HostdError"


@pytest.mark.parametrize("op", [None, 3])
def test_a_request_whose_op_is_not_a_string(guest, op):
    assert guest.call({"v": 1, "op": op})["error"]["type"] == "UsageError"


def test_requests_go_to_hostd_and_answers_back_to_the_caller(guest):
    conn = guest.connect({"v": 1, "op": "ticket", "n": 3})
    req = guest.next()
    assert req["op"] == "ticket" and req["n"] == 3 and req["timeout"] is None and isinstance(req["req"], int)
    guest.send({"re": req["req"], "ok": True, "ticket": {"id": "T", "granted": 3}})
    assert guest.answer_of(conn) == {"v": 1, "ok": True, "ticket": {"id": "T", "granted": 3}}
    # Only the op's own fields are forwarded.
    conn = guest.connect({"v": 1, "op": "kill", "ticket": "T", "extra": 1})
    req = guest.next()
    assert set(req) == {"req", "op", "ticket"}
    guest.send({"re": req["req"], "ok": False, "error": {"type": "TicketError", "message": "no"}})
    assert guest.answer_of(conn)["error"] == {"type": "TicketError", "message": "no"}


@pytest.mark.parametrize("request_, kind, text", [
    ({"v": 2, "op": "whoami"}, "ProtocolError", "protocol version 2 not supported"),
    ({"v": 1, "op": "reboot"}, "UsageError", "unknown op 'reboot'"),
    ({"v": 1, "op": "whoami"}, "HostdError", "no identity yet"),
])
def test_bad_requests_are_answered_here(guest, request_, kind, text):
    ans = guest.call(request_)
    assert ans["ok"] is False and ans["error"]["type"] == kind and text in ans["error"]["message"]


def test_malformed_request(guest):
    s = socket.socket(socket.AF_UNIX)
    s.connect(guest.api_path)
    s.sendall(b"[1]\n")
    assert guest.answer_of(s)["error"]["type"] == "UsageError"


def test_a_second_clone_call_is_busy_not_queued(guest):
    first = guest.connect({"v": 1, "op": "clone", "ticket": "T"})
    req = guest.next()
    assert req["op"] == "clone"
    ans = guest.call({"v": 1, "op": "checkpoint"})
    assert ans["error"]["type"] == "BusyError"
    guest.send({"re": req["req"], "ok": True, "id": 0, "size": 2})
    assert guest.answer_of(first) == {"v": 1, "ok": True, "id": 0, "size": 2}


def test_losing_hostd_fails_waiting_calls_at_once(guest):
    guest.send({"op": "ping"})  # hostd connects and pings first
    assert guest.next()["ev"] == "ready"
    conn = guest.connect({"v": 1, "op": "join", "ticket": "T"})
    assert guest.next()["op"] == "join"
    guest.host.shutdown(socket.SHUT_WR)  # hostd's end goes away
    ans = guest.answer_of(conn)
    assert ans["error"] == {"type": "HostdError", "message": "lost the connection to hostd"}


def test_the_python_client_speaks_to_it(guest, monkeypatch):
    monkeypatch.setenv("SFMPI_API_SOCKET", guest.api_path)
    with pytest.raises(Exception, match="no identity yet"):
        api.whoami()


# -- re-identification ------------------------------------------------------------

def test_a_clone_answer_re_identifies_before_the_program_gets_its_id(ns_guest):
    g = ns_guest
    conn = g.connect({"v": 1, "op": "clone", "ticket": "t1"})
    req = g.next()
    machine_id = uuid.uuid4().hex
    g.send({"re": req["req"], "ok": True, "id": 2, "size": 3, "ticket": "t1", "ip": IDENT["ip"],
            "identity": IDENT, "entropy": base64.b64encode(os.urandom(64)).decode(), "machine_id": machine_id,
            "hosts": [["p", "10.100.1.2"], ["p-2", "10.100.1.6"]]})
    ev = g.next()
    assert ev["ev"] == "cloned" and ev["id"] == 2 and ev["ok"] is True
    assert {"rng", "machine_id", "network", "hostname", "hosts", "hooks", "identity"} <= set(ev["guest_ms"])
    ans = g.answer_of(conn)
    # What was only for the re-identification stays out of the program's answer.
    assert ans == {"v": 1, "ok": True, "id": 2, "size": 3, "ticket": "t1", "ip": "10.100.1.6"}
    link = subprocess.run(["ip", "-n", g.netns, "-o", "link", "show", "d0"], capture_output=True, text=True).stdout
    addrs = subprocess.run(["ip", "-n", g.netns, "-o", "-4", "addr", "show", "d0"], capture_output=True,
                           text=True).stdout
    routes = subprocess.run(["ip", "-n", g.netns, "route"], capture_output=True, text=True).stdout
    assert "link/ether 0a:5f:00:01:00:04" in link and ",UP" in link and "mtu 1450" in link
    assert addrs.count("inet ") == 1 and "inet 10.100.1.6/24" in addrs
    assert "default via 10.100.1.1 dev d0" in routes
    assert (g.root / "etc/machine-id").read_text() == machine_id + "\n"
    assert (g.root / "etc/hostname").read_text() == "p-2\n"
    assert (g.root / "etc/hosts").read_text() == ("127.0.0.1 localhost\n# sfmpi family begin\n10.100.1.2 p\n"
                                                  "10.100.1.6 p-2\n# sfmpi family end\n")
    who = g.call({"v": 1, "op": "whoami"})
    assert who == {"v": 1, "ok": True, "id": 2, "role": "clone", "family": "p", "ip": "10.100.1.6",
                   "mac": "0a:5f:00:01:00:04", "hostname": "p-2", "ticket": "t1", "host": "lab2"}
    # The UTS namespace's hostname changed, not the host's.
    assert socket.gethostname() != "p-2"


def test_identify_twice_replaces_address_and_hosts_block(ns_guest):
    g = ns_guest
    for k in (3, 4):  # a second change replaces the first (a clone of a clone)
        ident = dict(IDENT, id=0, mac=f"0a:5f:00:01:00:0{k}", ip=f"10.100.1.{k + 2}", hostname=f"p-{k}")
        g.send({"op": "identify", "identity": ident, "hosts": [["p", "10.100.1.2"], [f"p-{k}", ident["ip"]]]})
        assert g.next() == {"ev": "identified", "ok": True}
    addrs = subprocess.run(["ip", "-n", g.netns, "-o", "-4", "addr", "show", "d0"], capture_output=True,
                           text=True).stdout
    assert addrs.count("inet ") == 1 and "inet 10.100.1.6/24" in addrs
    assert (g.root / "etc/hosts").read_text() == ("127.0.0.1 localhost\n# sfmpi family begin\n10.100.1.2 p\n"
                                                  "10.100.1.6 p-4\n# sfmpi family end\n")


def test_hooks_run_in_order_with_the_clone_environment(ns_guest):
    g = ns_guest
    hooks, log = g.root / "etc/sfmpi/clone.d", g.root / "log"
    hook(hooks, "20-second", f'echo "second $SF_CLONE_ID" >> {log}')
    hook(hooks, "10-first", f'echo "first $SF_CLONE_ID $SF_FAMILY $SF_IP $SF_HOSTNAME" >> {log}')
    hook(hooks, "30-not-executable", f"echo never >> {log}", mode=0o644)
    g.send({"op": "identify", "identity": IDENT})
    assert g.next() == {"ev": "identified", "ok": True}
    assert log.read_text() == "first 2 p 10.100.1.6 p-2\nsecond 2\n"
    # The parent's own identity (ID 0, at boot) runs no hooks.
    g.send({"op": "identify", "identity": dict(IDENT, id=0)})
    assert g.next() == {"ev": "identified", "ok": True}
    assert log.read_text() == "first 2 p 10.100.1.6 p-2\nsecond 2\n"


def test_a_failing_hook_fails_the_clone_and_names_itself(ns_guest):
    g = ns_guest
    hooks, log = g.root / "etc/sfmpi/clone.d", g.root / "log"
    hook(hooks, "10-bad", "echo broken config >&2; exit 4")
    hook(hooks, "20-after", f"echo ran >> {log}")
    conn = g.connect({"v": 1, "op": "clone", "ticket": "t1"})
    req = g.next()
    g.send({"re": req["req"], "ok": True, "id": 2, "identity": IDENT})
    ev = g.next()
    assert ev == {"ev": "cloned", "id": 2, "ok": False,
                  "error": "hook 10-bad failed with exit 4: broken config"}
    ans = g.answer_of(conn)
    assert ans["error"]["type"] == "CloneError" and "hook 10-bad failed" in ans["error"]["message"]
    assert not log.exists()
