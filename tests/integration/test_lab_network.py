"""A lab of 3 hosts, with no VM and no hostd: the hosts reach each other and
the master's address across the lab bridge, the main namespace gains nothing,
and down() leaves nothing (twice, and after an up() that failed half-way).

Light: namespaces and veths only. It uses none of conftest's VM fixtures."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from sfmpi.errors import AlreadyExists, NetworkError
from sfmpi.hostd.lab import network as lab_network
from sfmpi.hostd.lab import topology
from sfmpi.hostd.lab.network import LabNetwork
from sfmpi.hostd.lab.topology import LAB_NS, MASTER_IP

pytestmark = [pytest.mark.lab, pytest.mark.timeout(120)]


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


def main_namespace() -> dict:
    """The main namespace's links (names), addresses (link, family, address) and
    routes, from `ip -o link`, `ip -o addr` and `ip route`, without the fields
    that change by themselves (counters, lifetimes, link state)."""
    links = {line.split(": ")[1].split("@")[0] for line in sh("ip", "-o", "link").stdout.splitlines()}
    addrs = {tuple(line.split()[1:4]) for line in sh("ip", "-o", "addr").stdout.splitlines()}
    routes = set(sh("ip", "route").stdout.splitlines())
    return {"links": links, "addrs": addrs, "routes": routes}


def ping(source: str, address) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", source, "ping", "-c1", "-W2", str(address), check=False)


@pytest.fixture
def lab(request):
    """A 3-host lab, always taken down after the test, even a failed one. A lab
    that was up before the test is someone else's: left alone, and the test fails."""
    if shutil.which("ping") is None:
        pytest.fail("ping is not installed (Debian: iputils-ping)")
    net = LabNetwork(3)
    if net.leftovers():
        pytest.fail(f"a lab is already up ({net.leftovers()}): not touching it; `sfmpi lab down` first")
    request.addfinalizer(net.down)
    return net


def test_lab_up_ping_and_down(lab):
    before = main_namespace()
    lab.up()
    assert lab.exists()
    assert lab.hosts() == ["lab1", "lab2", "lab3"]

    for target in ("lab2", "lab3"):
        p = ping("lab1", topology.host_ip(target))
        assert p.returncode == 0, f"lab1 cannot ping {target}:\n{p.stdout}{p.stderr}"
    p = ping("lab1", MASTER_IP)
    assert p.returncode == 0, f"lab1 cannot ping the master address:\n{p.stdout}{p.stderr}"

    # wrap() enters the host's network: its eth0 has its address, MTU 1500, no IPv6.
    eth0 = sh(*lab.wrap("lab2", ["ip", "-o", "addr", "show", "dev", "eth0"])).stdout
    assert f"inet {topology.host_ip('lab2')}/24" in eth0 and "inet6" not in eth0
    assert "mtu 1500" in sh(*lab.wrap("lab2", ["ip", "-o", "link", "show", "dev", "eth0"])).stdout
    assert sh(*lab.wrap(LAB_NS, ["ip", "-o", "-6", "addr"])).stdout == ""

    after = main_namespace()
    for kind in ("links", "addrs", "routes"):
        assert after[kind] - before[kind] == set(), f"the main namespace gained {kind}"

    with pytest.raises(AlreadyExists, match=r"already up \(3 hosts\)"):
        LabNetwork(2).up()

    LabNetwork(1).down()  # down() finds the 3 hosts itself
    assert lab.leftovers() == []
    lab.down()
    assert lab.leftovers() == []


def test_a_failed_up_removes_what_it_made(lab, monkeypatch):
    """An up() that fails after lab1 is made: lab1 and sfmpi-lab go again, and
    the error carries the failing command's stderr."""
    real = topology.up_argvs(1)
    broken = [*real, ["ip", "-n", LAB_NS, "link", "set", "nosuchlink0", "up"], *topology.up_argvs(2)[len(real):]]
    monkeypatch.setattr(lab_network.topology, "up_argvs", lambda k: broken)
    with pytest.raises(NetworkError, match="nosuchlink0") as failed:
        lab.up()
    assert "Cannot find device" in str(failed.value)
    assert lab.leftovers() == []
