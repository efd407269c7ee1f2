"""The jobs runner of the guest agent (exec, signal), driven over a socketpair as sfmpi-agentd drives it."""
from __future__ import annotations

import base64
import json
import socket

import pytest

from sfmpi.guest.agent import Agent


class Host:
    """The host's end: reads the agent's JSON lines."""

    def __init__(self, sock: socket.socket):
        sock.settimeout(10)
        self.reader = sock.makefile("rb")

    def next(self) -> dict:
        line = self.reader.readline()
        assert line, "agent closed the channel"
        return json.loads(line)

    def until_exit(self, job_id) -> tuple[list[dict], dict]:
        events = []
        while True:
            ev = self.next()
            assert ev.get("id") == job_id, ev
            if ev["ev"] == "exit":
                return events, ev
            events.append(ev)


@pytest.fixture
def pair():
    host_sock, guest_sock = socket.socketpair()
    agent = Agent(guest_sock.fileno())
    agent._sock = guest_sock  # keep the fd open
    yield agent, Host(host_sock)
    guest_sock.close()
    host_sock.close()


def output(events, fd) -> bytes:
    return b"".join(base64.b64decode(e["data"]) for e in events if e["ev"] == "out" and e["fd"] == fd)


def test_exec_streams_output_and_exit_code(pair):
    agent, host = pair
    agent.dispatch(b'{"op":"exec","id":1,"argv":["sh","-c","echo out; echo err >&2; exit 5"]}')
    events, exit_ev = host.until_exit(1)
    assert exit_ev == {"ev": "exit", "id": 1, "code": 5}
    assert all(e["ev"] == "out" for e in events)
    assert output(events, 1) == b"out\n"
    assert output(events, 2) == b"err\n"
    assert agent.jobs == {}


def test_exec_env_cwd_and_binary_output(pair, tmp_path):
    agent, host = pair
    req = {"op": "exec", "id": 7, "argv": ["sh", "-c", "printf '\\377\\000'; echo \"$FOO\"; pwd"],
           "env": {"FOO": "bar"}, "cwd": str(tmp_path)}
    agent.dispatch(json.dumps(req).encode())
    events, exit_ev = host.until_exit(7)
    assert exit_ev["code"] == 0
    assert output(events, 1) == b"\xff\x00bar\n" + str(tmp_path).encode() + b"\n"


def test_exec_killed_by_signal_reports_negative_code(pair):
    agent, host = pair
    agent.dispatch(b'{"op":"exec","id":2,"argv":["sh","-c","kill -9 $$"]}')
    _, exit_ev = host.until_exit(2)
    assert exit_ev["code"] == -9


def test_signal_op_stops_a_job(pair):
    agent, host = pair
    agent.dispatch(b'{"op":"exec","id":3,"argv":["sh","-c","echo started; exec sleep 30"]}')
    first = host.next()
    assert first["ev"] == "out" and base64.b64decode(first["data"]) == b"started\n"
    agent.dispatch(b'{"op":"signal","id":3,"sig":15}')
    _, exit_ev = host.until_exit(3)
    assert exit_ev["code"] == -15


def test_unknown_op(pair):
    agent, host = pair
    agent.dispatch(b'{"op":"reboot","id":4}')
    ev = host.next()
    assert ev["ev"] == "error" and ev["id"] == 4 and "unknown op 'reboot'" in ev["message"]


@pytest.mark.parametrize("line", [b"{not json", b'{"id":1}', b"[1,2]", b'"ping"', b"\xff\xfe"])
def test_malformed_line(pair, line):
    agent, host = pair
    agent.dispatch(line)
    assert host.next() == {"ev": "error", "id": None, "message": "malformed request"}


def test_command_not_found(pair):
    agent, host = pair
    agent.dispatch(b'{"op":"exec","id":5,"argv":["sfmpi-no-such-command-xyz"]}')
    events, exit_ev = host.until_exit(5)
    assert exit_ev["code"] == 127
    assert len(events) == 1 and events[0]["ev"] == "error"
    assert "sfmpi-no-such-command-xyz" in events[0]["message"]


def test_exec_without_argv(pair):
    agent, host = pair
    agent.dispatch(b'{"op":"exec","id":6}')
    events, exit_ev = host.until_exit(6)
    assert exit_ev["code"] == 127 and events[0]["ev"] == "error"


def test_signal_for_unknown_job_is_ignored(pair):
    agent, host = pair
    agent.dispatch(b'{"op":"signal","id":99,"sig":15}')
    agent.dispatch(b'{"op":"nop","id":98}')
    assert host.next()["id"] == 98  # nothing was sent before the answer to this


@pytest.mark.parametrize("line", [b'{"op":"signal","id":[3],"sig":15}', b'{"op":"signal","id":3,"sig":"TERM"}',
                                  b'{"op":"signal","id":3,"sig":9999}'])
def test_bad_signal_request_is_an_error_not_a_crash(pair, line):
    agent, host = pair
    agent.dispatch(b'{"op":"exec","id":3,"argv":["sh","-c","echo started; exec sleep 30"]}')
    assert host.next()["ev"] == "out"
    agent.dispatch(line)
    ev = host.next()
    assert ev["ev"] == "error" and "bad signal request" in ev["message"]
    agent.dispatch(b'{"op":"signal","id":3,"sig":9}')
    assert host.until_exit(3)[1]["code"] == -9
