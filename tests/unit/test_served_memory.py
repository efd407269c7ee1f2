"""The lazy memory path without a VM: a real memory server and a real memtap
(FUSE) through their owner classes, on a RAM file made here.

What a clone's QEMU does with memtap's file (map it privately, fault pages)
is what these tests do with reads and a private mmap; the integration tests
do it with real clones.
"""
from __future__ import annotations

import mmap
import os
import secrets
import socket
import threading
import time
from pathlib import Path

import pytest

from hostd.memory.daemons import DaemonState, Memtap, MemoryServer, memtap_argv, memserver_argv, mounted
from hostd.memory.farside import up_argvs
from sfmpi.errors import LazyMemoryError
from sfmpi.native import counters, load

MiB = 1 << 20
PAGE = 4096


def same(argv):
    return argv


@pytest.fixture
def ram(tmp_path) -> tuple[Path, bytes]:
    """16 MiB: a few data pages, a run of random data, pages written as zeros, holes."""
    path = tmp_path / "ckpt.ram"
    data = bytearray(16 * MiB)
    data[3 * PAGE:4 * PAGE] = b"A" * PAGE
    data[2 * MiB:2 * MiB + 600_000] = secrets.token_bytes(600_000)
    with open(path, "wb") as f:
        f.truncate(len(data))
        f.seek(3 * PAGE)
        f.write(data[3 * PAGE:4 * PAGE])
        f.seek(2 * MiB)
        f.write(data[2 * MiB:2 * MiB + 600_000])
        f.seek(9 * MiB)
        f.write(bytes(8 * PAGE))            # data on disk, but zero: never sent
    return path, bytes(data)


@pytest.fixture
def page_map(tmp_path, ram) -> tuple[Path, int]:
    """The RAM file's page map, and how many pages have data."""
    path = tmp_path / "ram.map"
    return path, load().scan(str(ram[0]), str(path))


@pytest.fixture
def served(tmp_path, ram, page_map):
    """A server serving the RAM file and a memtap mounting it."""
    path, data = ram
    page_map, nonzero = page_map
    server = MemoryServer(tmp_path / "server", same)
    server.start("127.0.0.1")
    token = secrets.token_hex(32)
    assert server.add("ck1", token, path, page_map) == len(data)
    tap = Memtap(tmp_path / "memtap", same, "ck1")
    try:
        tap.start("127.0.0.1", server.port, token, page_map, timeout_ms=1500)
        yield server, tap, data, nonzero, (page_map, token)
    finally:
        tap.stop()
        server.stop()
        assert not mounted(tap.mount)


def test_page_map_counts_only_pages_with_data(ram, tmp_path):
    path, _ = ram
    # 1 page of A's + ceil(600000 / 4096) = 147 pages of random data; the zeros written are not data.
    assert load().scan(str(path), str(tmp_path / "m")) == 1 + 147
    assert (tmp_path / "m").stat().st_size == 24 + (16 * MiB // PAGE) // 8


def test_memtap_serves_the_checkpoint_and_sends_no_zero_page(served):
    server, tap, data, nonzero, _ = served
    assert tap.ram.read_bytes() == data
    fetched = counters.read(tap.counters_path)[0].fields
    assert fetched["fetch_bytes"] == nonzero * PAGE      # each data page once, no zero page
    assert fetched["zero_bytes"] == len(data) - nonzero * PAGE
    assert fetched["fetch_errors"] == 0
    totals = {s.id: s.fields for s in server.counters()}
    assert totals["*"]["bytes_sent"] == nonzero * PAGE and totals["*"]["zero_pages_asked"] == 0
    assert totals["ck1"]["requests"] == fetched["fetches"]


def test_a_private_mapping_sees_the_checkpoint_and_keeps_its_writes(served):
    _server, tap, data, _, _ = served
    with open(tap.ram, "r+b") as f:               # QEMU opens its mem-path read-write
        m = mmap.mmap(f.fileno(), len(data), flags=mmap.MAP_PRIVATE)
        assert m[3 * PAGE:3 * PAGE + 4] == b"AAAA" and m[2 * MiB:2 * MiB + 64] == data[2 * MiB:2 * MiB + 64]
        m[3 * PAGE:3 * PAGE + 4] = b"BBBB"          # copy-on-write: the clone's own
        assert m[3 * PAGE:3 * PAGE + 4] == b"BBBB"
        m.close()
    assert tap.ram.read_bytes()[3 * PAGE:3 * PAGE + 4] == b"AAAA"


def test_writes_truncation_and_fallocate_are_refused(served):
    _server, tap, data, _, _ = served
    with open(tap.ram, "r+b", buffering=0) as f:
        with pytest.raises(OSError) as e:
            f.write(b"x")
        assert e.value.errno == 30                 # EROFS
        with pytest.raises(OSError):
            os.ftruncate(f.fileno(), 0)
        with pytest.raises(OSError):
            os.posix_fallocate(f.fileno(), 0, PAGE)
    assert tap.ram.stat().st_size == len(data)
    assert counters.read(tap.counters_path)[0].fields["refused_writes"] >= 3


def test_a_dead_server_fails_the_read_at_once_and_memtap_says_why(served):
    server, tap, data, _, _ = served
    server.stop()
    t0 = time.monotonic()
    with open(tap.ram, "rb") as f, pytest.raises(OSError) as e:
        f.seek(2 * MiB)
        f.read(PAGE)
    assert e.value.errno == 5 and time.monotonic() - t0 < 5      # EIO, which a mapping gets as SIGBUS
    assert "memory server 127.0.0.1" in tap.why_failed()
    assert tap.alive()                               # it serves on what it has
    with open(tap.ram, "rb") as f:                   # zero pages (and read-ahead around them) need no server
        f.seek(12 * MiB)
        assert f.read(PAGE) == bytes(PAGE)


def test_a_killed_memtap_is_seen_and_its_mount_detached(served):
    _server, tap, _, _, _ = served
    os.kill(tap.pid, 9)
    tap.popen.wait()
    assert not tap.alive() and tap.state == DaemonState.DIED
    assert "died" in tap.why_failed()
    tap.stop()
    assert not mounted(tap.mount)


def _bad_server(behaviour: str) -> tuple[socket.socket, threading.Thread]:
    """A peer that is not a memory server: it answers garbage, or accepts and says nothing."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    conns = []

    def run():
        while True:
            try:
                c, _ = lsock.accept()
            except OSError:
                return
            conns.append(c)
            if behaviour == "garbage":
                c.sendall(secrets.token_bytes(4096))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return lsock, t


@pytest.mark.parametrize("behaviour", ["garbage", "stall"])
def test_memtap_facing_no_real_server_fails_in_bounded_time(tmp_path, page_map, behaviour):
    page_map, _ = page_map
    lsock, _ = _bad_server(behaviour)
    tap = Memtap(tmp_path / "memtap", same, "ck1")
    t0 = time.monotonic()
    try:
        with pytest.raises(LazyMemoryError) as e:
            tap.start("127.0.0.1", lsock.getsockname()[1], secrets.token_hex(32), page_map, timeout_ms=800)
        assert time.monotonic() - t0 < 10
        assert ("not the sfmpi memory protocol" in str(e.value) if behaviour == "garbage"
                else "no answer within the timeout" in str(e.value)), str(e.value)
    finally:
        lsock.close()
        tap.stop()
    assert not mounted(tap.mount)


def test_wrong_token_is_refused(tmp_path, ram, page_map):
    path, _ = ram
    page_map, _ = page_map
    server = MemoryServer(tmp_path / "server", same)
    server.start("127.0.0.1")
    tap = Memtap(tmp_path / "memtap", same, "ck1")
    try:
        server.add("ck1", secrets.token_hex(32), path, page_map)
        with pytest.raises(LazyMemoryError, match="wrong token"):
            tap.start("127.0.0.1", server.port, secrets.token_hex(32), page_map)
        with pytest.raises(LazyMemoryError, match="refused add"):
            server.add("../etc", secrets.token_hex(32), path, page_map)
        assert {s.id: s.fields for s in server.counters()}["*"]["refused"] == 1
    finally:
        tap.stop()
        server.stop()


def test_command_lines_never_carry_the_token(tmp_path):
    argv = memtap_argv(tmp_path / "mnt", "169.254.252.2", 4000, "ck1", tmp_path / "token", tmp_path / "m",
                       tmp_path / "c", 500, 1024)
    assert "--token-file" in argv and all(len(a) < 64 or "/" in a for a in argv)
    assert memserver_argv("169.254.252.2", tmp_path / "s", tmp_path / "c")[-4:] == \
        ["--control", str(tmp_path / "s"), "--counters", str(tmp_path / "c")]


def test_far_side_links_two_namespaces_and_nothing_else():
    argvs = up_argvs("sfmpi-ab", "sfmpi-ab-mem")
    assert all(a[:3] == ["ip", "-n", "sfmpi-ab"] or a[:3] == ["ip", "-n", "sfmpi-ab-mem"] for a in argvs)
