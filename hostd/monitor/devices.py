"""The other counters of a VM: its vCPU threads (from QMP) and its network
traffic (its tap's counters, read in hostd's network namespace).

A tap's counters are the host's view: what the tap received is what the guest
sent. So a VM's net_tx_bytes is its tap's rx_bytes, and the other way round.
"""
from __future__ import annotations

from pyroute2 import NetNS


def vcpu_threads(query_cpus_fast: list[dict]) -> tuple[int, ...]:
    """Thread IDs of the vCPUs, in vCPU order, from QMP query-cpus-fast."""
    cpus = sorted(query_cpus_fast, key=lambda c: int(c.get("cpu-index", 0)))
    return tuple(int(c["thread-id"]) for c in cpus if isinstance(c.get("thread-id"), int) and c["thread-id"] > 0)


def tap_counters(netns: str, taps: list[str]) -> dict[str, dict[str, int]]:
    """{tap: {"net_rx_bytes", "net_tx_bytes"}} as the VM sees them; a tap that is gone is left out."""
    out = {}
    with NetNS(netns) as ns:
        for tap in taps:
            links = ns.get_links(ifname=tap) if tap else []
            if not links:
                continue
            stats = links[0].get_attr("IFLA_STATS64") or links[0].get_attr("IFLA_STATS") or {}
            out[tap] = {"net_rx_bytes": int(stats.get("tx_bytes", 0)), "net_tx_bytes": int(stats.get("rx_bytes", 0))}
    return out
