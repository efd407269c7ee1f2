"""sfmpirun's SSH hub and its C agent (native/sfmpirun-agent), without a VM.

The clone's side is a real SSH server on loopback: paramiko's server mode
(there is no sshd on the host, and starting one would touch the host's
services), running each exec request through /bin/sh as sshd would.
"""
from __future__ import annotations

import os
import socket
import subprocess
import threading
from pathlib import Path

import paramiko
import pytest

from sfmpi.launcher import hub

ROOT = Path(__file__).resolve().parents[2]
AGENT = ROOT / "native" / "build" / "sfmpirun-agent"


@pytest.fixture(scope="module")
def agent() -> Path:
    subprocess.run(["make", "-s", "-C", str(ROOT / "native"), "build/sfmpirun-agent"], check=True)
    return AGENT


class ShellServer(paramiko.ServerInterface):
    """Accepts one public key; exec requests run through /bin/sh."""

    def __init__(self, allowed: paramiko.PKey):
        self.allowed = allowed

    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        ok = key.get_base64() == self.allowed.get_base64()
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_channel_request(self, kind, chanid):
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel, command):
        threading.Thread(target=self._run, args=(channel, command.decode()), daemon=True).start()
        return True

    @staticmethod
    def _run(channel, command: str) -> None:
        p = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)

        def feed():
            while True:
                data = channel.recv(4096)
                if not data:
                    break
                p.stdin.write(data)
                p.stdin.flush()
            p.stdin.close()
        threading.Thread(target=feed, daemon=True).start()
        err = threading.Thread(target=lambda: channel.sendall_stderr(p.stderr.read()), daemon=True)
        err.start()
        channel.sendall(p.stdout.read())
        err.join()
        channel.send_exit_status(p.wait())
        channel.close()


@pytest.fixture
def clone(tmp_path):
    """A loopback SSH server with its host key, and the job's key it accepts: (port, job key, host key line)."""
    host_key = paramiko.Ed25519Key.from_private_key_file(_keygen(tmp_path / "host"))
    job_key_path = _keygen(tmp_path / "id_ed25519")
    server = ShellServer(paramiko.Ed25519Key.from_private_key_file(job_key_path))
    listener = socket.create_server(("127.0.0.1", 0))
    transports = []

    def serve():
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return
            t = paramiko.Transport(sock)
            t.add_server_key(host_key)
            t.start_server(server=server)
            transports.append(t)
    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], Path(job_key_path), f"ssh-ed25519 {host_key.get_base64()}"
    listener.close()
    for t in transports:
        t.close()


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return str(path)


def run_agent(agent: Path, job_dir: Path, *argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([str(agent), *argv], input=stdin, capture_output=True, timeout=60,
                          env={**os.environ, "SFMPIRUN_JOB": str(job_dir)})


def test_agent_runs_the_command_on_the_clone_through_the_hub(agent, clone, tmp_path):
    port, key, host_key = clone
    h = hub.SshHub(tmp_path, key, host_key, port=port)
    h.start(["127.0.0.1"])
    try:
        # The command is one line for the remote shell (quotes and ; mean what they mean to sh).
        p = run_agent(agent, tmp_path, "-x", "127.0.0.1", 'read a; echo "out $a"; echo err >&2; exit 7',
                      stdin=b"hello\n")
        assert (p.returncode, p.stdout, p.stderr) == (7, b"out hello\n", b"err\n")
        # A second session on the same connection, as a launcher's next host or next launch.
        p = run_agent(agent, tmp_path, "127.0.0.1", "true")
        assert p.returncode == 0
        assert h.reached() == {"127.0.0.1"} and h.failures() == []
    finally:
        h.close()
    assert not (tmp_path / hub.SOCKET).exists()


def test_a_clone_with_another_host_key_is_refused(agent, clone, tmp_path):
    port, key, _ = clone
    stranger = paramiko.Ed25519Key.from_private_key_file(_keygen(tmp_path / "other"))
    h = hub.SshHub(tmp_path, key, f"ssh-ed25519 {stranger.get_base64()}", port=port)
    h.start([])
    try:
        p = run_agent(agent, tmp_path, "127.0.0.1", "true")
        assert p.returncode == 255
        assert b"cannot connect over SSH" in p.stderr
        assert h.reached() == set() and "127.0.0.1: cannot connect over SSH" in h.failures()[0]
    finally:
        h.close()


def test_a_clone_that_refuses_is_a_failure_before_any_agent_asks(tmp_path):
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    _keygen(tmp_path / "id_ed25519")
    h = hub.SshHub(tmp_path, tmp_path / "id_ed25519", "ssh-ed25519 AAAA", port=port)
    h.start(["127.0.0.1"])
    try:
        h.connection("127.0.0.1").exception(timeout=30)
        assert h.failures() and "cannot connect over SSH" in h.failures()[0]
        h.forget_launch()   # mpiexec starts after the login failed: it is still seen
        assert h.failures() and "cannot connect over SSH" in h.failures()[0]
    finally:
        h.close()


def test_agent_errors(agent, tmp_path):
    p = subprocess.run([str(agent), "h", "true"], capture_output=True, env={"PATH": os.environ["PATH"]})
    assert p.returncode == 255 and b"SFMPIRUN_JOB is not set" in p.stderr
    p = run_agent(agent, tmp_path, "h", "true")      # no hub listening there
    assert p.returncode == 255 and b"cannot reach sfmpirun" in p.stderr
    p = run_agent(agent, tmp_path, "h")
    assert p.returncode == 255 and b"usage" in p.stderr


def test_agent_argv_like_ssh():
    assert hub.split_argv(["-x", "10.0.0.3", '"/usr/bin/p"', "--a"]) == ("10.0.0.3", ['"/usr/bin/p"', "--a"], None)
    assert hub.split_argv(["-l", "bob", "-o", "X=1", "h", "orted"]) == ("h", ["orted"], "bob")
    assert hub.split_argv(["alice@h", "ls"]) == ("h", ["ls"], "alice")
    with pytest.raises(ValueError, match="usage"):
        hub.split_argv(["-q", "h"])
    assert hub.parse_request(b"h\0echo\0a b\0") == ["h", "echo", "a b"]
    with pytest.raises(ValueError, match="truncated"):
        hub.parse_request(b"h\0echo")
