"""The one way between hostd's network namespace and the world: a veth pair.

Made when the first family with NAT or open ports comes up, removed with the
namespace. The host's main routing table gains nothing: the host end has a
/32 link-local address (no subnet route), and what must be routed to the
namespace (the namespace's address, the subnets of families with open ports)
goes into a routing table of its own, chosen by `ip rule`s for exactly those
destinations.
- Egress (NAT families): the namespace masquerades a family to its veth
  address and routes it to the host; the host masquerades it again to its
  uplink (table `ip sfmpi_h<tag>`), with IPv4 forwarding on (the host-wide
  value is saved and restored as for families in the main namespace).
- Inbound (open ports): traffic routed to a family's subnet is sent over the
  veth; the family's own rules let in only its open ports.
"""
from __future__ import annotations

import ipaddress
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from sfmpi import proc
from sfmpi.errors import NetworkError

from .bridge import _disable_ipv6, _forwarding_lock, _forwarding_on, restore_forwarding, run_nft

log = logging.getLogger("sfmpi.hostd.uplink")

NS_IF = "sfup0"


@dataclass(frozen=True)
class UplinkPlan:
    host_if: str
    host_ip: ipaddress.IPv4Address
    ns_ip: ipaddress.IPv4Address
    table: int        # the routing table with the namespace's routes
    pref: int         # the priority of the ip rules that choose it
    nat_table: str    # the host's nft table (masquerade to the uplink)
    ns_if: str = NS_IF


def plan(tag: str, override: str | None = None) -> UplinkPlan:
    """From the state directory's tag: link-local addresses (a /30 of 169.254/16,
    or SFMPI_UPLINK_NET), a routing table and rule priority, names. Pure."""
    n = int(tag, 16)
    override = override if override is not None else os.environ.get("SFMPI_UPLINK_NET")
    if override:
        net = ipaddress.IPv4Network(override, strict=True)
        if net.prefixlen != 30:
            raise NetworkError(f"SFMPI_UPLINK_NET must be a /30 (got {override})")
        host_ip, ns_ip = list(net.hosts())
    else:
        base = ipaddress.IPv4Address("169.254.0.0") + (1 + n % 254) * 256 + ((n >> 8) % 64) * 4
        host_ip, ns_ip = base + 1, base + 2
    return UplinkPlan(host_if=f"sfu{tag}", host_ip=host_ip, ns_ip=ns_ip, table=20000 + n % 10000,
                      pref=9000 + n % 1000, nat_table=f"sfmpi_h{tag}")


def host_nat_script(p: UplinkPlan) -> str:
    """nft script (re)making the host's masquerade table for the namespace's egress."""
    return (f"table ip {p.nat_table}\ndelete table ip {p.nat_table}\n"
            f"table ip {p.nat_table} {{\n"
            f"\tchain postrouting {{\n"
            f"\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
            f"\t\tiifname \"{p.host_if}\" oifname != \"{p.host_if}\" masquerade\n"
            f"\t}}\n}}\n")


def up_argvs(p: UplinkPlan, netns: str) -> list[list[str]]:
    """The veth pair and its addresses and routes (host side, then namespace side)."""
    inside = ["ip", "-n", netns]
    return [
        ["ip", "link", "add", p.host_if, "type", "veth", "peer", "name", p.ns_if, "netns", netns],
        ["ip", "addr", "add", f"{p.host_ip}/32", "dev", p.host_if],
        ["ip", "link", "set", p.host_if, "up"],
        ["ip", "route", "replace", f"{p.ns_ip}/32", "dev", p.host_if, "table", str(p.table)],
        ["ip", "rule", "add", "to", f"{p.ns_ip}/32", "lookup", str(p.table), "pref", str(p.pref)],
        [*inside, "addr", "add", f"{p.ns_ip}/32", "dev", p.ns_if],
        [*inside, "link", "set", p.ns_if, "up"],
        [*inside, "route", "replace", f"{p.host_ip}/32", "dev", p.ns_if],
        [*inside, "route", "replace", "default", "via", str(p.host_ip), "dev", p.ns_if],
    ]


def route_argvs(p: UplinkPlan, subnet: str, add: bool) -> list[list[str]]:
    """Send a family's subnet to the namespace (for its open ports), or stop."""
    verb = "add" if add else "del"
    return [["ip", "route", "replace" if add else "del", subnet, "via", str(p.ns_ip), "dev", p.host_if,
             "table", str(p.table)],
            ["ip", "rule", verb, "to", subnet, "lookup", str(p.table), "pref", str(p.pref)]]


class Uplink:
    """Runs in hostd's own namespace (not the families' worker). up() is idempotent."""

    def __init__(self, plan_: UplinkPlan, netns: str):
        self.plan = plan_
        self.netns = netns
        self.routed: set[str] = set()
        # Its own thread, started now from the caller's (hostd's main) thread: a
        # thread is born in its creator's namespace, and the families' worker,
        # which asks for most of this, lives in the other one.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="uplink")
        self._thread.submit(lambda: None).result()

    def submit(self, fn, *args) -> Future:
        return self._thread.submit(fn, *args)

    def call(self, fn, *args):
        """fn(*args) on the uplink's thread, waiting for it (from any thread but that one)."""
        return self.submit(fn, *args).result()

    def is_up(self) -> bool:
        # Asked of `ip`, not /sys/class/net: sysfs shows the namespace it was
        # mounted in, and a lab host's hostd runs in a namespace of its own (there
        # a second NAT family found no uplink and made it again: "File exists").
        return proc.run(["ip", "link", "show", "dev", self.plan.host_if], check=False).returncode == 0

    def up(self, nat: bool) -> None:
        try:
            if not self.is_up():
                argvs = up_argvs(self.plan, self.netns)
                proc.run(argvs[0])
                # No IPv6 on the host end (no link-local address, no router solicitations).
                _disable_ipv6(self.plan.host_if)
                for argv in argvs[1:]:
                    proc.run(argv)
                log.info("uplink %s (%s) <-> %s (%s) in %s", self.plan.host_if, self.plan.host_ip,
                         self.plan.ns_if, self.plan.ns_ip, self.netns)
            if nat:
                with _forwarding_lock() as saved:
                    _forwarding_on(saved)
                    run_nft(host_nat_script(self.plan))
        except Exception as exc:
            raise NetworkError(f"cannot set up the uplink of {self.netns}: {exc}") from exc

    def route(self, subnet: str) -> None:
        if subnet in self.routed:
            return
        for argv in route_argvs(self.plan, subnet, add=True):
            proc.run(argv)
        self.routed.add(subnet)

    def unroute(self, subnet: str) -> None:
        for argv in route_argvs(self.plan, subnet, add=False):
            proc.run(argv, check=False)
        self.routed.discard(subnet)

    def down(self) -> None:
        """Everything on the host side (the namespace side goes with the namespace)."""
        for subnet in list(self.routed):
            self.unroute(subnet)
        # Rules for subnets a crashed hostd routed: all rules of our table.
        rules = proc.output(["ip", "rule", "list", "lookup", str(self.plan.table)], check=False)
        for line in rules.splitlines():
            to = line.split("to ", 1)[1].split()[0] if "to " in line else None
            if to:
                proc.run(["ip", "rule", "del", "to", to, "lookup", str(self.plan.table)], check=False)
        proc.run(["ip", "route", "flush", "table", str(self.plan.table)], check=False)
        proc.run(["ip", "link", "del", self.plan.host_if], check=False)
        run_nft(f"table ip {self.plan.nat_table}\ndelete table ip {self.plan.nat_table}\n")
        restore_forwarding()
