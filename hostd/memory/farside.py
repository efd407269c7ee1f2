"""The far side: on one machine, the memory server runs in a network namespace
of its own, standing for the parent's host, and memtap in hostd's namespace,
so every byte a served clone faults crosses a veth pair and a real TCP
connection, as it would cross the network between two hosts. Across hosts
the memory server runs on the parent's host instead and this is not made.

Addresses are link-local inside namespaces sfmpi made: nothing is routed,
and the host's own namespace gains nothing.
"""
from __future__ import annotations

import logging

from sfmpi import proc
from sfmpi.errors import LazyMemoryError

from ..net.namespace import HostNamespace, enter_argv

log = logging.getLogger("sfmpi.hostd.memory")

NEAR_IF, FAR_IF = "sfmnear0", "sfmfar0"
NEAR_IP, FAR_IP = "169.254.252.1", "169.254.252.2"


def farside_name(hostd_netns: str) -> str:
    return f"{hostd_netns}-mem"


def up_argvs(near_ns: str, far_ns: str) -> list[list[str]]:
    """The veth between hostd's namespace and the far side, and its addresses. Pure."""
    return [
        ["ip", "-n", near_ns, "link", "add", NEAR_IF, "type", "veth", "peer", "name", FAR_IF, "netns", far_ns],
        ["ip", "-n", near_ns, "addr", "add", f"{NEAR_IP}/30", "dev", NEAR_IF],
        ["ip", "-n", far_ns, "addr", "add", f"{FAR_IP}/30", "dev", FAR_IF],
        ["ip", "-n", near_ns, "link", "set", NEAR_IF, "up"],
        ["ip", "-n", far_ns, "link", "set", FAR_IF, "up"],
    ]


class FarSide:
    """ensure() (idempotent) / wrap(argv) / delete() (safe twice)."""

    def __init__(self, near: HostNamespace):
        self.near = near
        self.ns = HostNamespace(farside_name(near.name))
        self.server_ip = FAR_IP

    def ensure(self) -> None:
        if self.ns.exists():
            return
        self.near.ensure()
        self.ns.ensure()
        try:
            for argv in up_argvs(self.near.name, self.ns.name):
                proc.run(argv)
        except Exception as exc:
            self.delete()
            raise LazyMemoryError(f"cannot link the memory server's namespace {self.ns.name}: {exc}") from exc
        log.info("memory server namespace %s linked to %s over %s", self.ns.name, self.near.name, NEAR_IF)

    def wrap(self, argv: list[str]) -> list[str]:
        return enter_argv(self.ns.path, argv)

    def delete(self) -> None:
        # Deleting the namespace deletes its end of the veth, and so the pair.
        self.ns.delete()
