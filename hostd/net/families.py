"""Families: a parent VM, its clones, and their private network.

A family is born with its parent VM (named after it) and lives while any
member does: a host-side clone of a checkpoint may outlive the parent. Each
family has a number f (host-wide unique: the kernel allocates it by bridge
name), a bridge, one tap per member and an ID per member (0: parent), from
which addresses follow (hostd/netplan.py).

A family's network options (NAT, open ports) are chosen when its parent
starts; clones join the family and so inherit them. The caller remembers them
(hostd's store), so a family re-made later (hostd restarted, or a clone of a
checkpoint whose family is gone) gets the same rules.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from sfmpi.errors import CapacityError, UsageError

from . import netplan, nft
from .bridge import FamilyNetwork, allocate_family
from .namespace import HostNamespace
from .uplink import Uplink

log = logging.getLogger("sfmpi.hostd.families")


@dataclass(frozen=True)
class NetOptions:
    """What a family's network lets through beyond the family itself."""
    nat: bool = False                            # egress to the uplink, masqueraded
    open_ports: tuple[nft.OpenPort, ...] = ()    # reachable from outside the family

    @classmethod
    def parse(cls, nat: bool = False, open_ports: Iterable[str | int] = ()) -> "NetOptions":
        """From user input (CLI, hostd request): UsageError for anything malformed."""
        if not isinstance(nat, bool):
            raise UsageError(f"nat must be true or false (got {nat!r})")
        if isinstance(open_ports, (str, bytes)) or not isinstance(open_ports, (list, tuple)):
            raise UsageError(f"open ports must be a list such as [\"80/tcp\"] (got {open_ports!r})")
        return cls(nat, nft.parse_open_ports(open_ports))

    def to_json(self) -> dict:
        return {"nat": self.nat, "open_ports": [str(p) for p in self.open_ports]}

    @classmethod
    def from_json(cls, d: dict | None) -> "NetOptions":
        d = d or {}
        return cls.parse(d.get("nat", False), d.get("open_ports", []))

    def __str__(self) -> str:
        ports = ", ".join(str(p) for p in self.open_ports) or "none"
        return f"NAT {'on' if self.nat else 'off'}, open ports {ports}"


@dataclass
class Family:
    name: str
    number: int
    net: FamilyNetwork
    members: dict[str, int] = field(default_factory=dict)   # VM name -> ID
    # Members on other hosts (a fork across hosts), on the family's first host:
    # VM name -> (ID, host). Their IDs are taken; their taps are elsewhere.
    remote: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def options(self) -> NetOptions:
        return NetOptions(self.net.nat, self.net.open_ports)

    def hosts(self) -> list[list[str]]:
        ids = set(self.members.values()) | {k for k, _host in self.remote.values()}
        return [[netplan.hostname(self.name, k), str(netplan.ip(self.number, k))] for k in sorted(ids)]


class Families:
    """Network work runs on one worker thread, in the order it was asked for:
    pyroute2's IPRoute drives an asyncio loop of its own (it cannot run inside
    hostd's), and nft and dnsmasq are blocking subprocesses."""

    def __init__(self, state_dir: Path, remembered: Callable[[str], NetOptions] = lambda name: NetOptions(),
                 netns: HostNamespace | None = None, uplink: Uplink | None = None, first_family: int = 1):
        """remembered(name): the options family `name` had last (hostd: from its store).
        netns: the namespace the families live in (hostd's own; None: the caller's),
        with its uplink for NAT and open ports."""
        self.state_dir = state_dir
        # Where this host's own family numbers start (cluster: disjoint per host, cluster/config.py).
        self.first_family = netplan.check_family(first_family)
        self.remembered = remembered
        self.netns = netns
        self._netns_ready = False
        self.uplink = uplink
        self.by_name: dict[str, Family] = {}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="families",
                                          initializer=netns.enter_this_thread if netns else None)
        # VMs stopped but not yet off the network: taken off together (see leave_soon).
        self._leaving: set[str] = set()
        self._leaving_lock = threading.Lock()

    async def _run(self, fn, *args):
        # The namespace is made when the first family work comes (its worker
        # thread enters it on its first task): a hostd that never starts a VM
        # leaves no namespace behind.
        if self.netns is not None and not self._netns_ready:
            await asyncio.to_thread(self.netns.ensure)
            self._netns_ready = True
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def in_namespace(self, fn, *args):
        """fn(*args) on the families' thread, inside their namespace (a tap opened there is there)."""
        return await self._run(fn, *args)

    def remote_member(self, name: str) -> tuple[Family, int, str] | None:
        """(family, ID, host) of a clone of ours that runs on another host; else None."""
        for fam in self.by_name.values():
            if name in fam.remote:
                netid, host = fam.remote[name]
                return fam, netid, host
        return None

    def of_vm(self, vm: str) -> Family | None:
        for fam in self.by_name.values():
            if vm in fam.members:
                return fam
        return None

    async def ensure(self, name: str, number: int | None = None, options: NetOptions | None = None) -> Family:
        """The living family `name`, or a new one (on bridge `number` when given).

        options: what a starting parent asks for; a living family must have them
        already. None (clones, recovery): the family's own, else the remembered ones.
        """
        # Looked up here, on the event loop's thread: hostd's store is not thread-safe.
        remembered = self.remembered(name) if options is None and name not in self.by_name else None
        return await self._run(self._ensure, name, number, options, remembered)

    def _ensure(self, name: str, number: int | None, options: NetOptions | None,
                remembered: NetOptions | None) -> Family:
        fam = self.by_name.get(name)
        if fam is not None:
            if options is not None and options != fam.options:
                raise UsageError(f"family {name} is still up (members: {', '.join(sorted(fam.members))}) "
                                 f"with {fam.options}; start {name} with those options, or stop them first")
            return fam
        if options is None:
            options = remembered if remembered is not None else NetOptions()
        f = number if number is not None else allocate_family(self.first_family)
        net = FamilyNetwork(f, name, self.state_dir, nat=options.nat, open_ports=options.open_ports,
                            manage_forwarding=self.netns is None)
        net.up()
        try:
            self._connect_uplink(f, options)
        except BaseException:
            net.down()
            raise
        fam = Family(name=name, number=f, net=net)
        self.by_name[name] = fam
        if options.nat or options.open_ports:
            log.info("family %s (%d): %s", name, f, options)
        return fam

    def free_ids(self, fam: Family, count: int, name_taken=lambda name: False) -> list[int]:
        """The lowest IDs no living member holds (1..250; 0 is the parent's) whose
        VM name (the hostname) is free too: a crashed VM keeps its name until down."""
        used = set(fam.members.values()) | {k for k, _host in fam.remote.values()}
        free = [k for k in range(1, netplan.MAX_ID + 1)
                if k not in used and not name_taken(netplan.hostname(fam.name, k))][:count]
        if len(free) < count:
            raise CapacityError(f"family {fam.name} has no free clone IDs left "
                                f"({netplan.MAX_ID} at most at once)")
        return free

    async def add(self, fam: Family, members: list[tuple[str, int]]) -> dict[str, str]:
        """Taps for new members (one nft batch); returns VM name -> tap name."""
        return await self._run(self._add, fam, members)

    def _add(self, fam: Family, members: list[tuple[str, int]]) -> dict[str, str]:
        fam.net.add_vms([k for _vm, k in members])
        for vm, k in members:
            fam.members[vm] = k
        return {vm: netplan.tap_name(fam.number, k) for vm, k in members}

    def leave_soon(self, vm: str) -> None:
        """Take a VM off its family's network, after the work queued before.

        VMs stopped together (8 clones after a job) leave in one batch per
        family: one at a time, each ran its own nft transaction and DHCP update,
        queued up in front of the next clone request's network work."""
        with self._leaving_lock:
            first = not self._leaving
            self._leaving.add(vm)
        if first:
            self._worker.submit(self._leave_pending)

    def _leave_pending(self) -> None:
        with self._leaving_lock:
            vms, self._leaving = self._leaving, set()
        self._leave_all(vms)

    def _leave_all(self, vms: set[str]) -> None:
        # Until this runs, a leaving VM's ID stays in fam.members: free_ids
        # hands out no ID whose tap and rules are still in place.
        leaving: dict[str, tuple[Family, list[int]]] = {}
        for vm in sorted(vms):
            fam = self.of_vm(vm)
            if fam is not None:
                leaving.setdefault(fam.name, (fam, []))[1].append(fam.members.pop(vm))
        for fam, ks in leaving.values():
            try:
                fam.net.remove_vms(ks)
            except Exception as exc:  # cleanup goes on; `down` sweeps what is left
                log.warning("family %s: removing IDs %s from the network: %s", fam.name, ks, exc)
            if not fam.members:
                self.drop(fam)

    def drop_if_empty(self, fam: Family) -> None:
        """After a failed request: a family nobody joined goes (after the work queued before)."""
        self._worker.submit(self._drop_if_empty, fam)

    def _drop_if_empty(self, fam: Family) -> None:
        if not fam.members and self.by_name.get(fam.name) is fam:
            try:
                self.drop(fam)
            except Exception as exc:  # `down` sweeps what is left
                log.warning("family %s: taking it down: %s", fam.name, exc)

    def _connect_uplink(self, f: int, options: NetOptions) -> None:
        if self.uplink is None or not (options.nat or options.open_ports):
            return
        self.uplink.call(self.uplink.up, options.nat)
        if options.open_ports:
            self.uplink.call(self.uplink.route, str(netplan.subnet(f)))

    def drop(self, fam: Family) -> None:
        self.by_name.pop(fam.name, None)
        if self.uplink is not None and fam.net.open_ports:
            self.uplink.call(self.uplink.unroute, str(netplan.subnet(fam.number)))
        fam.net.down()

    async def down(self) -> None:
        """Every family down; then the uplink and the namespace go too."""
        if self.netns is None or self.netns.exists() or self.by_name:
            await self._run(self._down)
        if self.uplink is not None:
            await asyncio.wrap_future(self.uplink.submit(self.uplink.down))
        if self.netns is not None:
            await asyncio.to_thread(self.netns.delete)

    def _down(self) -> None:
        for fam in list(self.by_name.values()):
            self.drop(fam)

    async def sweep(self, numbers: set[int]) -> None:
        if numbers:
            await self._run(self._sweep, numbers)

    def _sweep(self, numbers: set[int]) -> None:
        """Remove what is left of families nobody owns any more (a hostd crash)."""
        owned = {fam.number for fam in self.by_name.values()}
        for f in sorted(numbers - owned):
            try:
                FamilyNetwork(f, "leftover", self.state_dir).down()
            except Exception as exc:
                log.warning("family %d: cleanup of leftovers: %s", f, exc)
