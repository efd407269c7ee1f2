"""The other counters of a VM: its vCPU threads (from QMP) and its network
traffic (its tap's counters, read in hostd's network namespace).

A tap's counters are the host's view: what the tap received is what the guest
sent. So a VM's net_tx_bytes is its tap's rx_bytes, and the other way round.

Why /proc/thread-self/net/dev in a thread that enters the namespace, and not
pyroute2's NetNS: NetNS starts a helper process for each namespace it opens,
and the sampler reads every tap every second; entering the namespace with
setns(2) (pyroute2.netns.setns) from one worker thread and reading one procfs
file costs two system calls and a read. The thread goes back to hostd's own
namespace after each reading, so it never holds a namespace that `down` removes.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

from pyroute2.netns import setns


def vcpu_threads(query_cpus_fast: list[dict]) -> tuple[int, ...]:
    """Thread IDs of the vCPUs, in vCPU order, from QMP query-cpus-fast."""
    cpus = sorted(query_cpus_fast, key=lambda c: int(c.get("cpu-index", 0)))
    return tuple(int(c["thread-id"]) for c in cpus if isinstance(c.get("thread-id"), int) and c["thread-id"] > 0)


def parse_net_dev(text: str) -> dict[str, dict[str, int]]:
    """{interface: {"net_rx_bytes", "net_tx_bytes"}} as its guest sees it, from /proc/net/dev
    (the interface's own rx is the guest's tx)."""
    out = {}
    for line in text.splitlines()[2:]:
        if ":" not in line:
            continue
        name, fields = line.split(":", 1)
        values = fields.split()
        if len(values) < 9:
            continue
        # Receive: bytes packets errs drop fifo frame compressed multicast; then transmit: bytes ...
        out[name.strip()] = {"net_rx_bytes": int(values[8]), "net_tx_bytes": int(values[0])}
    return out


_enter_lock = threading.Lock()


def tap_counters(netns: str, taps: list[str]) -> dict[str, dict[str, int]]:
    """{tap: counters} for the taps that exist in the named namespace ({} if it does not).
    Call it from a worker thread (asyncio.to_thread): the calling thread enters the namespace."""
    wanted = {t for t in taps if t}
    if not wanted:
        return {}
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with _enter_lock:
            setns(target)
            try:
                text = Path("/proc/thread-self/net/dev").read_text()
            finally:
                setns(own)
    finally:
        os.close(target)
        os.close(own)
    return {name: counters for name, counters in parse_net_dev(text).items() if name in wanted}
