"""Resource settings, the cgroup probe, traffic limits' text and the PI controller (no VM)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfmpi.cli_stats import parse_since, rates
from sfmpi.errors import UsageError
from sfmpi.hostd.control.loops import checked_params, parse_target
from sfmpi.hostd.control.pi import PI, Gains
from sfmpi.hostd.monitor.devices import parse_net_dev
from sfmpi.hostd.resources import settings as S
from sfmpi.hostd.resources import traffic
from sfmpi.hostd.resources.cgroups import Layout, VmCgroups, cpu_files, memory_files, probe

V1_MOUNTS = """tmpfs /sys/fs/cgroup tmpfs rw 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
V2_MOUNTS = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n"


def test_settings_parse_bound_and_clear():
    got = S.parse_changes({"cpu_limit": "25", "mem_limit": "384M", "net_rate": "10mbit", "disk_iops": "50",
                           "disk_bps": "1048576", "priority": "high", "cpu_shares": "none"}, cpus=1)
    assert got == {"cpu_limit": 25.0, "mem_limit": 384 << 20, "net_rate": 10_000_000, "disk_iops": 50,
                   "disk_bps": 1 << 20, "priority": "high", "cpu_shares": None}
    assert S.parse_rate("2MB/s") == 2 * (1 << 20) * 8 and S.parse_rate("500kbit") == 500_000
    assert S.parse_rate("8000") == 8000
    for bad, says in [({"cpu_limit": "150"}, "1-100 for a VM of 1"), ({"cpu_limit": "nan"}, "not a number"),
                      ({"cpu_shares": "1"}, "2-262144"), ({"disk_iops": "2.5"}, "whole number"),
                      ({"net_rate": "fast"}, "as a rate"), ({"mem_limit": "1M"}, "--mem-limit must be"),
                      ({"priority": "urgent"}, "low, normal or high"), ({"color": "red"}, "unknown setting")]:
        with pytest.raises(UsageError, match=says):
            S.parse_changes(bad, cpus=1)
    assert S.parse_changes({"cpu_limit": "150"}, cpus=2) == {"cpu_limit": 150.0}
    assert S.merged({"cpu_limit": 25.0, "priority": "low"}, {"cpu_limit": None, "disk_iops": 9}) == \
        {"priority": "low", "disk_iops": 9}


def test_priorities_are_vsphere_shares_and_explicit_shares_win():
    assert [S.effective_shares({"priority": p}, 1) for p in ("low", "normal", "high")] == [500, 1000, 2000]
    assert S.effective_shares({"priority": "high"}, 2) == 4000
    assert S.effective_shares({"priority": "high", "cpu_shares": 64}, 1) == 64
    assert S.effective_shares({}, 1) is None


def test_stored_settings_are_checked_like_input():
    assert S.validate_stored({"cpu_limit": 40.0, "disk_iops": 500}, 1) == {"cpu_limit": 40.0, "disk_iops": 500}
    with pytest.raises(UsageError):
        S.validate_stored({"cpu_limit": 4000}, 1)
    with pytest.raises(UsageError):
        S.validate_stored(["cpu_limit"], 1)


def test_probe_v1_refuses_a_controller_held_by_someone_else():
    own = "4:memory:/process_api/abc\n1:cpu:/\n0::/\n"
    layout = probe(V1_MOUNTS, own)
    assert layout.hierarchies["cpu"].version == 1 and layout.hierarchies["cpu"].mount == "/sys/fs/cgroup/cpu"
    with pytest.raises(UsageError, match="memory cgroup controller: hostd runs in the memory cgroup /process_api/abc"):
        layout.require("memory", "--mem-limit")
    assert "memory" in probe(V1_MOUNTS, "4:memory:/\n1:cpu:/\n").hierarchies


def test_probe_v2_needs_the_controller_enabled_for_children():
    def ctl(enabled):
        return lambda parent: ({"cpu", "memory", "io"}, enabled)
    layout = probe(V2_MOUNTS, "0::/user.slice\n", None, ctl({"cpu", "memory"}))
    assert {h.version for h in layout.hierarchies.values()} == {2}
    layout = probe(V2_MOUNTS, "0::/\n", "/sfmpi.slice", ctl({"memory"}))
    with pytest.raises(UsageError, match="cpu is not enabled for the children of /sfmpi.slice"):
        layout.require("cpu", "--cpu-limit")
    layout = probe(V2_MOUNTS, "0::/\n", None, lambda parent: ({"memory"}, {"memory"}))
    with pytest.raises(UsageError, match="has no cpu controller"):
        layout.require("cpu", "--cpu-limit")
    with pytest.raises(UsageError, match="no cgroup hierarchy on this host has the cpu"):
        probe("", "").require("cpu", "--cpu-limit")


def test_cgroup_files_v1_and_v2():
    assert cpu_files(1, 2000, 25.0) == {"cpu.shares": "2000", "cpu.cfs_period_us": "100000",
                                        "cpu.cfs_quota_us": "25000"}
    assert cpu_files(1, None, None)["cpu.cfs_quota_us"] == "-1"
    assert cpu_files(2, 2048, 150.0) == {"cpu.weight": "200", "cpu.max": "150000 100000"}
    assert cpu_files(2, None, None) == {"cpu.weight": "100", "cpu.max": "max 100000"}
    assert memory_files(1, 1 << 28) == {"memory.limit_in_bytes": str(1 << 28)}
    assert memory_files(2, None) == {"memory.max": "max"}


def test_vm_cgroups_are_made_and_removed_only_under_sfmpis_own(tmp_path):
    """A directory stands for a v2 hierarchy: what sfmpi writes, and that it removes only its own."""
    from sfmpi.hostd.resources.cgroups import Hierarchy
    (tmp_path / "someone-else").mkdir()
    h = Hierarchy("cpu", 2, str(tmp_path), "/")
    cgs = VmCgroups("t1", Layout({"cpu": h}, {}))
    cg = cgs.place(h, "web", 4242, cpu_files(2, 2048, 50.0))
    assert cg == tmp_path / "sfmpi-t1" / "web"
    assert (cg / "cpu.max").read_text() == "50000 100000" and (cg / "cgroup.procs").read_text() == "4242"
    assert (tmp_path / "sfmpi-t1" / "cgroup.subtree_control").read_text() == "+cpu"
    for f in cg.iterdir():     # a real cgroup's files vanish with it; here they are plain files
        f.unlink()
    assert cgs.remove("web") == [] and not cg.exists()
    (tmp_path / "sfmpi-t1" / "cgroup.subtree_control").unlink()
    assert cgs.remove_all() == [] and not (tmp_path / "sfmpi-t1").exists()
    assert (tmp_path / "someone-else").exists()


def test_traffic_limits_text():
    assert traffic.tbf_argv("sft1x0", 8_000_000)[:6] == ["tc", "qdisc", "replace", "dev", "sft1x0", "root"]
    assert traffic.burst_bytes(8000) == 3 * 1514            # a low rate still passes whole frames
    script = traffic.ingress_script("sft1x0", 8_000_000)
    assert "hook ingress device \"sft1x0\"" in script and "limit rate over 1000000 bytes/second" in script
    assert traffic.ingress_script("sft1x0", None) == ("add table netdev sfmpi_rate_sft1x0\n"
                                                      "delete table netdev sfmpi_rate_sft1x0\n")


def plant(u: float, loaded: bool) -> tuple[float, float]:
    """The high VM's share of one contended core when the best-effort VM, limited to u, also burns."""
    be = min(u, 50.0) if loaded else 0.0
    return 100.0 - be, be


def run(pi: PI, target: float, periods: int, load_from: int, load_to: int):
    y, used, out = 100.0, 0.0, []
    for k in range(periods):
        s = pi.step(y, target, used)
        y, used = plant(s.actuation, load_from <= k < load_to)
        out.append((y, s))
    return out


def test_pi_step_response_settles_without_overshoot_and_releases():
    out = run(PI(Gains(0.5, 0.6)), 70.0, 40, 5, 30)
    ys = [y for y, _ in out]
    assert ys[:5] == [100.0] * 5 and ys[5] == 50.0          # the load step: the high class misses
    settled = next(k for k in range(5, 30) if all(abs(y - 70) <= 3.5 for y in ys[k:30]))
    assert settled - 5 <= 10
    assert max(ys[6:30]) <= 70 * 1.2
    assert ys[-1] == 100.0 and out[-1][1].note == "released" and out[-1][1].actuation == 100.0


def test_pi_anti_windup_releases_at_once():
    pi = PI(Gains(0.5, 0.6, u_min=5, u_max=100))
    for _ in range(50):                 # a target it cannot reach: clamped at the floor
        s = pi.step(10.0, 90.0, 60.0)
    assert s.actuation == 5 and "anti-windup" in s.note
    held = pi.integral
    s = pi.step(100.0, 90.0, 5.0)       # met at last: it rises at once, not after unwinding 50 periods
    assert s.actuation > 5 and pi.integral <= held
    assert pi.step(None, 90.0).note.startswith("no measurement")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.floats(0, 400)), min_size=1, max_size=40), st.floats(1, 100),
       st.floats(0, 5), st.floats(0, 5))
def test_pi_output_always_within_its_bounds(measurements, target, kp, ki):
    pi = PI(Gains(kp, ki, 5.0, 100.0))
    for m in measurements:
        s = pi.step(m, target, 30.0)
        assert 5.0 <= s.actuation <= 100.0


def test_control_targets_and_parameters():
    assert parse_target("cpu_percent=60") == ("cpu_percent", 60.0)
    assert parse_target("cpu_percent >= 75.5") == ("cpu_percent", 75.5)
    assert parse_target("p95_ms<=250") == ("p95_ms", 250.0)
    for bad in ("cpu_percent", "speed=3", "cpu_percent=0", "cpu_percent=6401", "p95_ms=0", "p95_ms=700000"):
        with pytest.raises(UsageError):
            parse_target(bad)
    assert checked_params({"kp": 1})["kp"] == 1.0
    for bad in ({"kp": -1}, {"period_s": 0.1}, {"min_limit": 50, "max_limit": 40}, {"ki": True}, {"x": 1}):
        with pytest.raises(UsageError):
            checked_params(bad)


def test_since_and_rates():
    assert parse_since("90s", now=1000.0) == 910.0 and parse_since("2h", now=10_000.0) == 2800.0
    assert parse_since("1796000000") == 1796000000.0
    with pytest.raises(UsageError, match="not a time"):
        parse_since("yesterday")
    base = {"cpu_percent": 1.0, "vcpu_percent": [], "mem_pss_bytes": 0, "vm": "a"}
    rows = rates([{**base, "at": 0.0, "disk_read_bytes": 0, "disk_write_bytes": 0, "net_rx_bytes": 10,
                   "net_tx_bytes": 0},
                  {**base, "at": 2.0, "disk_read_bytes": 4 << 20, "disk_write_bytes": 0, "net_rx_bytes": 5,
                   "net_tx_bytes": 0}])
    assert rows[0]["disk_read_bps"] is None and rows[1]["disk_read_bps"] == 2 << 20
    assert rows[1]["net_rx_bps"] is None          # a counter that went back: the VM restarted


def test_net_dev_is_the_guests_view():
    text = ("Inter-|   Receive                            |  Transmit\n"
            " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets ...\n"
            "sft1x0:  1000 10 0 0 0 0 0 0  5000 50 0 0 0 0 0 0\n"
            "    lo: 1 1 0 0 0 0 0 0 1 1 0 0 0 0 0 0\n")
    assert parse_net_dev(text)["sft1x0"] == {"net_tx_bytes": 1000, "net_rx_bytes": 5000}


class FakeVms:
    def record(self, name):
        return object() if name in ("be", "hi") else None


class FakeResources:
    def __init__(self):
        self.limits: dict[str, float | None] = {}

    def check_host(self, _settings):
        pass

    def limit_cpu(self, vm, limit):
        self.limits[vm] = limit


class FakePools:
    """One pool, web, whose p95 the test sets period by period."""
    def __init__(self):
        self.p95: float | None = None
        self.asked: list[tuple[str, float, float]] = []

    def exists(self, name):
        return name == "web"

    def p95_ms(self, name, since, until):
        self.asked.append((name, since, until))
        return self.p95


def control_loops(tmp_path):
    from sfmpi.hostd.control.loops import ControlLoops
    from sfmpi.hostd.monitor.history import StatsHistory
    now = [1_000.0]
    loops = ControlLoops(FakeVms(), StatsHistory(tmp_path / "stats.db"), FakeResources(), clock=lambda: now[0],
                         pools=FakePools())
    return loops, now


def test_a_pools_p95_is_a_target_held_by_limiting_best_effort_vms(tmp_path):
    import asyncio
    loops, now = control_loops(tmp_path)

    async def setup():
        await loops.add("pool:web", "high", "p95_ms=200", params={"period_s": 2})
        await loops.add("be", "best-effort", None)
        for g in loops.groups.values():      # stepped by hand below, not by the loop's task
            await loops._cancel(g)
    asyncio.run(setup())
    pools, res = loops.pools, loops.resources
    pools.p95 = 600.0                        # three times its target: the best-effort VM is limited
    row = loops.step("default")
    assert row["measurement"] == 600.0 and row["target"] == 200.0 and row["error"] == pytest.approx(200.0)
    assert pools.asked[-1] == ("web", now[0] - 2, now[0])
    first = res.limits["be"]
    assert first is not None and first < 100
    now[0] += 2
    loops.step("default")
    assert res.limits["be"] <= first         # still short: no looser
    for _ in range(30):                      # no request any more: nothing waits, the limit unwinds
        pools.p95 = None
        now[0] += 2
        row = loops.step("default")
    assert res.limits["be"] is None and row["measurement"] == 0.0 and row["note"] == "released"
    assert [s["measurement"] for s in loops.history.steps("default")][:2] == [600.0, 600.0]


def test_pool_members_are_checked(tmp_path):
    import asyncio
    from sfmpi.errors import NotFound
    loops, _now = control_loops(tmp_path)

    async def fails(*args, says, kind=UsageError):
        with pytest.raises(kind, match=says):
            await loops.add(*args)

    async def all_of_them():
        await fails("pool:nosuch", "high", "p95_ms=200", says="no pool named 'nosuch'", kind=NotFound)
        await fails("pool:web", "best-effort", None, says="is a high-class member")
        await fails("pool:web", "high", "cpu_percent=50", says="cpu_percent is a target for a VM")
        await fails("hi", "high", "p95_ms=200", says="p95_ms is a target for a pool")
    asyncio.run(all_of_them())
    assert loops.groups == {}
