"""The cluster's TLS wire: only members of the cluster's CA get in, a caller's
name comes from its certificate, errors cross by class, and nothing a caller
sends (plain TCP, garbage, a hung handler) stops the server. Loopback only,
no VM; the server runs in a thread so that the tests call as the CLI does."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from sfmpi.errors import HostdError, NotFound, ProtocolError, UsageError
from sfmpi.hostd.cluster import keys
from sfmpi.hostd.cluster.wire import WireServer, call, call_sync

HOST = "127.0.0.1"
SMALL_LINE = 64 << 10   # the server's line bound in these tests: an oversized request stays cheap


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cluster") / "keys"
    keys.init_cluster(d, ["hostA", "hostB", "admin"])
    return d


@pytest.fixture(scope="module")
def rogue(tmp_path_factory) -> Path:
    """Another cluster, with a member of the very same name: a name alone is no credential."""
    d = tmp_path_factory.mktemp("rogue") / "keys"
    keys.init_cluster(d, ["admin", "hostA"])
    return d


class Served:
    """A WireServer on its own event loop in a thread."""

    def __init__(self, ctx, handlers, **kwargs):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = WireServer(ctx, handlers, **kwargs)
        self.port = self.run(self.server.start(HOST, 0))

    def run(self, coro, timeout: float = 5.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


async def echo(peer, args):
    return {"peer": peer, "args": args}


async def missing(peer, args):
    raise NotFound(f"no VM {args.get('name')!r} on hostA")


async def slow(peer, args):
    await asyncio.sleep(10)   # cancelled when the server closes


async def boom(peer, args):
    raise RuntimeError("a bug")


async def big(peer, args):
    return "x" * SMALL_LINE


HANDLERS = {"echo": echo, "missing": missing, "slow": slow, "boom": boom, "big": big}


@pytest.fixture(scope="module")
def served(cluster):
    s = Served(keys.server_context(cluster, "hostA"), HANDLERS, request_timeout=2.0, max_line=SMALL_LINE)
    yield s
    s.stop()


def as_member(cluster: Path, name: str = "admin"):
    return keys.client_context(cluster, name)


def ping(served, cluster, name="admin"):
    return call_sync(HOST, served.port, as_member(cluster, name), "hostA", "echo", timeout=5, n=1)


def raw_tls(served, cluster, data: bytes) -> bytes:
    """Sends DATA as is over a proper TLS connection; the server's answer line."""
    ctx = as_member(cluster)
    with socket.create_connection((HOST, served.port), timeout=5) as sock:
        with ctx.wrap_socket(sock, server_hostname="hostA") as tls:
            tls.sendall(data)
            return tls.makefile("rb").readline()


def test_a_call_reaches_the_handler_with_the_callers_name(served, cluster):
    assert ping(served, cluster) == {"peer": "admin", "args": {"n": 1}}
    assert ping(served, cluster, "hostB")["peer"] == "hostB"


def test_call_works_inside_an_event_loop(served, cluster):
    got = asyncio.run(call(HOST, served.port, as_member(cluster), "hostA", "echo", timeout=5, v=[1, "two"]))
    assert got == {"peer": "admin", "args": {"v": [1, "two"]}}


def test_a_certificate_from_another_ca_is_refused(served, cluster, rogue, caplog):
    caplog.set_level(logging.DEBUG, logger="sfmpi.hostd.cluster")
    ctx = as_member(cluster)   # trusts the right CA, so the refusal is the server's
    ctx.load_cert_chain(rogue / "admin.pem", rogue / "admin.key")
    with pytest.raises(HostdError, match="hostA at 127.0.0.1"):
        call_sync(HOST, served.port, ctx, "hostA", "echo", timeout=5)
    deadline = time.monotonic() + 3
    while not any("refused a connection" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the refusal was not logged"
        time.sleep(0.05)
    # Logged for the curious, not as an error with a traceback.
    bad = [r for r in caplog.records if r.name.startswith("sfmpi") and (r.levelno >= logging.WARNING or r.exc_info)]
    assert not bad
    assert ping(served, cluster)["peer"] == "admin"


def test_a_server_from_another_ca_is_refused(cluster, rogue):
    impostor = Served(keys.server_context(rogue, "hostA"), HANDLERS, request_timeout=2.0)
    try:
        with pytest.raises(HostdError, match="cannot reach hostA.*TLS"):
            call_sync(HOST, impostor.port, as_member(cluster), "hostA", "echo", timeout=5)
    finally:
        impostor.stop()


def test_the_server_must_carry_the_name_called(served, cluster):
    with pytest.raises(HostdError, match="cannot reach hostB.*TLS"):
        call_sync(HOST, served.port, as_member(cluster), "hostB", "echo", timeout=5)


def test_plain_tcp_gets_nothing_and_the_server_keeps_serving(served, cluster):
    got = b""
    with socket.create_connection((HOST, served.port), timeout=3) as sock:
        sock.sendall(b'{"op": "echo", "args": {}}\n')
        with _nothing():
            while chunk := sock.recv(4096):
                got += chunk
    assert b"ok" not in got and b"echo" not in got
    assert ping(served, cluster)["peer"] == "admin"


class _nothing:
    """recv() until EOF; a reset (the server dropping us mid-handshake) ends it as well."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, (ConnectionResetError, socket.timeout))


def test_an_unknown_operation_is_a_protocol_error(served, cluster):
    with pytest.raises(ProtocolError, match="unknown operation 'vm.nuke'"):
        call_sync(HOST, served.port, as_member(cluster), "hostA", "vm.nuke", timeout=5)


@pytest.mark.parametrize("line", [
    b"not json\n",
    b"[1, 2]\n",
    b'{"args": {}}\n',
    b'{"op": 5, "args": {}}\n',
    b'{"op": "echo", "args": [1]}\n',
    b'{"op": "echo", "args": {"x": "' + b"a" * (SMALL_LINE + 10) + b'"}}\n',
], ids=["not-json", "not-object", "no-op", "op-not-string", "args-not-object", "too-long"])
def test_a_malformed_request_gets_a_protocol_error(served, cluster, line):
    answer = json.loads(raw_tls(served, cluster, line))
    assert answer["error"]["type"] == "ProtocolError", answer
    assert ping(served, cluster)["peer"] == "admin"


def test_a_handlers_error_is_raised_again_on_the_caller(served, cluster):
    with pytest.raises(NotFound, match="no VM 'web' on hostA"):
        call_sync(HOST, served.port, as_member(cluster), "hostA", "missing", timeout=5, name="web")


def test_a_bug_in_a_handler_is_an_internal_error_and_the_server_stays_up(served, cluster, caplog):
    caplog.set_level(logging.ERROR, logger="sfmpi.hostd.cluster")
    with pytest.raises(HostdError, match="internal error in boom: RuntimeError"):
        call_sync(HOST, served.port, as_member(cluster), "hostA", "boom", timeout=5)
    assert ping(served, cluster)["peer"] == "admin"


def test_an_answer_past_the_line_bound_is_refused(served, cluster):
    with pytest.raises(ProtocolError, match="answer to big"):
        call_sync(HOST, served.port, as_member(cluster), "hostA", "big", timeout=5)


def test_a_handler_that_does_not_answer_in_time(served, cluster):
    t0 = time.monotonic()
    with pytest.raises(HostdError, match=r"hostA at 127.0.0.1:\d+ did not answer slow within 0.3 s"):
        call_sync(HOST, served.port, as_member(cluster), "hostA", "slow", timeout=0.3)
    assert time.monotonic() - t0 < 2
    assert ping(served, cluster)["peer"] == "admin"


def test_nobody_listening(cluster):
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]   # free once closed
    with pytest.raises(HostdError, match=f"cannot reach hostA at 127.0.0.1:{port}"):
        call_sync(HOST, port, as_member(cluster), "hostA", "echo", timeout=2)


# -- keys ---------------------------------------------------------------------------

def test_key_files_are_private(cluster):
    assert mode(cluster) == 0o700
    for name in ("ca", "hostA", "hostB", "admin"):
        assert mode(cluster / f"{name}.key") == 0o600
    for name in ("hostA", "hostB", "admin"):
        q = cluster / f"qemu-{name}"
        assert mode(q) == 0o700
        assert mode(q / "server-key.pem") == mode(q / "client-key.pem") == 0o600


def test_qemu_gets_the_same_ca_and_certificate_under_its_names(cluster):
    q = cluster / "qemu-hostA"
    assert sorted(p.name for p in q.iterdir()) == sorted(keys.QEMU_FILES)
    assert (q / "ca-cert.pem").read_bytes() == (cluster / "ca.pem").read_bytes()
    assert (q / "server-cert.pem").read_bytes() == (q / "client-cert.pem").read_bytes() == \
        (cluster / "hostA.pem").read_bytes()
    # GnuTLS takes unencrypted PKCS#8.
    assert (q / "server-key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def test_init_twice_keeps_the_ca_and_add_member_joins_it(tmp_path):
    d = tmp_path / "keys"
    keys.init_cluster(d, ["hostA"])
    before = {p: (d / p).read_bytes() for p in ("ca.pem", "ca.key", "hostA.pem", "hostA.key")}
    keys.init_cluster(d, ["hostA", "admin"])
    assert {p: (d / p).read_bytes() for p in before} == before
    keys.add_member(d, "hostC")
    s = Served(keys.server_context(d, "hostA"), HANDLERS, request_timeout=2.0)
    try:
        got = call_sync(HOST, s.port, keys.client_context(d, "hostC"), "hostA", "echo", timeout=5)
        assert got["peer"] == "hostC"
    finally:
        s.stop()


def test_missing_keys_name_the_directory(tmp_path):
    with pytest.raises(HostdError, match=f"no cluster keys in {tmp_path / 'nowhere'}.*sfmpi cluster init"):
        keys.server_context(tmp_path / "nowhere", "hostA")
    with pytest.raises(HostdError, match="no cluster keys in"):
        keys.add_member(tmp_path / "nowhere", "hostA")


def test_a_member_not_in_the_directory(cluster):
    with pytest.raises(HostdError, match="no certificate for 'hostZ'"):
        keys.client_context(cluster, "hostZ")


@pytest.mark.parametrize("name", ["", "ca", "../x", "a b", "10.0.0.1", "-x"])
def test_bad_member_names(tmp_path, name):
    with pytest.raises(UsageError):
        keys.init_cluster(tmp_path / "keys", [name])
