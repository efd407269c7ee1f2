"""The lab's layout and the `ip` commands that build it: pure functions, no I/O.

A lab is K "hosts" on one machine. Host labN is the network namespace labN
with one interface, eth0, at 172.31.254.N/24; the other end of its veth is a
port of the bridge labbr0, which sits in a namespace of its own, sfmpi-lab,
together with the master's address .254. The bridge has its own namespace so
that the main namespace gains nothing: no bridge, no veth, no address and no
route, and the machine's real network never meets the lab's (172.31.254.0/24
may well be in use on the site's network).

Every command below names the namespace it acts in (`ip -n NS`, `ip netns
exec NS`, or a veth peer made directly `netns NS`); only `ip netns add` and
`ip netns delete` run without one. Nothing is ever made in the main namespace
and moved, so a failure half-way leaves nothing there either.
"""
from __future__ import annotations

import ipaddress
import re

from sfmpi.errors import UsageError

LAB_NS = "sfmpi-lab"
BRIDGE = "labbr0"
UNDERLAY = ipaddress.IPv4Network("172.31.254.0/24")
MASTER_IP = UNDERLAY.network_address + 254
# Real hosts' NICs: whatever rides the underlay (a tunnel's headers) has to fit in this.
MTU = 1500
# A lab plays a few hosts of a cluster on one machine; .1 .. .16 never meet the master's .254.
MAX_HOSTS = 16
HOST_IFNAME = "eth0"

_HOST_RE = re.compile(r"^lab([1-9][0-9]*)$")  # no "lab01": one name per host

# No IPv6 in the lab: a host must reach the others only by the addresses above,
# not by link-local or router-advertised ones. "default" covers the links made
# or moved in later, "all" the ones already there (lo).
_NO_IPV6 = ("net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_HOSTS:
        raise UsageError(f"a lab has 1..{MAX_HOSTS} hosts, not {k!r}")
    return k


def host_names(k: int) -> list[str]:
    return [f"lab{n}" for n in range(1, _check_k(k) + 1)]


def host_index(name: str) -> int:
    """N of host labN; UsageError for anything that is not a lab host's name."""
    m = _HOST_RE.match(name) if isinstance(name, str) else None
    if not m or int(m.group(1)) > MAX_HOSTS:
        raise UsageError(f"{name!r} is not a lab host (lab1..lab{MAX_HOSTS})")
    return int(m.group(1))


def is_host_name(name: str) -> bool:
    try:
        host_index(name)
    except UsageError:
        return False
    return True


def host_ip(name: str) -> ipaddress.IPv4Address:
    return UNDERLAY.network_address + host_index(name)


def bridge_port(name: str) -> str:
    """labN's veth end in the lab namespace: named after the host, so the ports
    of all hosts can share that namespace (every host's own end is eth0)."""
    return f"lab{host_index(name)}p"


def _ipv6_off(ns: str) -> list[list[str]]:
    return [["ip", "netns", "exec", ns, "sysctl", "-q", "-w", setting] for setting in _NO_IPV6]


def _lab_namespace_argvs() -> list[list[str]]:
    cidr = f"{MASTER_IP}/{UNDERLAY.prefixlen}"
    return [
        ["ip", "netns", "add", LAB_NS],
        *_ipv6_off(LAB_NS),
        ["ip", "-n", LAB_NS, "link", "set", "lo", "up"],
        # No STP: one bridge and no loops, and its ports forward at once.
        ["ip", "-n", LAB_NS, "link", "add", BRIDGE, "mtu", str(MTU), "type", "bridge", "stp_state", "0"],
        ["ip", "-n", LAB_NS, "addr", "add", cidr, "dev", BRIDGE],
        ["ip", "-n", LAB_NS, "link", "set", BRIDGE, "up"],
    ]


def _host_argvs(name: str) -> list[list[str]]:
    port = bridge_port(name)
    cidr = f"{host_ip(name)}/{UNDERLAY.prefixlen}"
    return [
        ["ip", "netns", "add", name],
        *_ipv6_off(name),
        ["ip", "-n", name, "link", "set", "lo", "up"],
        # Made in the lab namespace with its peer born in the host's namespace.
        ["ip", "-n", LAB_NS, "link", "add", port, "mtu", str(MTU), "type", "veth",
         "peer", "name", HOST_IFNAME, "mtu", str(MTU), "netns", name],
        ["ip", "-n", LAB_NS, "link", "set", port, "master", BRIDGE],
        ["ip", "-n", LAB_NS, "link", "set", port, "up"],
        ["ip", "-n", name, "addr", "add", cidr, "dev", HOST_IFNAME],
        ["ip", "-n", name, "link", "set", HOST_IFNAME, "up"],
    ]


def up_argvs(k: int) -> list[list[str]]:
    """Every command that builds a lab of k hosts from nothing, in order."""
    argvs = _lab_namespace_argvs()
    for name in host_names(k):
        argvs += _host_argvs(name)
    return argvs


def delete_argv(ns: str) -> list[str]:
    return ["ip", "netns", "delete", ns]


def down_argvs(k: int) -> list[list[str]]:
    """up_argvs undone: the hosts last-made-first, then the lab namespace.
    Deleting a namespace deletes its links: a host's eth0 takes its bridge
    port with it, the lab namespace takes the bridge."""
    return [delete_argv(name) for name in reversed(host_names(k))] + [delete_argv(LAB_NS)]
