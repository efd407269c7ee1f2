"""The libvirt driver (issue 21): hostd with SFMPI_DRIVER=libvirt runs every VM
as a transient domain of its private libvirtd (booted from the sfmpi image
under TCG here). The direct driver's fork tests hold on it: state inherited,
private divergence, the clone API from inside the guest, sfmpirun -n 4, clones
whose RAM memtap serves. virsh
sees parent and clones by name; a domain destroyed behind hostd's back is a
crashed VM; after `sfmpi down` no domain, daemon or mount is left."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from sfmpi.hostd.vm.libvirt.domain import domain_name
from tests.integration.conftest import Cli, make_home
from tests.integration.test_clone_api import REPORT_PROGRAM, SHELL_PROGRAM
from tests.integration.test_sfmpirun import EXAMPLES, PI_LINE

pytestmark = [pytest.mark.libvirt, pytest.mark.timeout(1200)]

MEMORY_MARK = "lives-only-in-guest-ram"
DISK_MARK = "written-to-disk-before-checkpoint"


@pytest.fixture(scope="module")
def lv(request):
    home = make_home("lv")
    c = Cli(home, {"SFMPI_DRIVER": "libvirt"})
    yield c
    left = c.teardown(keep_logs=getattr(request.session, "sfmpi_failed", False))
    shutil.rmtree(home, ignore_errors=True)
    assert not left, f"sfmpi down left things behind: {left}"


def virsh(cli: Cli, *args: str, check: bool = True) -> str:
    uri = f"qemu+unix:///system?socket={cli.home / 'libvirt' / 'run' / 'libvirt-sock'}"
    return subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, check=check,
                          timeout=60).stdout


def domains(cli: Cli) -> list[str]:
    return sorted(virsh(cli, "list", "--name").split())


def dom(cli: Cli, vm: str) -> str:
    return domain_name(cli.paths.tag, vm)


@pytest.fixture(scope="module")
def parent(lv) -> str:
    lv("vm", "start", "lvp", "--mem", "512M", "--json")
    return "lvp"


@pytest.fixture(scope="module")
def clones(lv, parent) -> list[str]:
    lv.exec(parent, f"echo {MEMORY_MARK} > /dev/shm/mark; echo {DISK_MARK} > /root/mark; sync")
    ck = lv.json("checkpoint", parent)
    res = lv.json("clone", ck["id"], "-n", "2")
    assert res["granted"] == 2
    yield res["clones"]
    for name in res["clones"]:
        lv("vm", "stop", name, check=False)


def test_the_parent_is_a_transient_domain_seen_by_virsh(lv, parent):
    assert domains(lv) == [dom(lv, parent)]
    info = dict(line.split(":", 1) for line in virsh(lv, "dominfo", dom(lv, parent)).splitlines() if ":" in line)
    assert info["Max memory"].strip() == "524288 KiB" and info["State"].strip() == "running"
    assert info["Persistent"].strip() == "no"
    pid = int((lv.home / "libvirt" / "run" / "qemu" / f"{dom(lv, parent)}.pid").read_text())
    assert {r["name"]: r for r in lv.json("vm", "list")}[parent]["pid"] == pid


def test_clones_are_domains_with_the_parents_state_that_diverge_privately(lv, parent, clones):
    assert domains(lv) == sorted(dom(lv, n) for n in [parent, *clones])
    for name in clones:
        info = virsh(lv, "dominfo", dom(lv, name))
        assert re.search(r"^Max memory:\s+524288 KiB$", info, re.M), info
        assert lv.exec(name, "cat /dev/shm/mark /root/mark").stdout.split() == [MEMORY_MARK, DISK_MARK]
        lv.exec(name, f"echo {name} > /root/own; echo {name} > /dev/shm/own; sync")
    for name in clones:
        assert lv.exec(name, "cat /root/own /dev/shm/own").stdout.split() == [name, name]
    assert lv.exec(parent, "ls /root/own /dev/shm/own 2>&1; true").stdout.count("No such file") == 2


def test_a_destroyed_domain_is_a_crashed_vm_and_its_domain_is_gone(lv, parent, clones):
    victim = clones[-1]
    virsh(lv, "destroy", dom(lv, victim))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = {r["name"]: r for r in lv.json("vm", "list")}[victim]
        if row["state"] == "crashed":
            break
        time.sleep(0.3)
    assert row["state"] == "crashed" and "QEMU exited" in row["error"], row
    assert dom(lv, victim) not in domains(lv)
    assert lv.exec(parent, "echo alive").stdout == "alive\n"   # nothing else is touched
    for name in clones:   # the crashed record too: the clone API's tests count the parent's clones
        lv("vm", "stop", name)
    assert domains(lv) == [dom(lv, parent)]


def test_the_clone_api_from_inside_the_guest(lv, parent):
    lv.put(parent, "/root/report.py", REPORT_PROGRAM)
    p = lv.exec(parent, "cd /root && python3 report.py", check=False)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["granted"] == 3 and out["statuses"] == {"1": 1, "2": 2, "3": 3}
    for r in out["reports"]:
        assert (r["variable"], r["tmp"], r["disk"], r["held"]) == (out["secret"],) * 4
    assert out["parent_sees_clone_file"] is False
    lv.put(parent, "/root/fork.sh", SHELL_PROGRAM)
    p = lv.exec(parent, "sh /root/fork.sh", check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("\n")[:2] == ["1 11", "2 12"]
    lv.assert_no_clones_left(parent)
    assert [d for d in domains(lv) if d.startswith(dom(lv, parent) + "-")] == \
        [dom(lv, n) for n in lv.clones_of(parent)]


def test_sfmpirun_on_libvirt_clones(lv, parent):
    lv.put(parent, "/root/cpi.c", (EXAMPLES / "cpi.c").read_text())
    lv.exec(parent, "cd /root && mpicc.mpich -O2 -o cpi_mpich cpi.c -lm")
    p = lv.exec(parent, "cd /root && sfmpirun -n 4 ./cpi_mpich 100000", check=False)
    assert p.returncode == 0, p.stderr
    assert PI_LINE.search(p.stdout).group(1).startswith("3.14159")
    hosts = re.findall(r"^rank (\d) of 4 on (\S+)$", p.stdout, re.M)
    assert sorted(r for r, _ in hosts) == ["0", "1", "2", "3"] and len({h for _, h in hosts}) == 4
    lv.assert_no_clones_left(parent)


def _memtap(cli: Cli, ckpt: str) -> dict | None:
    return next((m for m in cli.json("stats")["memory"]["memtaps"] if m["checkpoint"] == ckpt), None)


def _libvirtd_pid(cli: Cli) -> int:
    return int((cli.home / "libvirt" / "run" / "libvirtd.pid").read_text())


def test_served_clones_map_memtaps_file_mounted_after_libvirtd_started(lv, parent):
    """memtap mounts the RAM file in hostd's namespace once libvirtd runs: the
    mount reaches libvirtd's QEMUs, and its unmount goes from there too."""
    lv.exec(parent, "echo served-by-memtap > /dev/shm/served; sync")
    ck = lv("checkpoint", parent).stdout.strip()
    names = lv.json("clone", ck, "-n", "2", "--memory", "served")["clones"]
    libvirtd_mounts = Path(f"/proc/{_libvirtd_pid(lv)}/mounts")
    try:
        assert set(dom(lv, n) for n in names) <= set(domains(lv))
        assert f"memtap/{ck}" in libvirtd_mounts.read_text()
        for n in names:
            out = lv.exec(n, "cat /dev/shm/served; hostname").stdout.split()
            assert out == ["served-by-memtap", n], out
        m = _memtap(lv, ck)
        assert m is not None and m["alive"] and sorted(m["clones"]) == sorted(names), m
        assert m["fetch_errors"] == 0 and m["fetch_bytes"] + m["mc_received"] > 0, m
    finally:
        for n in names:
            lv("vm", "stop", n, check=False)
    deadline = time.monotonic() + 30
    while _memtap(lv, ck) is not None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _memtap(lv, ck) is None
    assert f"memtap/{ck}" not in Path("/proc/self/mounts").read_text()
    assert f"memtap/{ck}" not in libvirtd_mounts.read_text()
    lv("checkpoint", "rm", ck)
    assert domains(lv) == [dom(lv, parent)]


def _shut_hostd_down(cli: Cli) -> None:
    """End hostd and keep its VMs (as a hostd restart does)."""
    from sfmpi.client import HostdClient
    HostdClient(cli.paths).call("shutdown")
    deadline = time.monotonic() + 10
    while (cli.home / "hostd.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.1)


def test_a_restarted_hostd_keeps_its_driver_and_reattaches_to_its_domains(lv, parent):
    assert (lv.home / "driver").read_text() == "libvirt\n"
    _shut_hostd_down(lv)
    assert dom(lv, parent) in domains(lv)            # libvirtd and its domains outlive hostd
    on_demand = {k: v for k, v in lv.env.items() if k != "SFMPI_DRIVER"}
    refused = subprocess.run(["sfmpi", "vm", "list"], env={**on_demand, "SFMPI_DRIVER": "direct"},
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "runs the libvirt driver until `sfmpi down`" in refused.stderr, refused.stderr
    # Started on demand without SFMPI_DRIVER: the state directory's driver, re-attached over libvirt.
    alive = subprocess.run(["sfmpi", "vm", "exec", parent, "--", "echo", "alive"], env=on_demand,
                           capture_output=True, text=True, timeout=120)
    assert (alive.returncode, alive.stdout) == (0, "alive\n"), alive.stderr
    assert dom(lv, parent) in domains(lv)
    assert next(r for r in lv.json("vm", "list") if r["name"] == parent)["state"] == "running"


def test_down_leaves_no_domain_no_daemon_and_no_mount(lv, parent):
    run = lv.home / "libvirt" / "run"
    daemons = [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in ("libvirtd", "virtlogd")
               and _root_run(p.pid) == _ino(run)]
    assert len(daemons) == 2, daemons
    lv("down")
    assert not (lv.home / "driver").exists()         # the next hostd may choose either driver
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in daemons)
    # A libvirtd started afresh on the same state finds no sfmpi domain defined or running.
    from sfmpi.hostd.vm.libvirt.daemon import LibvirtDaemon
    from sfmpi.paths import Paths
    probe_ns = f"sfmpi-lvq{Paths(lv.home).tag}"
    subprocess.run(["ip", "netns", "add", probe_ns], check=True)
    daemon = LibvirtDaemon(lv.home / "libvirt", f"/run/netns/{probe_ns}")
    try:
        daemon.start()
        assert virsh(lv, "list", "--all", "--name").split() == []
    finally:
        daemon.stop()
        subprocess.run(["ip", "netns", "del", probe_ns], check=True)
    assert str(lv.home) not in Path("/proc/self/mountinfo").read_text()


def _ino(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _root_run(pid: int) -> tuple[int, int] | None:
    return _ino(Path(f"/proc/{pid}/root/run/libvirt"))
