"""libsfclone (native/sfclone) against a scripted stand-in for the agent's API socket.

The stand-in only checks the protocol encoding of the C client: what each
function sends and how it decodes answers and errors. The real agent is
exercised by the integration tests.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

NATIVE = Path(__file__).resolve().parents[2] / "native"
BUILD = NATIVE / "build"
DRIVER = BUILD / "driver"

# docs/clone-api.md, the error table
ERROR_CODES = {
    "UsageError": -2,
    "RoleError": -3,
    "TicketError": -4,
    "BusyError": -5,
    "CapacityError": -6,
    "CloneError": -7,
    "HostdError": -8,
    "ProtocolError": -9,
}
EPROTO, ECONNECT, EHOST, EUSAGE, EFAIL = -9, -10, -8, -2, -1


def make(*args: str, **kw) -> None:
    proc = subprocess.run(["make", "-C", str(NATIVE), *args], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"make {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module", autouse=True)
def built():
    make()
    make("driver")


@pytest.fixture
def sockdir():
    # Short path: a Unix socket path must fit in 108 bytes, pytest's tmp_path may not.
    d = tempfile.mkdtemp(prefix="sfc-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def answer(**fields) -> dict:
    return {"v": 1, "ok": True, **fields}


def failure(type_: str, message: str) -> dict:
    return {"v": 1, "ok": False, "error": {"type": type_, "message": message}}


def send(conn: socket.socket, obj: dict) -> None:
    conn.sendall(json.dumps(obj).encode() + b"\n")


class Agent:
    """Accepts one connection per script, records its request line, runs the script on it."""

    def __init__(self, path: Path, *scripts):
        self.path = path
        self.requests: list[dict] = []
        self.errors: list[BaseException] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(8)
        self.sock.settimeout(20)
        self.thread = threading.Thread(target=self._serve, args=(scripts,), daemon=True)
        self.thread.start()

    def _serve(self, scripts):
        try:
            for script in scripts:
                conn, _ = self.sock.accept()
                with conn:
                    conn.settimeout(20)
                    line = conn.makefile("rb").readline()
                    assert line.endswith(b"\n"), line
                    self.requests.append(json.loads(line))
                    if isinstance(script, dict):
                        send(conn, script)
                    else:
                        script(conn)
        except BaseException as e:  # reported by close()
            self.errors.append(e)

    def close(self):
        self.thread.join(25)
        self.sock.close()
        self.path.unlink()
        assert not self.thread.is_alive(), "agent double still waiting for a connection"
        if self.errors:
            raise self.errors[0]


def parse(stdout: str) -> dict:
    out = dict(line.split("=", 1) for line in stdout.splitlines())
    out["rc"] = int(out["rc"])
    return out


def run(sock: Path, *args) -> dict:
    proc = subprocess.run([str(DRIVER), *map(str, args)], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "SFMPI_API_SOCKET": str(sock)})
    assert proc.returncode == 0, proc.stderr
    return parse(proc.stdout)


def call(sockdir: Path, scripts: list, *args) -> tuple[dict, list[dict]]:
    """Runs the driver with args against an agent double; returns its output and the requests."""
    agent = Agent(sockdir / "api.sock", *scripts)
    try:
        out = run(agent.path, *args)
    finally:
        agent.close()
    return out, agent.requests


# ---- requests and decoded answers -------------------------------------------

@pytest.mark.parametrize("timeout,sent", [(600, {"timeout": 600}), (2.5, {"timeout": 2.5}), (0, {}), (-1, {})])
def test_ticket(sockdir, timeout, sent):
    ans = answer(ticket={"id": "t-7", "requested": 4, "granted": 3, "family": "12",
                         "timeout": timeout if timeout > 0 else None})
    out, reqs = call(sockdir, [ans], "ticket", 4, timeout)
    assert reqs == [{"v": 1, "op": "ticket", "n": 4, **sent}]
    assert out == {"id": "t-7", "requested": "4", "granted": "3", "family": "12",
                   "timeout": f"{max(timeout, 0):g}", "rc": 0, "error": ""}


def test_clone_answer_after_a_delay_in_pieces(sockdir):
    def slow(conn):
        time.sleep(1.0)
        data = json.dumps(answer(id=2, size=3, ticket="T", family="5", ip="10.100.5.4",
                                 hostname="vm-2")).encode() + b"\n"
        for i in range(0, len(data), 7):  # the client must reassemble partial reads
            conn.sendall(data[i:i + 7])
            time.sleep(0.01)

    t0 = time.monotonic()
    out, reqs = call(sockdir, [slow], "clone", "T")
    assert time.monotonic() - t0 >= 1.0
    assert reqs == [{"v": 1, "op": "clone", "ticket": "T"}]
    assert out["rc"] == 0 and out["id"] == "2"


def test_clone_read_retries_after_eintr(sockdir):
    """Signals caught without SA_RESTART while clone waits do not end the call."""
    got_request = threading.Event()

    def interrupted(conn):
        got_request.set()
        time.sleep(1.5)  # the test signals the driver meanwhile
        send(conn, answer(id=0, size=2, ticket="T", family="5", ip="10.100.5.2", hostname="vm"))

    agent = Agent(sockdir / "api.sock", interrupted)
    try:
        proc = subprocess.Popen([str(DRIVER), "clone", "T"], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "SFMPI_API_SOCKET": str(agent.path)})
        assert got_request.wait(10)
        for _ in range(5):
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.1)
        stdout, _ = proc.communicate(timeout=20)
    finally:
        agent.close()
    assert parse(stdout) == {"id": "0", "rc": 0, "error": ""}


@pytest.mark.parametrize("ids,expect", [({"id": 0}, "0"), ({"id": 2}, "2"), ({}, "0")])
def test_checkpoint(sockdir, ids, expect):
    out, reqs = call(sockdir, [answer(checkpoint={"id": "c-1", "family": 9}, **ids)], "checkpoint")
    assert reqs == [{"v": 1, "op": "checkpoint"}]
    assert out == {"checkpoint": "c-1", "family": "9", "id": expect, "rc": 0, "error": ""}


@pytest.mark.parametrize("max_,stored", [(4, "1,2,3,-99"), (2, "1,2"), (0, "")])
def test_create_clones(sockdir, max_, stored):
    out, reqs = call(sockdir, [answer(clones=[1, 2, 3])], "create_clones", "c-1", "T", max_)
    assert reqs == [{"v": 1, "op": "create_clones", "checkpoint": "c-1", "ticket": "T"}]
    assert out == {"count": "3", "clones": stored, "rc": 0, "error": ""}


def test_join_statuses_by_id_and_failures_in_last_error(sockdir):
    ans = answer(statuses={"1": 0, "2": 3}, failures={"3": "crashed: kernel panic", "4": "timeout"})
    out, reqs = call(sockdir, [ans], "join", "T", 4)
    assert reqs == [{"v": 1, "op": "join", "ticket": "T"}]
    # index = clone ID; 0 (the parent) untouched; ID 4 does not fit in max = 4
    assert out == {"count": "4", "statuses": "-99,0,3,-1", "rc": 0,
                   "error": "3: crashed: kernel panic; 4: timeout"}


def test_join_without_failures(sockdir):
    out, _ = call(sockdir, [answer(statuses={"1": 7}, failures={})], "join", "T", 3)
    assert out == {"count": "1", "statuses": "-99,7,-99", "rc": 0, "error": ""}


def test_members_of_a_ticket(sockdir):
    ans = answer(members=[
        {"id": 1, "vm": "p-1", "state": "running", "ip": "10.100.5.3", "hostname": "p-1", "status": None,
         "failure": None},
        {"id": 2, "vm": "p-2", "state": "exited", "ip": None, "hostname": None, "status": 3, "failure": None},
        {"id": 3, "vm": "p-3", "state": "failed", "ip": None, "hostname": None, "status": None,
         "failure": "crashed"}])
    out, reqs = call(sockdir, [ans], "members", "T", 2)
    assert reqs == [{"v": 1, "op": "members", "ticket": "T"}]
    # three clones, two fit in max = 2
    assert out == {"count": "3", "member0": "1 running 10.100.5.3 p-1 -1", "member1": "2 exited   3",
                   "rc": 0, "error": ""}


def test_members_answer_without_a_list_is_a_protocol_error(sockdir):
    out, _ = call(sockdir, [answer(members={"1": "x"})], "members", "T", 4)
    assert out["rc"] == EPROTO and "members" in out["error"]


def test_kill(sockdir):
    out, reqs = call(sockdir, [answer(killed=[1, 2])], "kill", "T")
    assert reqs == [{"v": 1, "op": "kill", "ticket": "T"}]
    assert out == {"rc": 0, "error": ""}


def test_whoami(sockdir):
    ans = answer(id=1, role="clone", family="5", ip="10.100.5.3", hostname="vm-1",
                 mac="0a:5f:00:05:00:01", ticket="T")
    out, reqs = call(sockdir, [ans], "whoami")
    assert reqs == [{"v": 1, "op": "whoami"}]
    assert out == {"id": "1", "role": "clone", "ip": "10.100.5.3", "hostname": "vm-1", "rc": 0, "error": ""}


def test_whoami_null_ip_and_small_buffer(sockdir):
    ans = answer(id=0, role="parent", family="5", ip=None, hostname="vm", mac="m", ticket=None)
    out, _ = call(sockdir, [ans], "whoami")
    assert out["rc"] == 0 and out["ip"] == "" and out["role"] == "parent"
    out, _ = call(sockdir, [ans], "whoami", 64, 64, 2)  # "vm" needs 3 bytes
    assert out["rc"] == EUSAGE and "buffer too small" in out["error"]


# ---- exit -------------------------------------------------------------------

def test_exit_hangup_without_the_vm_dying_is_ehost(sockdir):
    out, reqs = call(sockdir, [lambda conn: None], "exit", 3)
    assert reqs == [{"v": 1, "op": "exit", "status": 3}]
    assert out["rc"] == EHOST and "not destroyed" in out["error"]


def test_exit_refused_in_the_parent(sockdir):
    out, _ = call(sockdir, [failure("RoleError", "exit is for clones")], "exit", 0)
    assert out == {"rc": ERROR_CODES["RoleError"], "error": "exit is for clones"}


# ---- errors -----------------------------------------------------------------

@pytest.mark.parametrize("type_,code", sorted(ERROR_CODES.items()))
def test_error_types_map_to_codes(sockdir, type_, code):
    out, _ = call(sockdir, [failure(type_, f"{type_} happened: ticket T")], "kill", "T")
    assert out == {"rc": code, "error": f"{type_} happened: ticket T"}


def test_unknown_error_type_is_efail_with_type_in_message(sockdir):
    out, _ = call(sockdir, [failure("NetworkError", "no bridge")], "clone", "T")
    assert out == {"rc": EFAIL, "error": "NetworkError: no bridge"}


@pytest.mark.parametrize("bad", [
    {"v": 2, "ok": True, "id": 1},
    {"ok": True, "id": 1},
    {"v": "1", "ok": True, "id": 1},
])
def test_version_mismatch_is_eproto(sockdir, bad):
    out, reqs = call(sockdir, [bad], "clone", "T")
    assert reqs[0]["v"] == 1
    assert out["rc"] == EPROTO and "protocol version" in out["error"]


@pytest.mark.parametrize("raw", [b"not json\n", b"[1, 2]\n", b'{"v": 1, "id": 1}\n',
                                 b'{"v": 1, "ok": true}\n'])
def test_unparsable_or_incomplete_answer_is_eproto(sockdir, raw):
    out, _ = call(sockdir, [lambda conn: conn.sendall(raw)], "clone", "T")
    assert out["rc"] == EPROTO and out["error"]


@pytest.mark.parametrize("partial", [b"", b'{"v": 1, "ok": tr'])
def test_server_closing_early_is_eproto(sockdir, partial):
    out, _ = call(sockdir, [lambda conn: conn.sendall(partial)], "whoami")
    assert out == {"rc": EPROTO, "error": "the agent closed the connection without an answer"}


def test_connection_refused_is_econnect(sockdir):
    path = sockdir / "api.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))  # bound, never listening: connect() is refused
    try:
        out = run(path, "whoami")
    finally:
        s.close()
    assert out["rc"] == ECONNECT and "Connection refused" in out["error"] and str(path) in out["error"]


def test_missing_socket_is_econnect(sockdir):
    out = run(sockdir / "nothing.sock", "ticket", 1, 0)
    assert out["rc"] == ECONNECT and "No such file" in out["error"]


def test_default_socket_path():
    proc = subprocess.run([str(DRIVER), "whoami"], capture_output=True, text=True, timeout=30,
                          env={k: v for k, v in os.environ.items() if k != "SFMPI_API_SOCKET"})
    out = parse(proc.stdout)
    if out["rc"] == ECONNECT:  # no agent here (the usual case outside a guest)
        assert "/run/sfmpi/api.sock" in out["error"]


def test_strerror_names_every_code():
    texts = {code: parse(subprocess.run([str(DRIVER), "strerror", str(code)], capture_output=True,
                                        text=True, check=True).stdout)["text"]
             for code in range(-10, 1)}
    assert len(set(texts.values())) == len(texts)
    unknown = parse(subprocess.run([str(DRIVER), "strerror", "-42"], capture_output=True, text=True,
                                   check=True).stdout)["text"]
    assert unknown not in texts.values()


# ---- install ----------------------------------------------------------------

def test_install_layout_and_pkg_config_from_cxx(tmp_path):
    dest = tmp_path / "root"
    make("install", f"DESTDIR={dest}", "PREFIX=/usr/local")
    root = dest / "usr/local"
    assert (root / "include/sfclone.h").is_file()
    assert (root / "lib/libsfclone.a").is_file()
    assert os.readlink(root / "lib/libsfclone.so") == "libsfclone.so.1"
    assert (root / "lib/libsfclone.so.1").resolve().is_file()
    soname = subprocess.run(["readelf", "-d", str(root / "lib/libsfclone.so")], capture_output=True,
                            text=True, check=True).stdout
    assert "[libsfclone.so.1]" in soname and "libjson-c" in soname
    pc = (root / "lib/pkgconfig/sfclone.pc").read_text()
    assert "prefix=/usr/local" in pc and "Requires.private: json-c" in pc

    # C++ programs against the installed header: found by pkg-config (shared), and static.
    src = tmp_path / "use.cc"
    src.write_text('#include <sfclone.h>\n#include <cstdio>\n'
                   'int main() { std::puts(sfc_strerror(SFC_ETICKET)); return 0; }\n')
    env = {**os.environ, "PKG_CONFIG_PATH": str(root / "lib/pkgconfig")}
    flags = subprocess.run(["pkg-config", f"--define-variable=prefix={root}", "--cflags", "--libs", "sfclone"],
                           capture_output=True, text=True, check=True, env=env).stdout.split()
    builds = {
        "shared": [*flags],
        "static": [f"-I{root}/include", str(root / "lib/libsfclone.a"), "-ljson-c"],
    }
    for kind, args in builds.items():
        exe = tmp_path / kind
        cxx = subprocess.run(["g++", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(src), *args],
                             capture_output=True, text=True)
        assert cxx.returncode == 0, f"{kind}: {cxx.stderr}"
        ran = subprocess.run([str(exe)], capture_output=True, text=True, check=True,
                             env={**os.environ, "LD_LIBRARY_PATH": str(root / "lib")})
        assert ran.stdout == "unknown, used, killed or expired ticket\n"
    needed = subprocess.run(["readelf", "-d", str(tmp_path / "static")], capture_output=True, text=True,
                            check=True).stdout
    assert "libsfclone" not in needed
