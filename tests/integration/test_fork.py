"""Boot, exec, checkpoint, clone: the fork of a running VM on one host."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.timeout(900)

MEMORY_MARK = "lives-only-in-guest-ram"
DISK_MARK = "written-to-disk-before-checkpoint"
PROC_MARK = "sfmpi-test-sleeper"


def test_exec_streams_output_and_returns_exit_code(cli, parent):
    p = cli.exec(parent, "echo to-stdout; echo to-stderr >&2; exit 3", check=False)
    assert p.returncode == 3
    assert p.stdout == "to-stdout\n"
    assert p.stderr == "to-stderr\n"


@pytest.fixture(scope="module")
def checkpoint(cli, parent) -> dict:
    # State in guest RAM only (tmpfs), on the guest disk, and a running process.
    cli.exec(parent, f"echo {MEMORY_MARK} > /dev/shm/mark; echo {DISK_MARK} > /root/mark; sync; "
                     f"setsid sh -c 'exec -a {PROC_MARK} sleep 100000' >/dev/null 2>&1 < /dev/null &")
    ck = cli.json("checkpoint", parent)
    assert ck["mode"] == "background"
    return ck


@pytest.fixture(scope="module")
def clones(cli, checkpoint) -> list[str]:
    res = cli.json("clone", checkpoint["id"], "-n", "4")
    assert res["granted"] == 4 and len(res["clones"]) == 4
    yield res["clones"]
    for name in res["clones"]:
        cli("vm", "stop", name, check=False)


def test_checkpoint_reports_a_short_pause_and_a_sparse_ram_file(checkpoint):
    assert checkpoint["pause_ms"] > 0
    assert checkpoint["ram_mb"] == 512
    # Zero pages are holes: far less than 512 MiB is allocated.
    assert checkpoint["ram_allocated_mb"] < 400


def test_clones_are_listed_with_their_checkpoint(cli, checkpoint, clones):
    rows = {r["name"]: r for r in cli.json("vm", "list")}
    for name in clones:
        assert rows[name]["role"] == "clone"
        assert rows[name]["state"] == "running"
        assert rows[name]["checkpoint"] == checkpoint["id"]
    assert rows["parent"]["state"] == "running"


def test_every_clone_has_the_parent_state_at_checkpoint_time(cli, clones):
    for name in clones:
        p = cli.exec(name, f"cat /dev/shm/mark /root/mark; pgrep -f {PROC_MARK} >/dev/null && echo proc-alive")
        assert p.stdout.split() == [MEMORY_MARK, DISK_MARK, "proc-alive"], name


def test_clones_diverge_privately(cli, parent, clones):
    for name in clones:
        cli.exec(name, f"echo {name} > /root/own; echo {name} > /dev/shm/own; sync")
    for name in clones:
        p = cli.exec(name, "cat /root/own /dev/shm/own")
        assert p.stdout.split() == [name, name]
    p = cli.exec(parent, "ls /root/own /dev/shm/own 2>&1; true")
    assert "No such file" in p.stdout and p.stdout.count("No such file") == 2


def test_checkpoint_is_reusable_after_the_parent_changed(cli, parent, checkpoint, clones):
    cli.exec(parent, "echo after > /root/after-checkpoint; sync")
    res = cli.json("clone", checkpoint["id"], "-n", "1")
    (late,) = res["clones"]
    try:
        p = cli.exec(late, "cat /root/mark; ls /root/after-checkpoint 2>&1; true")
        assert DISK_MARK in p.stdout and "No such file" in p.stdout
    finally:
        cli("vm", "stop", late)
    # A new checkpoint sees the change.
    ck2 = cli.json("checkpoint", parent)
    res = cli.json("clone", ck2["id"], "-n", "1")
    try:
        assert cli.exec(res["clones"][0], "cat /root/after-checkpoint").stdout == "after\n"
    finally:
        cli("vm", "stop", res["clones"][0])


def test_checkpoint_while_the_guest_kernel_loads_modules(cli, parent):
    """Module loading patches kernel code: under TCG, pre-copy's dirty tracking
    missed those writes and clones panicked. The default mode must survive it."""
    cli.exec(parent, "setsid sh -c 'while true; do modprobe sha512_ssse3; modprobe -r sha512_ssse3; done' "
                     ">/dev/null 2>&1 </dev/null & echo $! > /root/modloop")
    try:
        for _ in range(2):
            ck = cli.json("checkpoint", parent)
            (name,) = cli.json("clone", ck["id"], "-n", "1")["clones"]
            try:
                assert cli.exec(name, "sleep 2; echo alive").stdout == "alive\n"
            finally:
                cli("vm", "stop", name)
    finally:
        cli.exec(parent, "kill -- -$(cat /root/modloop); rm /root/modloop")


@pytest.mark.parametrize("mode", ["precopy", "paused"])
def test_other_checkpoint_modes_on_a_settled_guest(cli, parent, mode):
    cli.exec(parent, f"echo {mode}-mode > /dev/shm/{mode}")
    ck = cli.json("checkpoint", parent, "--mode", mode)
    assert ck["mode"] == mode and ck["pause_ms"] > 0
    res = cli.json("clone", ck["id"], "-n", "1")
    try:
        assert cli.exec(res["clones"][0], f"cat /dev/shm/{mode}").stdout == f"{mode}-mode\n"
    finally:
        cli("vm", "stop", res["clones"][0])
    # The parent runs on after any kind of checkpoint.
    assert cli.exec(parent, f"cat /dev/shm/{mode}").stdout == f"{mode}-mode\n"


def test_a_clone_can_be_checkpointed_and_cloned_again(cli, clones):
    """A clone's RAM is copy-on-write: the default mode for it is `paused`, and
    its own clones (started with only the boot ROM, like every clone) carry its
    state and the parent's."""
    first = clones[0]
    cli.exec(first, "echo of-the-clone > /dev/shm/gen2; echo on-disk > /root/gen2; sync")
    refused = cli("checkpoint", first, "--mode", "background", check=False)
    assert refused.returncode != 0
    assert f"VM {first} is a clone" in refused.stderr and "--mode paused" in refused.stderr
    ck = cli.json("checkpoint", first)
    assert ck["mode"] == "paused"
    res = cli.json("clone", ck["id"], "-n", "1")
    (grandchild,) = res["clones"]
    try:
        p = cli.exec(grandchild, "cat /dev/shm/gen2 /root/gen2 /dev/shm/mark /root/mark")
        assert p.stdout.split() == ["of-the-clone", "on-disk", MEMORY_MARK, DISK_MARK]
    finally:
        cli("vm", "stop", grandchild)
