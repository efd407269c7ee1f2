"""hostd's files and control socket: private modes, a runtime directory that is
ours or refused, peers checked by the kernel's credentials, requests that must
come in time. A real hostd (no VM: it only serves the socket)."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sfmpi.errors import HostdError
from sfmpi.paths import Paths, ensure_private_dir

NOBODY = 65534


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_private_dir_is_made_0700(tmp_path):
    d = tmp_path / "rt"
    ensure_private_dir(d)
    assert mode(d) == 0o700
    ensure_private_dir(d)  # ours already: fine


@pytest.mark.parametrize("how", ["other owner", "group-writable", "symlink", "a file"])
def test_a_runtime_dir_that_is_not_ours_is_refused(tmp_path, how):
    d = tmp_path / "rt"
    if how == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        d.symlink_to(tmp_path / "elsewhere")
    elif how == "a file":
        d.write_text("")
    else:
        d.mkdir(mode=0o700)
        if how == "other owner":
            os.chown(d, NOBODY, NOBODY)
        else:
            os.chmod(d, 0o770)
    with pytest.raises(HostdError) as ei:
        ensure_private_dir(d)
    assert "refusing to use it" in str(ei.value)


@pytest.fixture
def hostd():
    home = Path(tempfile.mkdtemp(prefix="sfmpi-cs-", dir="/tmp"))
    os.chmod(home, 0o755)  # hostd makes it private
    env = {**os.environ, "SFMPI_HOME": str(home), "SFMPI_REQUEST_TIMEOUT": "3"}
    p = subprocess.Popen([sys.executable, "-m", "sfmpi.cli", "hostd"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    paths = Paths(home)
    deadline = time.monotonic() + 20
    while not paths.socket.exists():
        assert p.poll() is None and time.monotonic() < deadline, "hostd did not start"
        time.sleep(0.05)
    yield paths
    p.terminate()
    p.wait(10)
    subprocess.run(["rm", "-rf", str(home), str(paths.shm)])


def call(paths: Paths, line: bytes) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(paths.socket))
        s.sendall(line)
        return json.loads(s.makefile("rb").readline())


def test_files_are_private(hostd):
    assert mode(hostd.home) == 0o700
    assert mode(hostd.shm) == 0o700
    assert mode(hostd.socket) == 0o600
    for d in (hostd.vms, hostd.disks, hostd.checkpoints):
        assert mode(d) == 0o700
    assert mode(hostd.db) & 0o077 == 0


def test_a_silent_client_is_dropped_and_hostd_serves_on(hostd):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(hostd.socket))
        reply = json.loads(s.makefile("rb").readline())  # sent nothing
    assert reply["error"]["type"] == "UsageError" and "no request within" in reply["error"]["message"]
    assert "pid" in call(hostd, b'{"op": "ping"}\n')["ok"]


def test_an_oversized_or_malformed_request_is_refused(hostd):
    import threading
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(hostd.socket))

        def flood():
            try:
                s.sendall(b"x" * (2 << 20) + b"\n")
            except OSError:  # hostd answered and hung up before the end: as it should
                pass
        sender = threading.Thread(target=flood)
        sender.start()
        reply = json.loads(s.makefile("rb").readline())
        sender.join()
    assert reply["error"]["type"] == "UsageError" and "longer than" in reply["error"]["message"]
    assert call(hostd, b"{not json\n")["error"]["type"] == "UsageError"
    assert "pid" in call(hostd, b'{"op": "ping"}\n')["ok"]


def test_another_user_is_refused_whatever_the_socket_mode(hostd):
    os.chmod(hostd.socket, 0o666)  # an admin's mistake: the kernel's credentials still decide
    os.chmod(hostd.home, 0o711)
    code = ("import json, os, socket, sys\n"
            f"os.setgid({NOBODY}); os.setuid({NOBODY})\n"
            "s = socket.socket(socket.AF_UNIX); s.settimeout(60); s.connect(sys.argv[1])\n"
            # hostd may refuse (and hang up) before the request is sent: its answer is read all the same.
            "try:\n    s.sendall(b'{\"op\": \"vm.list\"}\\n')\nexcept BrokenPipeError:\n    pass\n"
            "print(s.makefile().readline())\n")
    out = subprocess.run([sys.executable, "-c", code, str(hostd.socket)], capture_output=True, text=True,
                         timeout=90)
    assert out.stdout.strip(), out.stderr
    reply = json.loads(out.stdout)
    assert "ok" not in reply and f"uid {NOBODY} may not use this hostd" in reply["error"]["message"]


def test_a_hostd_that_resets_the_connection_is_a_hostd_error(tmp_path):
    """A hostd stopping while a client's call is in flight (a scheduler's signal and a
    runner's `down` at once) resets the connection: the client says so as a HostdError."""
    import threading
    from sfmpi.client import HostdClient
    paths = Paths(tmp_path)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(paths.socket))
    server.listen(4)

    def serve():
        for _ in range(2):      # the liveness probe, then the call
            conn, _ = server.accept()
            time.sleep(0.2)     # the request arrives and is never read
            conn.close()        # unread data: the peer's next read is ECONNRESET
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with pytest.raises(HostdError, match="went away during down|closed the connection during down"):
        HostdClient(paths, autostart=False).call("down")
    t.join(5)
    server.close()
