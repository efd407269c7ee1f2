"""What an sfmpi test run must leave behind on the host: nothing running, nothing mounted.

Shared by the integration tests and the benchmarks.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import psutil

from sfmpi.hostd.net.namespace import leftover_namespaces
from sfmpi.hostd.vm.hugepages import leftover_files
from sfmpi.paths import Paths

OUR_LINK = re.compile(r"^(sfbr\d+|sft\d+x\d+|sfrx\d+|sfu[0-9a-f]{8})$")


def network_leaks() -> list[str]:
    """Links and nft tables of any sfmpi family on this host. Only meaningful
    when no other sfmpi instance runs (the end of a test session or benchmark)."""
    found = []
    for name in Path("/sys/class/net").iterdir():
        if OUR_LINK.match(name.name):
            found.append(f"network link left: {name.name}")
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    for line in tables.splitlines():
        if re.match(r"^table \S+ sfmpi_(f\d+|h[0-9a-f]+)$", line.strip()):
            found.append(f"nft {line.strip()} left")
    found += [f"network namespace {n} left" for n in leftover_namespaces()]
    rules = subprocess.run(["ip", "rule", "list"], capture_output=True, text=True).stdout
    found += [f"ip rule left: {r.strip()}" for r in rules.splitlines() if re.search(r"lookup 2\d{4}\b", r)]
    return found


def leaks(home: Path, shm: Path, whole_host_network: bool = False) -> list[str]:
    found = []
    for p in psutil.process_iter(["pid", "name", "cmdline", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue  # already dead, only not yet reaped by its parent
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "qemu-system" in (p.info["name"] or "") and str(shm) in cmd:
            found.append(f"QEMU process {p.info['pid']}: {cmd[:120]}")
        if "sfmpi.cli hostd" in cmd and p.info["pid"] and _env_home(p) == str(home):
            found.append(f"hostd process {p.info['pid']}")
        if (p.info["name"] or "") == "dnsmasq" and str(home) in cmd:
            found.append(f"dnsmasq process {p.info['pid']}")
        if (p.info["name"] or "") == "haproxy" and str(home) in cmd:
            found.append(f"HAProxy process {p.info['pid']}: {cmd[:120]}")
        if "sfmpi.cli pool serve" in cmd and _env_home(p) == str(home):
            found.append(f"pool controller {p.info['pid']}: {cmd[:120]}")
        if ("sfmpi.native.memserver" in cmd or "sfmpi.native.memtap" in cmd) and str(home) in cmd:
            found.append(f"memory daemon {p.info['pid']}: {cmd[:120]}")
        if (p.info["name"] or "") in ("libvirtd", "virtlogd") and _libvirt_of(p.info["pid"], home):
            found.append(f"{p.info['name']} process {p.info['pid']} of {home}")
    if shm.exists() and any(shm.iterdir()):
        found.append(f"tmpfs files left: {sorted(x.name for x in shm.iterdir())}")
    huge = leftover_files(shm.name)
    if huge:
        found.append(f"huge page RAM files left: {sorted(map(str, huge))}")
    for line in Path("/proc/mounts").read_text().splitlines():
        if str(home) in line or str(shm) in line:
            found.append(f"mount left: {line}")
    for netns in (Path("/run/netns") / Paths(home).netns, Path("/run/netns") / f"{Paths(home).netns}-mem"):
        if netns.exists():
            found.append(f"network namespace {netns.name} left")
    if (Path("/sys/class/net") / f"sfu{Paths(home).tag}").exists():
        found.append(f"uplink sfu{Paths(home).tag} left")
    if (home / "hostd.sock").exists():
        found.append("hostd socket left")
    if (home / "net").exists() and any((home / "net").iterdir()):
        found.append(f"family network state left: {sorted(x.name for x in (home / 'net').iterdir())}")
    # cgroups sfmpi made for this home's VMs (hostd/resources/cgroups.py), in any hierarchy.
    for mount in sorted({ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines()
                         if ln.split()[2] in ("cgroup", "cgroup2")}):
        for cg in [*Path(mount).glob(f"sfmpi-{Paths(home).tag}"), *Path(mount).glob(f"*/sfmpi-{Paths(home).tag}")]:
            found.append(f"cgroup left: {cg}")
    if whole_host_network:
        found += network_leaks()
    return found


def _libvirt_of(pid: int, home: Path) -> bool:
    """A libvirtd or virtlogd of this home's libvirt driver: its /run/libvirt is
    the home's (bound there in its mount namespace, hostd/vm/libvirt/daemon.py)."""
    try:
        theirs, ours = Path(f"/proc/{pid}/root/run/libvirt").stat(), (home / "libvirt" / "run").stat()
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def _env_home(p: psutil.Process) -> str | None:
    try:
        return p.environ().get("SFMPI_HOME")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def down_and_leaks(client, home: Path) -> list[str]:
    """`sfmpi down` through a HostdClient, wait for hostd to go, then what is left
    (the benchmarks' teardown); the state directory is removed."""
    import shutil

    from sfmpi.client import wait_gone
    pid = client.call("ping")["pid"]
    client.call("down")
    wait_gone(pid)
    paths = Paths(home)
    left = leaks(paths.home, paths.shm)
    shutil.rmtree(home, ignore_errors=True)
    return left


def lab_leaks(lab_home: Path, host_homes: list[Path]) -> list[str]:
    """After `lab down`: each host's leaks as above, and the lab's own: its
    namespaces, its master, NBD servers and files."""
    from sfmpi.hostd.lab.network import LabNetwork
    found = []
    for home in host_homes:
        found += leaks(home, Paths(home).shm)
    found += [f"lab namespace {n} left" for n in LabNetwork(1).leftovers()]
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(lab_home) in cmd and ("sfmpi.cli master" in cmd or "qemu-storage-daemon" in cmd
                                     or "sfmpi.cli hostd" in cmd):
            found.append(f"lab process {p.info['pid']}: {cmd[:120]}")
    if lab_home.exists():
        found.append(f"lab directory {lab_home} left")
    return found


def job_leaks(job_dir: Path, hosts: list[str]) -> list[str]:
    """After a batch job: its directory, each node's hostd leaks as above, and any
    process that names the job's directory (its master, hostds, reapers)."""
    found = [f"job directory {job_dir} left"] if job_dir.exists() else []
    for host in hosts:
        home = job_dir / host
        found += leaks(home, Paths(home).shm)
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(job_dir) in cmd:
            found.append(f"process left: {p.info['pid']} {cmd[:160]}")
    return found
