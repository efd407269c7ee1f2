"""hostd's own network namespace: where family bridges, taps, DHCP and nft tables live.

With the families in the host's main namespace, every family's gateway
address and route would sit in the host's routing table (a site whose own
network uses 10.x would see them collide) and the host's own stack would be on
every family's L2. So each hostd makes one namespace, `sfmpi-<tag>` (the tag of
its state directory), and everything of its families goes in there: the
Families worker thread enters it once (netlink sockets, /proc/sys writes,
/dev/net/tun and the `nft` and `dnsmasq` it starts all follow the thread's
namespace), and QEMU runs in it (`nsenter --net`), so it opens its tap by name.

Traffic between the namespace and the world passes one veth pair, made only
when a family asks for NAT or open ports (hostd/net/uplink.py). `sfmpi down`
deletes the namespace.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from pathlib import Path

from sfmpi import proc
from sfmpi.errors import NetworkError

log = logging.getLogger("sfmpi.hostd.netns")

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def netns_name(tag: str) -> str:
    return f"sfmpi-{tag}"


def enter_argv(netns_path: str, argv: list[str]) -> list[str]:
    """argv run inside the namespace: nsenter switches the network namespace
    only (no mount or PID namespace) and execs, so the PID is argv's."""
    return ["nsenter", f"--net={netns_path}", "--", *argv]


def enter_thread(netns_path: str | os.PathLike) -> None:
    """Move the calling thread (only it) into the network namespace at netns_path."""
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetworkError(f"setns into network namespace {netns_path} failed: {os.strerror(err)}")
    finally:
        os.close(fd)


def _sysctl(path: str, value: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        Path("/proc/sys", path).write_text(value)


class HostNamespace:
    """ensure() (idempotent: a restarted hostd finds it) / enter_this_thread() / delete() (safe twice)."""

    def __init__(self, name: str):
        self.name = name
        self.path = str(NETNS_DIR / name)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def ensure(self) -> None:
        if not self.exists():
            try:
                proc.run(["ip", "netns", "add", self.name])
            except Exception as exc:
                raise NetworkError(f"cannot create network namespace {self.name}: {exc}") from exc
            log.info("network namespace %s made", self.name)
        # Settings of the namespace itself, made each time (cheap, idempotent).
        proc.run(enter_argv(self.path, ["ip", "link", "set", "lo", "up"]))

    def configure_from_inside(self) -> None:
        """Run on a thread inside the namespace: per-namespace sysctls. Forwarding
        is on (families route to the uplink; their nft rules decide what passes),
        bridged IPv4 meets the inet hooks (the family rules' inet table), no IPv6."""
        _sysctl("net/ipv4/ip_forward", "1")
        _sysctl("net/bridge/bridge-nf-call-iptables", "1")
        _sysctl("net/ipv6/conf/all/disable_ipv6", "1")
        _sysctl("net/ipv6/conf/default/disable_ipv6", "1")

    def enter_this_thread(self) -> None:
        """Move the calling thread (only it) into the namespace."""
        enter_thread(self.path)
        self.configure_from_inside()

    def wrap(self, argv: list[str]) -> list[str]:
        return enter_argv(self.path, argv)

    def delete(self) -> None:
        if self.exists():
            try:
                proc.run(["ip", "netns", "delete", self.name])
            except Exception as exc:
                raise NetworkError(f"cannot delete network namespace {self.name}: {exc}") from exc
            log.info("network namespace %s deleted", self.name)


def leftover_namespaces() -> list[str]:
    """Every sfmpi namespace on the host (whichever hostd made it)."""
    if not NETNS_DIR.exists():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith("sfmpi-"))
