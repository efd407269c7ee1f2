"""Multicast memory on a lab of 3 (docs/memory.md): lab1's memory server
answers the clones' faults by the checkpoint's multicast group, so every clone
host gets each range once; loss into one host is repaired by unicast; a push
makes clones independent of the server; a later fork's memtaps ask for the
working set the first fork recorded before their clones fault. Every clone
checks a checksum of what the parent wrote before the fork."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.netloss import multicast_loss

from .test_lab_fork import lab_of, sfmpi

pytestmark = [pytest.mark.lab, pytest.mark.timeout(1200)]

BIG_MB = 48


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with lab_of(tmp_path_factory, "labmem") as env:
        sfmpi("vm", "start", "p", "--mem", "256M", host="lab1", env=env)
        sfmpi("vm", "exec", "p", "--", "sh", "-c", f"head -c {BIG_MB}M /dev/urandom > /dev/shm/big", host="lab1",
              env=env)
        want = sfmpi("vm", "exec", "p", "--", "md5sum", "/dev/shm/big", host="lab1", env=env).stdout.split()[0]
        yield env, want


def stats(env, host) -> dict:
    return json.loads(sfmpi("stats", "--json", host=host, env=env).stdout)["memory"]


def md5_in(env, name, host) -> str:
    return sfmpi("vm", "exec", name, "--", "md5sum", "/dev/shm/big", host=host, env=env, timeout=400).stdout.split()[0]


def fork(env, n, *extra) -> dict:
    ck = sfmpi("checkpoint", "p", host="lab1", env=env).stdout.strip()
    return {"ck": ck, **json.loads(sfmpi("clone", ck, "-n", str(n), *extra, "--json", host="lab1", env=env).stdout)}


def stop(env, res) -> None:
    for name, host in res["hosts"].items():
        sfmpi("vm", "stop", name, host=host, env=env)
    sfmpi("checkpoint", "rm", res["ck"], host="lab1", env=env)


def checkpoint_counters(env, ck) -> dict:
    return stats(env, "lab1")["server"]["checkpoints"][ck]


def memtap_of(env, host, ck) -> dict:
    (tap,) = [m for m in stats(env, host)["memtaps"] if m["checkpoint"] == ck]
    return tap


def test_six_clones_over_three_hosts_get_each_range_once(lab):
    env, want = lab
    res = fork(env, 6)
    assert res["placement"] == {"lab1": 2, "lab2": 2, "lab3": 2}
    try:
        for name, host in res["hosts"].items():
            assert md5_in(env, name, host) == want
        server = checkpoint_counters(env, res["ck"])
        taps = {h: memtap_of(env, h, res["ck"]) for h in ("lab2", "lab3")}
        got = sum(t["mc_received"] * 1024 + t["fetch_bytes"] for t in taps.values())
        egress = server["mc_sent_bytes"] + server["bytes_sent"]
        # Each non-zero range sent at most once, plus repairs and the pages a host
        # that joined later asked again; far less than every host's share by unicast.
        assert server["mc_distinct_bytes"] >= BIG_MB << 20
        assert egress <= 1.3 * server["mc_distinct_bytes"] + server["repair_bytes"], server
        assert egress < 0.7 * got, (server, taps)
        for h, t in taps.items():
            assert t["mc_ranges"] > 0 and t["mc_invalid"] == 0 and t["fetch_errors"] == 0, (h, t)
            assert t["mc_stored_bytes"] > 0, (h, t)        # into that host's page cache
    finally:
        stop(env, res)


def test_loss_into_one_host_is_repaired(lab):
    """5% of the group's datagrams into lab3 are dropped (nftables: this kernel
    has no netem): its clones are still right, and its memtap counts repairs."""
    env, want = lab
    with multicast_loss("lab3", 5):
        res = fork(env, 3)
        try:
            by_host = {h: n for n, h in res["hosts"].items()}
            assert md5_in(env, by_host["lab2"], "lab2") == want      # lab2 faults it all, lab3 overhears
            assert md5_in(env, by_host["lab3"], "lab3") == want
            t3 = memtap_of(env, "lab3", res["ck"])
            assert t3["mc_lost"] > 0 and t3["fetch_errors"] == 0, t3
            assert t3["repair_requests"] > 0 or t3["demand_fetches"] > 0, t3
            assert checkpoint_counters(env, res["ck"])["repair_requests"] >= t3["repair_requests"]
        finally:
            stop(env, res)


def test_after_the_push_the_memory_server_may_die(lab):
    env, want = lab
    res = fork(env, 3, "--push")
    try:
        by_host = {h: n for n, h in res["hosts"].items()}
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not all(memtap_of(env, h, res["ck"])["push_done"]
                                                      for h in ("lab2", "lab3")):
            time.sleep(1)
        taps = {h: memtap_of(env, h, res["ck"]) for h in ("lab2", "lab3")}
        assert all(t["push_done"] == 1 for t in taps.values()), taps
        os.kill(stats(env, "lab1")["server"]["pid"], signal.SIGKILL)
        for host in ("lab2", "lab3"):
            assert md5_in(env, by_host[host], host) == want
        running = {r["name"] for r in json.loads(sfmpi("vm", "list", "--all", "--json", env=env).stdout)
                   if r["state"] == "running"}
        assert set(res["hosts"]) <= running
        for h in ("lab2", "lab3"):
            assert memtap_of(env, h, res["ck"])["fetch_errors"] == 0
    finally:
        stop(env, res)


def _wait_working_set(env, ck) -> None:
    """lab1 saves what the fork's clones faulted once the last of them is gone
    (lab2 tells it so a moment after the stop)."""
    (row,) = [r for r in json.loads(sfmpi("checkpoint", "ls", "--json", host="lab1", env=env).stdout)
              if r["id"] == ck]
    path = Path(row["path"]) / "ram.ws"
    deadline = time.monotonic() + 60
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert path.exists(), f"no working set was saved at {path}"


def test_the_second_fork_faults_fewer_ranges_than_the_first(lab):
    env, want = lab
    ck = sfmpi("checkpoint", "p", host="lab1", env=env).stdout.strip()
    faults = []
    try:
        for _ in range(2):
            res = json.loads(sfmpi("clone", ck, "-n", "2", "--json", host="lab1", env=env).stdout)
            on2 = next(n for n, h in res["hosts"].items() if h == "lab2")
            assert md5_in(env, on2, "lab2") == want
            tap = memtap_of(env, "lab2", ck)
            faults.append(tap)
            for name, host in res["hosts"].items():
                sfmpi("vm", "stop", name, host=host, env=env)
            _wait_working_set(env, ck)
        first, second = faults
        assert first["prefetch_bytes"] == 0 and second["prefetch_bytes"] > 0, (first, second)
        assert second["demand_fetches"] < first["demand_fetches"], (first["demand_fetches"],
                                                                     second["demand_fetches"])
    finally:
        sfmpi("checkpoint", "rm", ck, host="lab1", env=env)
