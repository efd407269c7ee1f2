"""Clones whose RAM is served: the memory server runs on the far side of a veth
(its own network namespace, standing for the parent's host), memtap here, and
the clones' QEMUs map memtap's file. Its own state directory and hostd, with
SFMPI_CLONE_MEMORY=served, so the clones sfmpirun and sections fork are served too."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time

import pytest

from .conftest import Cli, make_home

pytestmark = pytest.mark.timeout(900)

MiB = 1 << 20
GUEST_MB = 512
PARENT = "sp"


@pytest.fixture(scope="module")
def served(request):
    cli = Cli(make_home("sv"), {"SFMPI_CLONE_MEMORY": "served", "SFMPI_FETCH_TIMEOUT_MS": "3000"})
    try:
        cli("vm", "start", PARENT, "--mem", f"{GUEST_MB}M", "--json")
        # State before any checkpoint: a value in RAM (tmpfs), a file on disk, and
        # 48 MiB of data in RAM that no clone touches until a test makes it.
        cli.exec(PARENT, "echo in-ram-value > /dev/shm/v; echo on-disk > /root/d; "
                         "head -c 50331648 /dev/urandom > /dev/shm/big; sync")
        yield cli
    finally:
        left = cli.teardown(keep_logs=getattr(request.session, "sfmpi_failed", False))
        shutil.rmtree(cli.home, ignore_errors=True)
        assert not left, f"served-memory home left things behind: {left}"


@pytest.fixture(autouse=True)
def no_memtap_left(served):
    """After each test (its clones stopped): no memtap process, no FUSE mount of this home.
    The memory server and its namespace live as long as hostd; the module's teardown checks them."""
    yield
    import psutil
    home = str(served.home)

    def left() -> list[str]:
        procs = [f"memtap {p.pid}" for p in psutil.process_iter(["cmdline"])
                 if "sfmpi.native.memtap" in (p.info["cmdline"] or []) and any(home in a for a in p.info["cmdline"])]
        mounts = [line.split()[1] for line in open("/proc/mounts") if home in line]
        return procs + mounts
    deadline = time.monotonic() + 30
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left(), left()


def memory(cli: Cli) -> dict:
    return cli.json("stats")["memory"]


def memtap_of(cli: Cli, ckpt: str) -> dict | None:
    return next((m for m in memory(cli)["memtaps"] if m["checkpoint"] == ckpt), None)


def qemu_cmdline(cli: Cli, name: str) -> str:
    pid = next(r["pid"] for r in cli.json("vm", "list") if r["name"] == name)
    return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()


def stop_all(cli: Cli, names: list[str]) -> None:
    for n in names:
        cli("vm", "stop", n, check=False)


def test_a_served_clone_is_the_parent_and_moves_a_fraction_of_its_ram(served):
    cli = served
    ck = cli("checkpoint", PARENT).stdout.strip()
    names = cli.json("clone", ck, "-n", "2", "--memory", "served")["clones"]
    try:
        for n in names:
            assert "memtap/" in qemu_cmdline(cli, n) and "share=off" in qemu_cmdline(cli, n)
            out = cli.exec(n, "cat /dev/shm/v /root/d; hostname").stdout.split()
            assert out == ["in-ram-value", "on-disk", n], out
        m = memtap_of(cli, ck)
        assert m is not None and m["alive"] and sorted(m["clones"]) == sorted(names)
        assert m["fetch_errors"] == 0 and m["zero_bytes"] > 0
        # Both clones share memtap's page cache: what they moved together (by unicast, and by the
        # checkpoint's multicast group, MC_FRAG = 1024 payload bytes a datagram) is a fraction of one guest.
        moved = m["fetch_bytes"] + 1024 * m["mc_received"]
        assert 0 < moved < 0.10 * GUEST_MB * MiB, m
        server = memory(cli)["server"]["checkpoints"][ck]
        assert server["zero_pages_asked"] == 0        # zero pages never travel
        # The same bytes on both ends, but for a fetch in flight between the two reads.
        assert abs(server["bytes_sent"] + server["mc_sent_bytes"] - moved) <= MiB
    finally:
        stop_all(cli, names)
    # The last clone takes its memtap along: no mount, no process.
    deadline = time.monotonic() + 30
    while memtap_of(cli, ck) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert memtap_of(cli, ck) is None
    assert not [line for line in open("/proc/mounts") if f"memtap/{ck}" in line]
    cli("checkpoint", "rm", ck)


SECTION = r'''
import json, socket, sfmpi
with sfmpi.parallel(3) as s:
    got = s.gather((s.rank, socket.gethostname()))
print(json.dumps(got))
'''


def test_sfmpirun_and_a_section_fork_served_clones(served):
    cli = served
    before = (memory(cli)["server"] or {}).get("totals", {}).get("requests", 0)
    p = cli.exec(PARENT, "cd /root && sfmpirun -n 4 python3 -c 'from mpi4py import MPI; c = MPI.COMM_WORLD; "
                         "s = c.allreduce(c.rank); print(\"sum\", s) if c.rank == 0 else None'", check=False)
    assert p.returncode == 0 and "sum 6" in p.stdout, p.stdout + p.stderr
    cli.put(PARENT, "/root/section.py", SECTION)
    p = cli.exec(PARENT, "python3 /root/section.py", check=False)
    assert p.returncode == 0, p.stderr
    ranks = json.loads(p.stdout.strip().splitlines()[-1])
    assert [r for r, _ in ranks] == [0, 1, 2] and len({h for _, h in ranks}) == 3
    after = memory(cli)["server"]["totals"]
    assert after["requests"] > before and after["zero_pages_asked"] == 0
    cli.assert_no_clones_left(PARENT)


def _clone_then(cli: Cli, sabotage) -> tuple[str, str, str]:
    """A served clone, then sabotage(stats); then make it fault 48 MiB it never touched.
    Returns the checkpoint, the clone, and what the user saw."""
    ck = cli("checkpoint", PARENT).stdout.strip()
    name = cli.json("clone", ck, "-n", "1", "--memory", "served")["clones"][0]
    assert cli.exec(name, "cat /dev/shm/v").stdout.strip() == "in-ram-value"
    sabotage(memory(cli))
    t0 = time.monotonic()
    p = cli.exec(name, "md5sum /dev/shm/big", check=False)
    took = time.monotonic() - t0
    assert p.returncode != 0 and took < 120, (p.returncode, took)
    return ck, name, p.stdout + p.stderr


def _assert_reported(cli: Cli, name: str, said: str, reason: str) -> None:
    assert "its memory could not be fetched" in said and reason in said, said
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rec = next((r for r in cli.json("vm", "list") if r["name"] == name), None)
        if rec is None or rec["state"] != "running":
            break
        time.sleep(0.5)
    assert rec is None or (rec["state"] == "crashed" and "its memory could not be fetched" in rec["error"]), rec


def test_memory_server_killed_fails_its_clones_clearly(served):
    cli = served
    ck, name, said = _clone_then(cli, lambda st: os.kill(st["server"]["pid"], signal.SIGKILL))
    _assert_reported(cli, name, said, "memory server")
    stop_all(cli, [name])
    # A new clone gets a new server.
    again = cli.json("clone", ck, "-n", "1", "--memory", "served")["clones"]
    assert cli.exec(again[0], "md5sum /dev/shm/big").returncode == 0
    stop_all(cli, again)
    cli("checkpoint", "rm", ck)


def test_memtap_killed_fails_its_clones_clearly(served):
    cli = served
    ck, name, said = _clone_then(
        cli, lambda st: os.kill(next(m["pid"] for m in st["memtaps"]), signal.SIGKILL))
    _assert_reported(cli, name, said, "memtap")
    stop_all(cli, [name])
    assert not [line for line in open("/proc/mounts") if f"memtap/{ck}" in line]
    cli("checkpoint", "rm", ck)


def test_a_stalled_server_fails_the_fault_within_the_timeout(served):
    cli = served
    stopped = []

    def stall(st):
        os.kill(st["server"]["pid"], signal.SIGSTOP)
        stopped.append(st["server"]["pid"])
    try:
        ck, name, said = _clone_then(cli, stall)
        _assert_reported(cli, name, said, "no answer within the timeout")
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    stop_all(cli, [name])
    cli("checkpoint", "rm", ck)
