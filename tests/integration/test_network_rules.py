"""Family networks for real: bridges, nftables rules and dnsmasq on this host,
with network namespaces on veths playing the VMs (no QEMU, quick).

Each namespace's veth peer on the host is named like a VM's tap and attached
with the same rules a tap gets. Traffic goes only to addresses inside these
namespaces and bridges; everything is removed at the end, and checked.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from sfmpi import proc
from sfmpi.hostd import netplan
from sfmpi.hostd.network import (FamilyNetwork, allocate_family, cleanup_families,
                                 leftover_links, leftover_tables)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bridges and nftables need root")

TAG = f"sfmt{os.getpid() % 100000}"  # prefix of this run's namespace names
# Far from the low numbers a real hostd starts at; the allocator skips taken ones.
START = 38000 + os.getpid() % 300


def sh(*argv: str, check: bool = True):
    return proc.run(argv, check=check, timeout=30)


def in_ns(ns: str, *argv: str, check: bool = True):
    return sh("ip", "netns", "exec", ns, *argv, check=check)


def ping(ns: str, address) -> bool:
    return in_ns(ns, "busybox", "ping", "-c", "1", "-W", "1", str(address), check=False).returncode == 0


def send_frames(ns: str, *frames: bytes) -> None:
    """Put hand-made Ethernet frames on the namespace's eth0 (into our bridge)."""
    code = ("import socket, sys; s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); "
            "s.bind(('eth0', 0)); [s.send(bytes.fromhex(f)) for f in sys.argv[1:]]")
    in_ns(ns, sys.executable, "-c", code, *(f.hex() for f in frames))


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def arp_request(src_mac: str, sender_mac: str, sender_ip, target_ip) -> bytes:
    return (b"\xff" * 6 + mac_bytes(src_mac) + b"\x08\x06"
            + bytes.fromhex("0001080006040001") + mac_bytes(sender_mac) + sender_ip.packed
            + b"\x00" * 6 + target_ip.packed)


class Lab:
    """This module's families and namespaces; close() removes them all (twice is fine)."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.nets: list[FamilyNetwork] = []
        self.namespaces: list[str] = []

    def family(self, name: str) -> FamilyNetwork:
        net = FamilyNetwork(allocate_family(START), name, self.state_dir)
        self.nets.append(net)  # before up(): cleaned up even if up() fails
        return net.up()

    def namespace(self, net: FamilyNetwork, k: int, *, port: str | None = None,
                  attach: bool = True, address: bool = True) -> str:
        """A namespace with eth0 carrying ID k's MAC (and IP), on the family bridge."""
        ns = f"{TAG}-{net.f}-{k}-{len(self.namespaces)}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        port = port or netplan.tap_name(net.f, k)
        # Deleting the namespace deletes the veth pair, so the port goes with it.
        sh("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        in_ns(ns, "ip", "link", "set", "eth0", "address", netplan.mac(net.f, k))
        in_ns(ns, "ip", "link", "set", "lo", "up")
        in_ns(ns, "ip", "link", "set", "eth0", "up")
        if address:
            in_ns(ns, "ip", "addr", "add", f"{netplan.ip(net.f, k)}/24", "dev", "eth0")
        if attach:
            net.attach_ports([(k, port)])
        else:  # a stranger: in the bridge, but never announced to the family
            Path(f"/proc/sys/net/ipv6/conf/{port}/disable_ipv6").write_text("1")
            sh("ip", "link", "set", port, "master", net.bridge, "up")
        return ns

    def close(self) -> None:
        for ns in self.namespaces:
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()
        for net in self.nets:
            net.down()

    def leftovers(self) -> list[str]:
        mine = {net.f for net in self.nets}
        found = [f"link {n}" for n in leftover_links() if netplan.family_of_link(n) in mine]
        found += [f"nft table {t}" for t in leftover_tables() if int(t.rsplit("_f", 1)[1]) in mine]
        found += [f"netns {n}" for n in sh("ip", "netns", "list").stdout.decode().split()
                  if n.startswith(TAG + "-")]
        for p in psutil.process_iter(["pid", "cmdline", "status"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["status"] != psutil.STATUS_ZOMBIE and "dnsmasq" in cmd and str(self.state_dir) in cmd:
                found.append(f"dnsmasq {p.info['pid']}")
        return found


@pytest.fixture(scope="module")
def lab():
    state_dir = Path(tempfile.mkdtemp(prefix="sfmpi-net-", dir="/tmp"))
    lab = Lab(state_dir)
    try:
        a = lab.family("alpha")
        b = lab.family("beta")
        lab.a, lab.b = a, b
        lab.a0, lab.a1, lab.a2 = (lab.namespace(a, k) for k in (0, 1, 2))
        lab.b0 = lab.namespace(b, 0)
        yield lab
    finally:
        lab.close()
        left = lab.leftovers()
        shutil.rmtree(state_dir, ignore_errors=True)
        assert not left, f"the network test left things behind: {left}"


def delta(net: FamilyNetwork, before: dict[str, int], name: str) -> int:
    return net.counters()[name] - before.get(name, 0)


def test_family_members_reach_each_other(lab):
    a = lab.a
    assert ping(lab.a0, netplan.ip(a.f, 1))
    assert ping(lab.a1, netplan.ip(a.f, 2))
    assert ping(lab.a2, netplan.ip(a.f, 0))


def test_guests_reach_no_host_service(lab):
    before = lab.a.counters()
    assert not ping(lab.a0, netplan.gateway(lab.a.f))
    assert delta(lab.a, before, "inet/to_host") >= 1


def test_another_family_is_out_of_reach(lab):
    a, b = lab.a, lab.b
    # Different bridges: no ARP answer across families at all.
    arp = in_ns(lab.b0, "busybox", "arping", "-c", "1", "-w", "1", "-I", "eth0", str(netplan.ip(a.f, 0)),
                check=False)
    assert arp.returncode != 0
    # Make the host route between A and B (forwarding on these two bridges
    # only, which goes away with them): then our inet rules are what stops it.
    forwarding = [Path(f"/proc/sys/net/ipv4/conf/{net.bridge}/forwarding") for net in (a, b)]
    in_ns(lab.b0, "ip", "route", "add", str(netplan.subnet(a.f)), "via", str(netplan.gateway(b.f)))
    in_ns(lab.a0, "ip", "route", "add", str(netplan.subnet(b.f)), "via", str(netplan.gateway(a.f)))
    for path in forwarding:
        path.write_text("1")
    try:
        before_a, before_b = a.counters(), b.counters()
        assert not ping(lab.b0, netplan.ip(a.f, 0))
        dropped = delta(b, before_b, "inet/leave_family") + delta(a, before_a, "inet/enter_family")
        assert dropped >= 1
    finally:
        for path in forwarding:
            path.write_text("0")
        in_ns(lab.a0, "ip", "route", "del", str(netplan.subnet(b.f)))


def test_stranger_on_the_bridge_reaches_nobody(lab):
    a = lab.a
    before = a.counters()
    # Named like a tap of the family (dropped as it comes in) ...
    tapish = lab.namespace(a, 9, attach=False)
    assert not ping(tapish, netplan.ip(a.f, 0))
    # ... or named otherwise (dropped on its way to a VM's port).
    other = lab.namespace(a, 10, port=f"sfq{os.getpid() % 100000}", attach=False)
    assert not ping(other, netplan.ip(a.f, 0))
    assert delta(a, before, "bridge/unknown_port") >= 2


def test_borrowed_mac_is_dropped_before_the_bridge_learns_it(lab):
    a = lab.a
    before = a.counters()
    stolen = netplan.mac(a.f, 1)
    in_ns(lab.a2, "ip", "link", "set", "eth0", "address", stolen)
    try:
        assert not ping(lab.a2, netplan.ip(a.f, 0))
        assert delta(a, before, "bridge/vm_2_mac") >= 1
        # The bridge did not learn ID 1's MAC on ID 2's port: 1 is still reachable.
        fdb = sh("bridge", "fdb", "show", "br", a.bridge).stdout.decode()
        assert not any(stolen in line and netplan.tap_name(a.f, 2) in line for line in fdb.splitlines())
        assert ping(lab.a0, netplan.ip(a.f, 1))
    finally:
        in_ns(lab.a2, "ip", "link", "set", "eth0", "address", netplan.mac(a.f, 2))


def test_borrowed_ip_is_dropped(lab):
    a = lab.a
    before = a.counters()
    own, stolen = f"{netplan.ip(a.f, 2)}/24", f"{netplan.ip(a.f, 1)}/24"
    in_ns(lab.a2, "ip", "addr", "del", own, "dev", "eth0")
    in_ns(lab.a2, "ip", "addr", "add", stolen, "dev", "eth0")
    try:
        # ARP asks with the borrowed sender IP ...
        assert not ping(lab.a2, netplan.ip(a.f, 0))
        assert delta(a, before, "bridge/vm_2_arp_ip") >= 1
        # ... and IPv4 (with the neighbour known already) carries it as source.
        in_ns(lab.a2, "ip", "neigh", "replace", str(netplan.ip(a.f, 0)), "lladdr", netplan.mac(a.f, 0),
              "dev", "eth0", "nud", "permanent")
        assert not ping(lab.a2, netplan.ip(a.f, 0))
        assert delta(a, before, "bridge/vm_2_ip") >= 1
    finally:
        in_ns(lab.a2, "ip", "neigh", "flush", "dev", "eth0")
        in_ns(lab.a2, "ip", "addr", "flush", "dev", "eth0")
        in_ns(lab.a2, "ip", "addr", "add", own, "dev", "eth0")
    assert ping(lab.a2, netplan.ip(a.f, 0))


def test_hand_made_frames_land_in_their_counters(lab):
    a = lab.a
    me, other = netplan.mac(a.f, 2), netplan.mac(a.f, 1)
    my_ip, target = netplan.ip(a.f, 2), netplan.ip(a.f, 0)
    before = a.counters()
    send_frames(
        lab.a2,
        arp_request(me, other, my_ip, target),  # ARP sender MAC is not the frame's
        b"\x33\x33\x00\x00\x00\x01" + mac_bytes(me) + b"\x86\xdd" + bytes(60),  # IPv6
        # An 802.1Q tag would hide the ARP/IPv4 header from the rules: dropped as "other".
        b"\xff" * 6 + mac_bytes(me) + b"\x81\x00\x00\x05\x08\x06" + bytes(46),
    )
    assert delta(a, before, "bridge/vm_2_arp_mac") == 1
    assert delta(a, before, "bridge/vm_2_ipv6") >= 1
    assert delta(a, before, "bridge/vm_2_other") == 1
    assert delta(a, before, "bridge/vm_1_arp_mac") == 0  # counted against the sender only


def dhcp_lease(lab, net: FamilyNetwork, k: int) -> dict[str, str]:
    """What a stock DHCP client (busybox udhcpc) is handed for ID k's MAC."""
    ns = lab.namespace(net, k, address=False)
    out = lab.state_dir / f"lease-{net.f}-{k}"
    script = lab.state_dir / "udhcpc.sh"
    script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && env > "{lab.state_dir}/lease-$SF_KEY"\nexit 0\n')
    script.chmod(0o755)
    in_ns(ns, "env", f"SF_KEY={net.f}-{k}", "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n",
          "-t", "5", "-T", "1", "-s", str(script))
    return dict(line.split("=", 1) for line in out.read_text().splitlines() if "=" in line)


def test_dhcp_hands_out_the_planned_identity(lab):
    a, b = lab.a, lab.b
    lease = dhcp_lease(lab, a, 4)
    assert lease["ip"] == str(netplan.ip(a.f, 4))
    assert lease["subnet"] == "255.255.255.0"
    assert lease["router"] == str(netplan.gateway(a.f))
    assert lease.get("hostname") == "alpha-4"
    assert "dns" not in lease  # dnsmasq serves no DNS (--port=0)
    # The other family's dnsmasq runs at the same time and answers its own.
    lease = dhcp_lease(lab, b, 1)
    assert lease["ip"] == str(netplan.ip(b.f, 1))
    assert lease.get("hostname") == "beta-1"


def test_add_and_remove_taps_leave_other_vms_alone(lab):
    a = lab.a
    before = a.counters()
    assert before["bridge/vm_2_mac"] >= 1  # from the MAC test above
    taps = a.add_vms([7, 8])
    assert taps == [netplan.tap_name(a.f, 7), netplan.tap_name(a.f, 8)]
    for tap in taps:
        detail = sh("ip", "-d", "link", "show", tap).stdout.decode()
        assert f"master {a.bridge}" in detail and "tun" in detail
    hosts = (a.dhcp.dir / "dhcp-hosts").read_text()
    assert f"{netplan.mac(a.f, 7)},{netplan.ip(a.f, 7)},alpha-7\n" in hosts
    assert "bridge/vm_7_mac" in a.counters()
    a.remove_vm(7)
    a.remove_vm(7)  # already gone: fine
    assert netplan.tap_name(a.f, 7) not in leftover_links()
    assert netplan.tap_name(a.f, 8) in leftover_links()
    after = a.counters()
    assert "bridge/vm_7_mac" not in after
    assert after["bridge/vm_2_mac"] == before["bridge/vm_2_mac"]  # survived the update
    assert "alpha-7" not in (a.dhcp.dir / "dhcp-hosts").read_text()
    assert ping(lab.a0, netplan.ip(a.f, 1))


def test_cleanup_after_a_crash_finds_everything_by_name(lab):
    crashed = FamilyNetwork(allocate_family(START), "gamma", lab.state_dir)
    lab.nets.append(crashed)
    crashed.up()
    crashed.add_vms([0, 1])
    dnsmasq = crashed.dhcp.popen
    # A new process knows only the family number and the state directory.
    cleanup_families([crashed.f], lab.state_dir)
    dnsmasq.wait(5)  # it was stopped through its pid file; reap it
    assert not [n for n in leftover_links() if netplan.family_of_link(n) == crashed.f]
    assert not [t for t in leftover_tables() if t.endswith(f"_f{crashed.f}")]
    assert not crashed.dir.exists()
    cleanup_families([crashed.f], lab.state_dir)  # twice: fine


def test_down_leaves_nothing_and_is_safe_twice(lab):
    t0 = time.monotonic()
    lab.close()
    lab.close()
    assert lab.leftovers() == []
    assert time.monotonic() - t0 < 10
