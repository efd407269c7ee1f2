"""Family networks for real: bridges, nftables rules and dnsmasq on this host,
with network namespaces on veths playing the VMs (no QEMU, quick).

Each namespace's veth peer on the host is named like a VM's tap and attached
with the same rules a tap gets. An "uplink" namespace on a veth of the host
plays the world beyond the host, on an address range no real network uses.
Traffic goes only to addresses inside these namespaces and bridges;
everything is removed at the end, and checked.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from sfmpi import proc
from sfmpi.errors import UsageError
from sfmpi.hostd.net import netplan, nft
from sfmpi.hostd.net.families import Families, NetOptions
from sfmpi.errors import NetworkError
from sfmpi.hostd.net.bridge import FORWARDING_DIR, FamilyNetwork, allocate_family, leftover_tables, nat_families

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bridges and nftables need root")


_OUR_LINK = re.compile(r"^(sfbr\d+|sft\d+x\d+)$")
_BRIDGE_RE = re.compile(r"^sfbr(\d+)$")
_TAP_RE = re.compile(r"^sft(\d+)x(\d+)$")


def leftover_links() -> list[str]:
    """Every link named like a family bridge or tap in this namespace."""
    names = os.listdir("/sys/class/net")
    return sorted(n for n in names if _OUR_LINK.match(n))


def family_of_link(ifname: str) -> int | None:
    """The family number a link of ours belongs to (bridge or tap), else None."""
    m = _BRIDGE_RE.match(ifname) or _TAP_RE.match(ifname)
    return int(m.group(1)) if m else None


def cleanup_families(families, state_dir: Path) -> None:
    """Remove everything of these families found by name, as after a crash of their owner."""
    errors = []
    for f in families:
        try:
            FamilyNetwork(f, "leftover", state_dir).down()
        except NetworkError as exc:
            errors.append(str(exc))
    if errors:
        raise NetworkError("; ".join(errors))

TAG = f"sfmt{os.getpid() % 100000}"  # prefix of this run's namespace names
# Far from the low numbers a real hostd starts at; the allocator skips taken ones.
START = 38000 + os.getpid() % 300
# The uplink: 198.18.0.0/15 is for benchmarking test networks (RFC 2544), on no real network.
UPLINK = ipaddress.IPv4Network(f"198.18.{os.getpid() % 256}.0/24")
UPLINK_HOST, UPLINK_PEER = UPLINK.network_address + 1, UPLINK.network_address + 2
UPLINK_LINK = f"sfu{os.getpid() % 100000}"  # the host's side; named like no family link
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


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


# TCP servers on the ports given; each connection is answered with the
# address the server saw it come from (so NAT shows), then closed.
SERVER = """
import selectors, socket, sys
sel = selectors.DefaultSelector()
for port in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(16)
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        conn, peer = key.fileobj.accept()
        with conn:
            conn.sendall(peer[0].encode() + b"\\n")
"""
CLIENT = """
import socket, sys
address, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    with socket.create_connection((address, port), timeout=timeout) as s:
        s.settimeout(timeout)
        print(s.makefile().readline().strip())
except OSError as exc:
    sys.exit(f"{address}:{port}: {exc}")
"""


@contextlib.contextmanager
def listening(ns: str, *ports: int):
    """SERVER in namespace ns, for the with-block."""
    server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, *map(str, ports)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready = server.stdout.readline()  # or b"" if it died
        assert ready.strip() == b"ready", server.stderr.read().decode()
        yield
    finally:
        server.terminate()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server.stdout.close()
        server.stderr.close()


def connect(ns: str, address, port: int, timeout: float = 1.0) -> str | None:
    """A TCP connection from namespace ns: the source address the server saw, or None if it failed."""
    p = in_ns(ns, sys.executable, "-c", CLIENT, str(address), str(port), str(timeout), check=False)
    return p.stdout.decode().strip() if p.returncode == 0 else None


def forwarding_on(*links: str) -> None:
    """Route IPv4 coming in on these links only (it goes away with them); the
    host's net.ipv4.ip_forward stays as it is."""
    for link in links:
        Path(f"/proc/sys/net/ipv4/conf/{link}/forwarding").write_text("1")


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

    def family(self, name: str, **options) -> FamilyNetwork:
        net = FamilyNetwork(allocate_family(START), name, self.state_dir, **options)
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

    def uplink(self) -> str:
        """A namespace playing the network beyond the host: its eth0 (UPLINK_PEER)
        on a veth to the host (UPLINK_LINK, UPLINK_HOST). It has no route to any
        family: whatever reaches it from a family without help was masqueraded."""
        ns = f"{TAG}-uplink-{len(self.namespaces)}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "link", "add", UPLINK_LINK, "type", "veth", "peer", "name", "eth0", "netns", ns)
        Path(f"/proc/sys/net/ipv6/conf/{UPLINK_LINK}/disable_ipv6").write_text("1")
        sh("ip", "addr", "add", f"{UPLINK_HOST}/{UPLINK.prefixlen}", "dev", UPLINK_LINK)
        sh("ip", "link", "set", UPLINK_LINK, "up")
        in_ns(ns, "ip", "link", "set", "lo", "up")
        in_ns(ns, "ip", "link", "set", "eth0", "up")
        in_ns(ns, "ip", "addr", "add", f"{UPLINK_PEER}/{UPLINK.prefixlen}", "dev", "eth0")
        return ns

    def remove_namespace(self, ns: str) -> None:
        # The host's end of a veth first: netns deletion takes its links
        # away only later, in the kernel's own time.
        if ns.startswith(f"{TAG}-uplink-"):
            sh("ip", "link", "del", UPLINK_LINK, check=False)
        sh("ip", "netns", "del", ns, check=False)
        if ns in self.namespaces:
            self.namespaces.remove(ns)

    def close_family(self, name: str) -> None:
        for net in reversed(self.nets):  # the newest object owns the running dnsmasq
            if net.name == name:
                net.down()

    def close(self) -> None:
        for ns in list(self.namespaces):
            self.remove_namespace(ns)
        for net in self.nets:
            net.down()

    def leftovers(self) -> list[str]:
        mine = {net.f for net in self.nets}
        found = [f"link {n}" for n in leftover_links() if family_of_link(n) in mine]
        found += [f"nft table {t}" for t in leftover_tables()
                  if "_f" in t and int(t.rsplit("_f", 1)[1]) in mine]
        found += [f"netns {n}" for n in sh("ip", "netns", "list").stdout.decode().split()
                  if n.startswith(TAG + "-")]
        found += [f"link {UPLINK_LINK}"] if Path("/sys/class/net", UPLINK_LINK).exists() else []
        saved = FORWARDING_DIR / "ip_forward.saved"
        if saved.exists() and not nat_families():  # nobody restored ip_forward
            found.append(f"{saved} ({saved.read_text().strip()!r}) with no NAT family left")
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
    a.remove_vms([7])
    a.remove_vms([7])  # already gone: fine
    # Its tap stays for the next VM with ID 7, off the bridge and down.
    detail = sh("ip", "-d", "link", "show", taps[0]).stdout.decode()
    assert "master" not in detail and "state DOWN" in detail
    assert f"master {a.bridge}" in sh("ip", "-d", "link", "show", taps[1]).stdout.decode()
    after = a.counters()
    assert "bridge/vm_7_mac" not in after
    assert after["bridge/vm_2_mac"] == before["bridge/vm_2_mac"]  # survived the update
    assert "alpha-7" not in (a.dhcp.dir / "dhcp-hosts").read_text()
    assert ping(lab.a0, netplan.ip(a.f, 1))
    assert a.add_vms([7]) == [taps[0]]  # the kept tap, back on the bridge with its rules
    assert f"master {a.bridge}" in sh("ip", "-d", "link", "show", taps[0]).stdout.decode()
    assert "bridge/vm_7_mac" in a.counters()
    a.remove_vms([7, 8])


@pytest.fixture
def uplink(lab):
    ns = lab.uplink()
    yield ns
    lab.remove_namespace(ns)


@pytest.fixture
def host_ip_forward():
    """The host's net.ipv4.ip_forward before the test; it must be the same after it."""
    was = IP_FORWARD.read_text().strip()
    yield was
    now = IP_FORWARD.read_text().strip()
    if now != was:  # never leave the host changed, even when the test failed
        IP_FORWARD.write_text(was)
    assert now == was, f"net.ipv4.ip_forward left at {now} (was {was})"


def test_open_ports_let_in_only_those_ports(lab, uplink):
    """From the uplink, routed to the family: the declared port gets through,
    another port of the same VM (with a server on it) does not."""
    net = lab.family("delta", open_ports=["7001"])
    vm = lab.namespace(net, 0)
    in_ns(uplink, "ip", "route", "add", str(netplan.subnet(net.f)), "via", str(UPLINK_HOST))
    in_ns(uplink, "ip", "route", "add", str(netplan.subnet(lab.a.f)), "via", str(UPLINK_HOST))
    in_ns(vm, "ip", "route", "add", str(UPLINK), "via", str(netplan.gateway(net.f)))
    forwarding_on(UPLINK_LINK, net.bridge, lab.a.bridge)
    vm_ip = netplan.ip(net.f, 0)
    with listening(vm, 7001, 7002), listening(lab.a0, 7001):
        before, before_a = net.counters(), lab.a.counters()
        assert connect(uplink, vm_ip, 7001) == str(UPLINK_PEER)  # routed, not masqueraded
        assert delta(net, before, "inet/enter_family") == 0
        assert connect(uplink, vm_ip, 7002) is None
        assert delta(net, before, "inet/enter_family") >= 1
        # The port is open in family delta only: alpha (no open ports) stays closed.
        assert connect(uplink, netplan.ip(lab.a.f, 0), 7001) is None
        assert delta(lab.a, before_a, "inet/enter_family") >= 1
        # UDP 7001 is not TCP 7001.
        before = net.counters()
        in_ns(uplink, sys.executable, "-c", "import socket, sys; socket.socket(socket.AF_INET, "
              "socket.SOCK_DGRAM).sendto(b'x', (sys.argv[1], 7001))", str(vm_ip))
        deadline = time.monotonic() + 2
        while delta(net, before, "inet/enter_family") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert delta(net, before, "inet/enter_family") >= 1


def test_nat_family_reaches_the_uplink_masqueraded(lab, uplink, host_ip_forward):
    net = lab.family("epsilon", nat=True)
    try:
        # NAT needs forwarding on the host (answers come in on the uplink).
        assert IP_FORWARD.read_text().strip() == "1"
        vm = lab.namespace(net, 0)
        in_ns(vm, "ip", "route", "add", str(UPLINK), "via", str(netplan.gateway(net.f)))
        with listening(uplink, 7003):
            # The uplink knows no way back to the family: only the host's own
            # address on the uplink side makes an answer possible.
            seen = connect(vm, UPLINK_PEER, 7003)
            assert seen == str(UPLINK_HOST)
            # A family without NAT gets nowhere, even now the host forwards.
            in_ns(lab.a0, "ip", "route", "add", str(UPLINK), "via", str(netplan.gateway(lab.a.f)))
            try:
                before_a = lab.a.counters()
                assert connect(lab.a0, UPLINK_PEER, 7003) is None
                assert delta(lab.a, before_a, "inet/leave_family") >= 1
            finally:
                in_ns(lab.a0, "ip", "route", "del", str(UPLINK))
        # NAT is egress only: without open ports nothing gets in.
        in_ns(uplink, "ip", "route", "add", str(netplan.subnet(net.f)), "via", str(UPLINK_HOST))
        with listening(vm, 7004):
            before = net.counters()
            assert connect(uplink, netplan.ip(net.f, 0), 7004) is None
            assert delta(net, before, "inet/enter_family") >= 1
    finally:
        net.down()
    assert IP_FORWARD.read_text().strip() == host_ip_forward  # restored (the fixture checks it too)


def test_ip_forward_comes_back_after_the_last_nat_family(lab, host_ip_forward):
    if nat_families():
        pytest.skip(f"NAT families of another sfmpi on this host: {nat_families()}")
    first, second = lab.family("zeta", nat=True), lab.family("eta", nat=True)
    try:
        assert IP_FORWARD.read_text().strip() == "1"
        first.down()
        assert IP_FORWARD.read_text().strip() == "1"  # eta still needs it
        assert nat_families() == [nft.table_name(second.f)]
    finally:
        first.down()
        second.down()
    assert IP_FORWARD.read_text().strip() == host_ip_forward
    assert not (FORWARDING_DIR / "ip_forward.saved").exists()


def test_nat_and_open_ports_together(lab, uplink, host_ip_forward):
    """Another family with NAT reaches an open port of this one (masqueraded to
    the host's address on this family's bridge), and not a closed port."""
    server = lab.family("theta", open_ports=["7005"])
    client = lab.family("iota", nat=True)
    try:
        s0, c0 = lab.namespace(server, 0), lab.namespace(client, 0)
        in_ns(s0, "ip", "route", "add", str(netplan.subnet(client.f)), "via", str(netplan.gateway(server.f)))
        in_ns(c0, "ip", "route", "add", str(netplan.subnet(server.f)), "via", str(netplan.gateway(client.f)))
        with listening(s0, 7005, 7006):
            before = server.counters()
            assert connect(c0, netplan.ip(server.f, 0), 7005) == str(netplan.gateway(server.f))
            assert connect(c0, netplan.ip(server.f, 0), 7006) is None
            assert delta(server, before, "inet/enter_family") >= 1
    finally:
        client.down()
        server.down()


def test_a_restarted_hostd_remakes_the_family_with_its_options(lab, host_ip_forward):
    """hostd's part without VMs: options go to the store with the family; a new
    Families (hostd restarted) re-adopts the bridge by number and, asked for no
    options, re-makes the same rules from the store."""
    from sfmpi.hostd.state.store import Store
    store = Store(lab.state_dir / "state.db")
    options = NetOptions.parse(True, ["7007/udp", "22"])

    def remembered(name: str) -> NetOptions:
        return NetOptions.from_json(store.family_options(name))

    async def first_hostd(number: int) -> int:
        families = Families(lab.state_dir, remembered)
        fam = await families.ensure("kappa", number, options=options)
        lab.nets.append(fam.net)  # removed at the end whatever happens
        store.put_family_options("kappa", options.to_json())
        assert (await families.ensure("kappa")) is fam  # a clone joins: same family
        # Another parent named kappa while the family lives must ask for the same.
        with pytest.raises(UsageError, match="still up"):
            await families.ensure("kappa", options=NetOptions())
        return fam.number

    async def second_hostd(f: int):
        fam = await Families(lab.state_dir, remembered).ensure("kappa", f)
        lab.nets.append(fam.net)  # its own dnsmasq: this object stops (and reaps) it
        return fam

    try:
        # A number far from a real hostd's, as lab.family() takes (hostd lets
        # ensure() allocate); outside the loop: pyroute2 cannot run inside one.
        f = asyncio.run(first_hostd(allocate_family(START)))
        fam = asyncio.run(second_hostd(f))
        assert fam.number == f and fam.options == options
        assert fam.options.to_json() == {"nat": True, "open_ports": ["22/tcp", "7007/udp"]}
        rules = proc.output(["nft", "list", "chain", "inet", nft.table_name(f), "forward"])
        assert "udp dport 7007 accept" in rules.replace("{ 7007 }", "7007")
        assert "tcp dport 22 accept" in rules.replace("{ 22 }", "22")
        assert nft.table_name(f) in nat_families()
        # The store is what carries them: a name it never saw gets a closed family.
        assert remembered("nobody") == NetOptions()
    finally:
        store.close()
        lab.close_family("kappa")


def test_cleanup_after_a_crash_finds_everything_by_name(lab):
    crashed = FamilyNetwork(allocate_family(START), "gamma", lab.state_dir)
    lab.nets.append(crashed)
    crashed.up()
    crashed.add_vms([0, 1])
    dnsmasq = crashed.dhcp.popen
    # A new process knows only the family number and the state directory.
    cleanup_families([crashed.f], lab.state_dir)
    dnsmasq.wait(5)  # it was stopped through its pid file; reap it
    assert not [n for n in leftover_links() if family_of_link(n) == crashed.f]
    assert not [t for t in leftover_tables() if t.endswith(f"_f{crashed.f}")]
    assert not crashed.dir.exists()
    cleanup_families([crashed.f], lab.state_dir)  # twice: fine


def test_down_leaves_nothing_and_is_safe_twice(lab):
    t0 = time.monotonic()
    lab.close()
    lab.close()
    assert lab.leftovers() == []
    assert time.monotonic() - t0 < 10
