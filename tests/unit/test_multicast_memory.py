"""Multicast memory without a VM: a real memory server in one network
namespace, real memtaps (FUSE) in two others, on a bridge, as on three hosts.

A fault on one host's memtap brings the range to every host: the other
memtap then has it without asking. Loss (netem on one host's link) is
repaired by unicast. Push fills a memtap completely, and then the server can
go. The working set recorded from the first memtap's faults is what a later
memtap asks for first. Namespaces, mounts and processes made here are gone
afterwards (leak check).
"""
from __future__ import annotations

import contextlib
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from hostd.memory.daemons import Memtap, MemoryServer, Multicast, memtap_argv, memserver_argv, mounted
from hostd.net.namespace import enter_argv
from sfmpi.native import counters, load
from tests.netloss import multicast_loss

MiB = 1 << 20
PAGE = 4096
GROUP = "239.255.77.1:7700"
PREFIX = f"sfmpi-mct{secrets.token_hex(2)}"
HOSTS = {"srv": "169.254.77.1", "a": "169.254.77.2", "b": "169.254.77.3"}


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def ns(host: str) -> str:
    return f"{PREFIX}-{host}"


@pytest.fixture(scope="module")
def hosts():
    """Three namespaces on a bridge in a fourth: only link-local addresses, nothing routed."""
    bridge = ns("br")
    made = []
    try:
        for name in (bridge, *map(ns, HOSTS)):
            ip("netns", "add", name)
            made.append(name)
        ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        ip("-n", bridge, "link", "set", "br0", "up")
        for i, (host, addr) in enumerate(HOSTS.items()):
            ip("-n", bridge, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns(host))
            ip("-n", bridge, "link", "set", f"p{i}", "master", "br0", "up")
            ip("-n", ns(host), "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns(host), "link", "set", "eth0", "up")
        yield
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert PREFIX not in listed


def wrap(host: str):
    return lambda argv: enter_argv(f"/run/netns/{ns(host)}", argv)


@pytest.fixture
def ram(tmp_path) -> tuple[Path, Path, bytes, int]:
    """8 MiB of RAM: 4 MiB of random data, the rest zero; and its page map."""
    path = tmp_path / "ckpt.ram"
    data = secrets.token_bytes(4 * MiB) + bytes(4 * MiB)
    path.write_bytes(data)
    page_map = tmp_path / "ram.map"
    return path, page_map, data, load().scan(str(path), str(page_map))


@pytest.fixture
def server(hosts, tmp_path, ram):
    path, page_map, data, _ = ram
    s = MemoryServer(tmp_path / "server", wrap("srv"))
    s.start(HOSTS["srv"], multicast=True)
    token = secrets.token_hex(32)
    assert s.add("ck1", token, path, page_map, GROUP) == len(data)
    try:
        yield s, token
    finally:
        s.stop()


@contextlib.contextmanager
def memtap(tmp_path, host, server, token, page_map, **kw):
    tap = Memtap(tmp_path / f"memtap-{host}-{secrets.token_hex(2)}", wrap(host), "ck1")
    try:
        tap.start(HOSTS["srv"], server.port, token, page_map, timeout_ms=3000,
                  multicast=Multicast(GROUP, HOSTS[host]), **kw)
        yield tap
    finally:
        tap.stop()
        assert not mounted(tap.mount)


def fields(tap) -> dict:
    return counters.read(tap.counters_path)[0].fields


def server_fields(server) -> dict:
    return {s.id: s.fields for s in server.counters()}["ck1"]


def wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.05)
    return pred()


def read_pages(path: Path, first: int, count: int) -> bytes:
    """count pages from page first, one read per page (one fault each: a clone's touches)."""
    with open(path, "rb", buffering=0) as f:
        return b"".join(_pread(f, p) for p in range(first, first + count))


def _pread(f, page: int) -> bytes:
    f.seek(page * PAGE)
    return f.read(PAGE)


def test_a_range_one_host_faults_reaches_every_host_once(server, tmp_path, ram):
    s, token = server
    _, page_map, data, nonzero = ram
    with memtap(tmp_path, "a", s, token, page_map) as a, memtap(tmp_path, "b", s, token, page_map) as b:
        assert a.ram.read_bytes() == data                  # host a faults everything
        assert wait_for(lambda: fields(b)["mc_ranges"] == fields(a)["mc_ranges"] > 0)
        assert b.ram.read_bytes() == data                  # host b has it all already
        fa, fb, fs = fields(a), fields(b), server_fields(s)
        assert fb["demand_fetches"] == 0 and fb["fetch_bytes"] == 0, fb
        assert wait_for(lambda: fields(b)["mc_stored_bytes"] == nonzero * PAGE)   # into b's page cache
        assert fs["mc_distinct_bytes"] == nonzero * PAGE
        # Every non-zero page went out once, plus the repairs; nothing by unicast but those.
        assert fs["mc_sent_bytes"] + fs["bytes_sent"] <= nonzero * PAGE + fs["repair_bytes"], fs
        assert fa["mc_invalid"] == fb["mc_invalid"] == 0
        assert wait_for(lambda: server_fields(s)["mc_reports"] > 0)   # the receivers' rates reach the pacer


def test_the_same_faults_at_once_on_two_hosts_are_sent_once(server, tmp_path, ram):
    s, token = server
    _, page_map, data, nonzero = ram
    import threading
    with memtap(tmp_path, "a", s, token, page_map) as a, memtap(tmp_path, "b", s, token, page_map) as b:
        out = {}
        threads = [threading.Thread(target=lambda t=t: out.__setitem__(t.ram, read_pages(t.ram, 0, 1024)))
                   for t in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert out[a.ram] == out[b.ram] == data[:4 * MiB]
        fs = server_fields(s)
        assert fs["mc_suppressed"] > 0 or fields(a)["demand_fetches"] + fields(b)["demand_fetches"] <= 1100
        assert fs["mc_sent_bytes"] <= 1.3 * nonzero * PAGE + fs["repair_bytes"], fs


def test_loss_on_one_hosts_link_is_repaired(server, tmp_path, ram):
    s, token = server
    _, page_map, data, _ = ram
    with multicast_loss(ns("b"), 5), memtap(tmp_path, "a", s, token, page_map) as a, \
            memtap(tmp_path, "b", s, token, page_map) as b:
        assert a.ram.read_bytes() == data
        assert wait_for(lambda: fields(b)["mc_received"] >= 0.9 * fields(a)["mc_received"])
        time.sleep(0.3)                           # the last ranges' expiry
        assert b.ram.read_bytes() == data
        fb = fields(b)
        assert fb["mc_lost"] > 0 and fb["fetch_errors"] == 0, fb
        # b asks again only for what it lost: its faults found the rest in its cache.
        assert 0 < fb["fetch_bytes"] < 0.3 * len(data), fb
        assert server_fields(s)["repair_requests"] == fb["repair_requests"]   # only b's


def test_a_group_that_brings_nothing_is_given_up_for_unicast(server, tmp_path, ram):
    """A network that drops all multicast: after 8 faults that waited in vain,
    memtap asks by unicast only, and says so."""
    s, token = server
    _, page_map, data, _ = ram
    with multicast_loss(ns("b"), 100), memtap(tmp_path, "b", s, token, page_map) as b:
        for p in range(0, 40, 2):
            assert read_pages(b.ram, p, 1) == data[p * PAGE:(p + 1) * PAGE]
        fb = fields(b)
        assert fb["mc_waits"] == 8 and fb["mc_received"] == 0, fb
        assert "unicast only from now on" in b.log_path.read_text()


def test_push_fills_a_memtap_and_then_the_server_may_go(server, tmp_path, ram):
    s, token = server
    _, page_map, data, nonzero = ram
    with memtap(tmp_path, "a", s, token, page_map, push=True) as a:
        assert wait_for(lambda: fields(a)["push_done"] == 1, 30), fields(a)
        s.stop()
        assert a.ram.read_bytes() == data                  # nothing left to ask a server that is gone
        fa = fields(a)
        assert fa["fetch_errors"] == 0 and fa["demand_fetches"] == 0
        assert fa["push_bytes"] == nonzero * PAGE


def test_a_later_memtap_asks_for_the_recorded_working_set_first(server, tmp_path, ram):
    s, token = server
    _, page_map, data, _ = ram
    touched = [5, 6, 7, 300, 301, 700, 900, 901, 902, 1000]
    with memtap(tmp_path, "a", s, token, page_map) as a:
        for p in touched:
            assert read_pages(a.ram, p, 1) == data[p * PAGE:(p + 1) * PAGE]
        first = fields(a)["demand_fetches"]
    ws = tmp_path / "ram.ws"
    assert s.save_working_set("ck1", ws) == len({5, 300, 700, 900, 1000})   # runs: 5-7, 300-301, ...
    with memtap(tmp_path, "b", s, token, page_map, working_set=ws) as b:
        assert wait_for(lambda: fields(b)["prefetch_bytes"] == len(touched) * PAGE)
        for p in touched:
            assert read_pages(b.ram, p, 1) == data[p * PAGE:(p + 1) * PAGE]
        fb = fields(b)
        assert fb["demand_fetches"] < first, (fb, first)
        assert fb["demand_fetches"] == 0


def test_a_working_set_that_does_not_fit_the_checkpoint_is_refused(server, tmp_path, ram):
    s, token = server
    _, page_map, _, _ = ram
    bad = tmp_path / "bad.ws"
    bad.write_bytes(b"SFMWS1\0\0" + (1).to_bytes(4, "little") + bytes(4) + (1 << 40).to_bytes(8, "little") +
                    PAGE.to_bytes(4, "little"))
    tap = Memtap(tmp_path / "memtap-bad", wrap("b"), "ck1")
    try:
        with pytest.raises(Exception, match="not a working set of this checkpoint"):
            tap.start(HOSTS["srv"], s.port, token, page_map, timeout_ms=3000,
                      multicast=Multicast(GROUP, HOSTS["b"]), working_set=bad)
    finally:
        tap.stop()


def test_command_lines_for_multicast(tmp_path):
    argv = memtap_argv(tmp_path / "mnt", "10.0.0.1", 4000, "ck1", tmp_path / "token", tmp_path / "m",
                       tmp_path / "c", 500, 0, Multicast("239.1.2.3:7000", "10.0.0.2", 150), push=True,
                       working_set=tmp_path / "ws")
    assert argv[argv.index("--group") + 1] == "239.1.2.3:7000"
    assert argv[argv.index("--multicast-local") + 1] == "10.0.0.2" and "--push" in argv
    assert argv[argv.index("--working-set") + 1] == str(tmp_path / "ws")
    assert memserver_argv("10.0.0.1", tmp_path / "s", tmp_path / "c", True)[-2:] == ["--multicast-from", "10.0.0.1"]


def test_a_checkpoints_group_is_the_same_everywhere_and_organisation_local():
    from hostd.memory.served import check_group, group_of
    g = group_of("bp-20261202-1")
    assert g == group_of("bp-20261202-1") != group_of("bp-20261202-2")
    assert g.startswith("239.255.") and check_group(g) == g
    port = int(g.rpartition(":")[2])
    assert 20000 <= port < 40000


@pytest.mark.parametrize("bad", ["8.8.8.8:53", "224.0.0.1:7000", "239.1.2.3:7000", "239.255.1.2:0",
                                 "239.255.1.2:70000", "239.255.1.2", "ff02::1:7000", None, 17, "239.255.1.2:x"])
def test_a_group_from_another_host_must_be_one_of_ours(bad):
    from hostd.memory.served import check_group
    from sfmpi.errors import LazyMemoryError
    with pytest.raises(LazyMemoryError, match="not a multicast group of sfmpi"):
        check_group(bad)


def test_served_options_take_only_booleans():
    from hostd.memory.options import ServedOptions
    assert ServedOptions.from_json({"push": True, "multicast": False}) == ServedOptions(True, False)
    assert ServedOptions.from_json({"push": "yes", "multicast": 0}) == ServedOptions(False, True)
    assert ServedOptions.from_json(["push"]) == ServedOptions()
    assert ServedOptions.from_json(ServedOptions(True, False).to_json()) == ServedOptions(True, False)
