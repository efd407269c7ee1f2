"""Family networks with real VMs: isolation between families, spoofing dropped."""
from __future__ import annotations

import subprocess

import pytest

from sfmpi.hostd.net import nft

pytestmark = pytest.mark.timeout(900)


def in_netns(cli, *argv: str) -> list[str]:
    """A command in hostd's network namespace, where the families live."""
    return ["nsenter", f"--net=/run/netns/{cli.paths.netns}", "--", *argv]


def counters(cli, f: int) -> dict[str, int]:
    out = {}
    for family in ("bridge", "inet"):
        text = subprocess.run(in_netns(cli, "nft", "-j", "list", "counters", "table", family, nft.table_name(f)),
                              capture_output=True, text=True, check=True).stdout
        out.update(nft.parse_counters(text))
    return out


def vm_row(cli, name: str) -> dict:
    return {r["name"]: r for r in cli.json("vm", "list")}[name]


def ping(cli, vm: str, ip: str) -> bool:
    return cli.exec(vm, f"busybox ping -c 1 -W 2 {ip} >/dev/null 2>&1", check=False).returncode == 0


@pytest.fixture(scope="module")
def sibling(cli, parent) -> dict:
    """A host-side clone of the parent: same family, its own identity."""
    ck = cli.json("checkpoint", parent)
    res = cli.json("clone", ck["id"], "-n", "1")
    name = res["clones"][0]
    yield vm_row(cli, name)
    cli("vm", "stop", name, check=False)


@pytest.fixture(scope="module")
def stranger(cli) -> dict:
    """A VM of another family on the same host."""
    cli("vm", "start", "stranger", "--mem", "256M")
    yield vm_row(cli, "stranger")
    cli("vm", "stop", "stranger", check=False)


def test_members_of_a_family_reach_each_other(cli, parent, sibling):
    me = vm_row(cli, parent)
    assert sibling["family"] == me["family"] == "parent"
    assert sibling["ip"] != me["ip"]
    assert ping(cli, sibling["name"], me["ip"])
    assert ping(cli, parent, sibling["ip"])
    # The clone answers on its own address with its own MAC.
    mac = cli.exec(sibling["name"], "cat /sys/class/net/$(ls /sys/class/net | grep -v lo | head -1)/address")
    assert mac.stdout.strip() == "0a:5f:%02x:%02x:00:%02x" % (me["family_no"] >> 8, me["family_no"] & 255,
                                                              sibling["netid"])


@pytest.fixture
def host_forwards(cli):
    """hostd's namespace routes IPv4 (always: families route to its uplink): isolation must come from the
    family's own rules, not from a namespace that happens not to route (ip_forward=0 drops before nft's
    forward hook)."""
    was = subprocess.run(in_netns(cli, "cat", "/proc/sys/net/ipv4/ip_forward"), capture_output=True,
                         text=True, check=True).stdout.strip()
    assert was == "1"
    yield


def test_two_families_cannot_reach_each_other(cli, parent, stranger, host_forwards):
    me = vm_row(cli, parent)
    assert stranger["family_no"] != me["family_no"]

    def routed_drops() -> int:
        # A packet between families meets both families' forward chains; whichever runs first drops it.
        return sum(counters(cli, f)[f"inet/{c}"] for f in (me["family_no"], stranger["family_no"])
                   for c in ("leave_family", "enter_family"))

    before = routed_drops()
    assert not ping(cli, parent, stranger["ip"])
    assert not ping(cli, "stranger", me["ip"])
    assert routed_drops() >= before + 2
    # Not even ARP: the stranger's address is on another bridge.
    neigh = cli.exec(parent, f"ip neigh show {stranger['ip']}").stdout
    assert "lladdr" not in neigh


def test_spoofed_mac_or_ip_is_dropped(cli, parent, sibling):
    me = vm_row(cli, parent)
    k, name = sibling["netid"], sibling["name"]
    dev = "$(ls /sys/class/net | grep -v lo | head -1)"
    before = counters(cli, me["family_no"])
    # Another MAC (e.g. the parent's own, which a clone resumes with).
    parent_mac = "0a:5f:%02x:%02x:00:00" % (me["family_no"] >> 8, me["family_no"] & 255)
    cli.exec(name, f"ip link set dev {dev} address {parent_mac}; ip neigh flush dev {dev}")
    assert not ping(cli, name, me["ip"])
    mac_drops = counters(cli, me["family_no"])[f"bridge/vm_{k}_mac"]
    assert mac_drops > before[f"bridge/vm_{k}_mac"]
    # Back to its own MAC, but another VM's IP.
    own_mac = "0a:5f:%02x:%02x:00:%02x" % (me["family_no"] >> 8, me["family_no"] & 255, k)
    spoof_ip = me["ip"].rsplit(".", 1)[0] + ".200"
    cli.exec(name, f"ip link set dev {dev} address {own_mac}; ip addr flush dev {dev}; "
                   f"ip addr add {spoof_ip}/24 dev {dev}; ip neigh flush dev {dev}")
    assert not ping(cli, name, me["ip"])
    after = counters(cli, me["family_no"])
    assert after[f"bridge/vm_{k}_arp_ip"] + after[f"bridge/vm_{k}_ip"] > \
        before[f"bridge/vm_{k}_arp_ip"] + before[f"bridge/vm_{k}_ip"]
    # Its own identity again: reachable.
    cli.exec(name, f"ip addr flush dev {dev}; ip addr add {sibling['ip']}/24 dev {dev}; ip neigh flush dev {dev}")
    assert ping(cli, name, me["ip"])


def test_stock_dhcp_client_gets_the_planned_address(cli, sibling):
    name = sibling["name"]
    dev = "$(ls /sys/class/net | grep -v lo | head -1)"
    p = cli.exec(name, f"ip addr flush dev {dev}; busybox udhcpc -i {dev} -n -q -f -s /bin/true -t 5 2>&1; "
                       f"true", check=False)
    assert f"lease of {sibling['ip']} obtained" in p.stdout, p.stdout
    cli.exec(name, f"ip addr add {sibling['ip']}/24 dev {dev}")
