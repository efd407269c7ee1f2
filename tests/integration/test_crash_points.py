"""hostd killed outright (SIGKILL) at each step of a checkpoint and of a clone
request: the next hostd finds the host consistent, the parent runs on, and
`sfmpi down` leaves nothing (the other_home fixture's leak check)."""
from __future__ import annotations

import pytest

from sfmpi.client import HostdClient, wait_gone

pytestmark = pytest.mark.timeout(1500)

CHECKPOINT_STEPS = [("checkpoint:start", "background"), ("checkpoint:receiver", "background"),
                    ("checkpoint:captured", "background"), ("checkpoint:paused", "paused"),
                    ("checkpoint:described", "paused")]
CLONE_STEPS = ["clone:reserved", "clone:launched", "clone:resumed"]




def stop_hostd(c) -> None:
    """Leave the VMs running, end hostd (the next command starts a new one)."""
    client = HostdClient(c.paths)
    pid = client.call("ping")["pid"]
    client.call("shutdown")
    assert wait_gone(pid)


def crash_at(c, step: str, *command: str) -> None:
    stop_hostd(c)
    crashing = type(c)(c.home, {**{k: v for k, v in c.env.items() if k != "SFMPI_HOME"}, "SFMPI_CRASH_AT": step})
    r = crashing(*command, check=False)
    assert r.returncode != 0 and "closed the connection" in r.stderr, (step, r.stdout, r.stderr)


def consistent(c, parent: str, allowed_clones: set[str] = frozenset()) -> None:
    rows = {r["name"]: r for r in c.json("vm", "list")}     # a new hostd, recovered
    assert rows[parent]["state"] == "running", rows[parent]
    assert set(rows) - {parent} <= allowed_clones, rows
    assert c.exec(parent, "echo alive; touch /root/after-crash").stdout.strip() == "alive"
    for ck in c.json("checkpoint", "ls"):
        assert ck["present"], ck
    assert not list(c.paths.checkpoints.glob(".*.partial"))


def test_hostd_killed_at_each_step(other_home):
    c = other_home()
    parent = "crashy"
    c("vm", "start", parent, "--mem", "256M", "--json")
    base = c.json("checkpoint", parent, "--mode", "paused")["id"]
    for step, mode in CHECKPOINT_STEPS:
        crash_at(c, step, "checkpoint", parent, "--mode", mode)
        consistent(c, parent)
        # The parent can still be checkpointed, and that checkpoint clones.
        ck = c.json("checkpoint", parent, "--mode", "paused")["id"]
        clone = c.json("clone", ck, "-n", "1")["clones"][0]
        assert c.exec(clone, "test -e /root/after-crash && echo ok").stdout.strip() == "ok"
        c("vm", "stop", clone)
        c("checkpoint", "rm", ck)
    for step in CLONE_STEPS:
        crash_at(c, step, "clone", base, "-n", "2")
        consistent(c, parent)
        clones = c.json("clone", base, "-n", "2")["clones"]
        for name in clones:
            assert c.exec(name, "echo up").stdout.strip() == "up"
            c("vm", "stop", name)
