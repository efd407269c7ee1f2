"""A family's network across hosts: one unicast VXLAN port on its bridge.

Every host that holds VMs of a family has the family's bridge in its hostd's
namespace; the bridges are joined by VXLAN segment <f> (the family number is
the VNI: numbers are the same on every host of the family, as the addresses
are). No multicast underlay: one all-zeros FDB entry per other host floods
broadcasts and unknown unicast to each of them, and the bridge learns which
MAC is behind the tunnel.

The VXLAN device is made from hostd's own namespace (the host's network,
where the underlay address lives) and created straight into the families'
namespace: its UDP socket stays where it was made, so the tunnel rides the
host's network while its port sits on the family bridge. The frames it may
carry are decided by the family's nft rules (chain tunnel_in, nft.py).
"""
from __future__ import annotations

import ipaddress
import logging

from sfmpi import proc
from sfmpi.errors import NetworkError

from . import netplan

log = logging.getLogger("sfmpi.hostd.tunnel")

VXLAN_PORT = 4789          # IANA's
ZERO_MAC = "00:00:00:00:00:00"


def _ip(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise NetworkError(f"{text!r} is not an IPv4 address of a host") from None


def create_argvs(netns: str, f: int, local_ip: str) -> list[list[str]]:
    """The VXLAN port of family f, on its bridge in `netns`, sending from local_ip. Pure."""
    vx, inside = netplan.vxlan_name(f), ["ip", "-n", netns]
    # netns before type: what follows type are the vxlan's own options.
    return [["ip", "link", "add", vx, "netns", netns, "type", "vxlan", "id", str(f), "local", _ip(local_ip),
             "dstport", str(VXLAN_PORT), "nolearning"],
            # The guests' MTU (netplan.MTU) is what fits: no fragmentation in the tunnel.
            [*inside, "link", "set", vx, "mtu", str(netplan.MTU)],
            [*inside, "link", "set", vx, "master", netplan.bridge_name(f), "up"]]


def fdb_argvs(netns: str, f: int, add: set[str], remove: set[str]) -> list[list[str]]:
    """Flood entries towards hosts that joined the family, away from those that left. Pure."""
    vx = netplan.vxlan_name(f)
    return ([["bridge", "-n", netns, "fdb", "append", ZERO_MAC, "dev", vx, "dst", _ip(p)] for p in sorted(add)] +
            [["bridge", "-n", netns, "fdb", "del", ZERO_MAC, "dev", vx, "dst", _ip(p)] for p in sorted(remove)])


def parse_flood_peers(fdb_show: str) -> set[str]:
    """`bridge fdb show dev sfvx<f>` -> the hosts its all-zeros entries flood to."""
    peers = set()
    for line in fdb_show.splitlines():
        words = line.split()
        if words[:1] == [ZERO_MAC] and "dst" in words:
            peers.add(words[words.index("dst") + 1])
    return peers


async def span(netns: str, f: int, local_ip: str, peers: set[str]) -> None:
    """Family f's bridge reaches exactly `peers` (other hosts' underlay
    addresses) over its tunnel; made on first use. Run from hostd's own
    namespace (the event loop's thread), never from the families' worker."""
    peers = {_ip(p) for p in peers} - {_ip(local_ip)}
    vx = netplan.vxlan_name(f)
    try:
        rc, _out, _err = await proc.run_async(["ip", "-n", netns, "link", "show", vx], check=False)
        if rc != 0:
            for argv in create_argvs(netns, f, local_ip):
                await proc.run_async(argv)
            log.info("family %d spans hosts over %s (from %s)", f, vx, local_ip)
        _rc, out, _err = await proc.run_async(["bridge", "-n", netns, "fdb", "show", "dev", vx])
        now = parse_flood_peers(out.decode())
        for argv in fdb_argvs(netns, f, peers - now, now - peers):
            await proc.run_async(argv)
    except NetworkError:
        raise
    except Exception as exc:
        raise NetworkError(f"family {f}: cannot join its network to hosts {sorted(peers)}: {exc}") from exc


async def unspan(netns: str, f: int) -> None:
    """The family is on this host alone again: its tunnel goes (fine if it was never made)."""
    await proc.run_async(["ip", "-n", netns, "link", "del", netplan.vxlan_name(f)], check=False)
