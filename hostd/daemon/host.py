"""The composition root: builds hostd's parts, wires their events, serves the operations.

Parts and what they depend on (docs/architecture.md has the picture):
    state/   Store (SQLite)                      <- everything that persists
    vm/      VmRegistry, VmRuntime, Parents      <- store
    net/     Families                            <- (kernel, nft, dnsmasq)
    policy/  Admission                           <- usage(): live VMs + tickets
    fork/    Checkpointer, Receivers, Cloner, Retention <- vm, net, policy
    guestapi/ TicketBook, CloneApi               <- CloneHost (this module's GuestSide)
    memory/  ServedMemory (memory server, memtap) <- netns; the cloner asks it for served RAM
    monitor/ StatsTask (per-VM statistics, history) <- vm registry (read only), netns
    resources/ Resources (cgroups, disk throttle, tap rates) <- vm registry, families' namespace
    control/ ControlLoops (PI controllers)        <- statistics history, resources
Events: VmRegistry "gone" -> families (leave the network), clone API (finish
the clone's slot; a parent takes its clones along), served memory (the last
clone of a checkpoint takes its memtap along); "launched" -> clone API
(answer the guest's calls). No part holds a reference back to this object.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
from pathlib import Path

from sfmpi.errors import CheckpointError, NotFound, SfmpiError, UsageError
from sfmpi.paths import Paths

from ..cluster.config import ClusterConfig
from ..cluster.spanning import Spanning
from ..fork.capture import resume_after_migration
from ..fork.checkpointer import Checkpointer
from ..fork.disks import backing_chain, top_disk
from ..fork.cloner import Cloner
from ..fork.manifest import Checkpoint
from ..fork.receiver import Receivers
from ..fork.retention import Retention
from ..guestapi.clone_api import CloneApi
from ..guestapi.tickets import DEFAULT_FAMILY_LIMIT, TicketBook
from ..memory.farside import FarSide
from ..memory.options import ServedOptions
from ..memory.options import for_tickets as served_for_tickets
from ..memory.served import MEMORY_MODES, ServedMemory
from ..control.loops import ControlLoops
from ..resources.applier import Resources
from ..resources.cgroups import VmCgroups, probe_host
from ..monitor.history import StatsHistory
from ..monitor.sampling import StatsTask, interval_from_env, max_age_from_env
from ..net import netplan
from ..net.families import Families, NetOptions
from ..net.namespace import HostNamespace
from ..net.uplink import Uplink
from ..net.uplink import plan as uplink_plan
from ..pool.status import PoolLatency
from ..policy.admission import Admission, Budget, Usage
from ..policy.quotas import FamilyQuota, Quotas
from ..state.records import VmRecord, VmRole, VmState
from ..state.store import Store
from ..vm.driver import choose_driver, make_driver
from ..vm import hugepages
from ..vm.parents import Parents
from ..vm.qemu import is_our_qemu, pid_alive
from ..vm.registry import Vm, VmRegistry
from ..vm.runtime import VmRuntime

log = logging.getLogger("sfmpi.hostd")

FAMILY_LIMIT = int(os.environ.get("SFMPI_FAMILY_LIMIT", DEFAULT_FAMILY_LIMIT))


def clone_memory_mode() -> str:
    """Where the RAM of clones forked from inside a guest comes from: `local`
    (the checkpoint's file), or `served` (through memtap from a memory server,
    as a clone on another host gets it): SFMPI_CLONE_MEMORY."""
    mode = os.environ.get("SFMPI_CLONE_MEMORY", "local")
    if mode not in MEMORY_MODES:
        raise UsageError(f"SFMPI_CLONE_MEMORY is local or served (got {mode!r})")
    return mode


class GuestSide:
    """The clone API's narrow view of hostd (guestapi.clone_api.CloneHost)."""

    def __init__(self, host: "Host"):
        self._vms, self._admission = host.vms, host.admission
        self._checkpoints, self._cloner = host.checkpoints, host.cloner
        self._families, self._runtime, self._retention = host.families, host.runtime, host.retention
        self._quotas = host.quotas
        self._store = host.store
        self._clone_memory = host.clone_memory
        self._span = host.span

    def vm(self, name: str) -> Vm | None:
        return self._vms.find(name)

    def is_member(self, name: str) -> bool:
        """A VM of a ticket that still runs: here, or on another host of a fork across hosts."""
        return self._vms.find(name) is not None or self._families.remote_member(name) is not None

    async def forward_exit(self, name: str, status: int) -> bool:
        return self._span is not None and await self._span.forward_exit(name, status)

    def room(self, family: str, mem_mb: int, cpus: int) -> int:
        """This host's room; in a cluster plus the other hosts' (their last heartbeat's),
        an upper bound place_ticket() narrows."""
        here = self.room_here(family, mem_mb, cpus)
        return here + (self._span.remote_room(mem_mb, cpus) if self._span is not None else 0)

    def room_here(self, family: str, mem_mb: int, cpus: int) -> int:
        return min(self._admission.room(mem_mb, cpus), self._quotas.room(family, mem_mb, cpus))

    async def place_ticket(self, family: str, n: int, mem_mb: int, cpus: int, ticket: str,
                           room_here: int) -> dict[str, int] | None:
        """In a cluster the master places a ticket's clones when it is granted and
        holds their room on every host until the clones run; None on one host."""
        if self._span is None:
            return None
        return await self._span.place(family, n, mem_mb, cpus, allow_fewer=True, ticket=ticket,
                                      room_here=room_here)

    def check_ticket_quota(self, family: str) -> None:
        self._quotas.check_ticket(family)

    def check_checkpoint_quota(self, family: str) -> None:
        self._quotas.check_checkpoint(family)

    async def checkpoint(self, name: str, mode: str, guest_req: int | None, ticket: str) -> Checkpoint:
        return await self._checkpoints.take_for_guest(name, mode, guest_req, ticket)

    def checkpoint_of_family(self, ckpt_id: str, family: str) -> Checkpoint:
        """Only an id, only of the caller's own family; the error names no host path."""
        row = next((r for r in self._store.checkpoint_rows() if r["id"] == ckpt_id), None)
        if row is None or (row["family"] or row["vm"]) != family:
            raise NotFound(f"no checkpoint {ckpt_id} in family {family}")
        try:
            return Checkpoint.load(row["path"])
        except CheckpointError as exc:
            log.warning("checkpoint %s asked for by family %s: %s", ckpt_id, family, exc)
            raise CheckpointError(f"checkpoint {ckpt_id} is damaged or incomplete") from None

    async def clone_for_ticket(self, ckpt, count, ticket, greeting, on_reserved, placement=None) -> dict:
        return await self._cloner.clone_for_ticket(ckpt, count, ticket, greeting, on_reserved,
                                                   memory=self._clone_memory, placement=placement,
                                                   served=served_for_tickets())

    def identity_of(self, name: str) -> dict:
        fam, rec = self._families.of_vm(name), self._vms.record(name)
        if fam is None or rec is None:
            remote = self._families.remote_member(name)
            if remote is None:
                return {}
            fam, netid, host = remote
            return {**netplan.identity(fam.number, fam.name, netid), "host": host}
        return netplan.identity(fam.number, fam.name, rec.netid)

    def family_hosts(self, name: str) -> list[list[str]]:
        fam = self._families.of_vm(name)
        return fam.hosts() if fam is not None else []

    async def stop_vm(self, name: str) -> None:
        remote = self._families.remote_member(name)
        if remote is not None and self._span is not None:
            await self._span.stop_remote_vm(remote[2], name)
            return
        await self._runtime.stop(name)

    def ticket_ended(self, ticket: str) -> None:
        self._retention.ticket_ended(ticket)


class Host:
    def __init__(self, paths: Paths, store: Store, budget: Budget, cluster: ClusterConfig | None = None):
        self.paths = paths
        self.store = store
        self.budget = budget
        self.cluster = cluster
        self.host_name = cluster.host if cluster else socket.gethostname()
        self.vms = VmRegistry(store)
        self.netns = HostNamespace(paths.netns)   # made with the first family
        self.families = Families(paths.home / "net", remembered=self._remembered_options, netns=self.netns,
                                 uplink=Uplink(uplink_plan(paths.tag), paths.netns),
                                 first_family=cluster.family_start if cluster else 1)
        # QEMU runs in the families' namespace: it opens its tap there by name.
        self.driver = make_driver(choose_driver(paths.driver_file), paths, self.netns.path, paths.tag, self.netns.wrap,
                                  self.families.in_namespace)
        self.runtime = VmRuntime(paths, store, self.vms, self.driver)
        self.tickets = TicketBook(FAMILY_LIMIT, store, host=self.host_name)
        self.admission = Admission(budget, self.usage)
        self.quotas = Quotas(FamilyQuota.from_env(), budget, self.family_usage,
                             lambda family: sum(1 for r in store.checkpoint_rows() if r["family"] == family),
                             self.tickets.outstanding)
        self.parents = Parents(self.runtime, self.vms, self.admission, self.families, store, self.host_name)
        self.checkpoints = Checkpointer(paths, store, self.vms, self.runtime, Receivers(self.runtime, self.admission))
        self.retention = Retention(paths, store, self.vms)
        # Served memory: the memory server on the far side of a veth, memtap here.
        self.clone_memory = clone_memory_mode()
        if self.driver.name == "libvirt" and cluster is not None:
            # A remote clone's QEMU runs where the hosts' network is, for its
            # NBD disk, and is given its family's tap as a descriptor: libvirt
            # opens a tap by name, in its own namespace only (docs/libvirt.md).
            raise UsageError("the libvirt driver runs one host's VMs: a host of a cluster needs --driver direct")
        # In a cluster the server listens on this host's address, for every host's memtaps.
        self.memory = ServedMemory(paths.memory, FarSide(self.netns), near_wrap=self.netns.wrap,
                                   listen=cluster.address if cluster else None)
        self.cloner = Cloner(self.runtime, self.vms, self.admission, self.families, self.checkpoints.find,
                             served_ram=self.memory.ram_for, host_name=self.host_name)
        self.span: Spanning | None = None
        if cluster is not None:
            self.span = Spanning(cluster, paths, self.cloner, self.families, self.memory, self.runtime, self.vms,
                                 self.admission)
            self.cloner.span = self.span
            self.vms.on_gone(self.span.vm_gone)
            self.tickets.on_change = self.span.ticket_changed
        self.clone_api = CloneApi(GuestSide(self), self.tickets)
        if self.span is not None:
            self.span.member_ended = self.clone_api.member_ended
        self.vms.on_gone(lambda rec, _reason: self.families.leave_soon(rec.name))
        self.vms.on_gone(self.clone_api.vm_gone)
        self.vms.on_gone(self.retention.vm_gone)
        self.vms.on_gone(self.memory.vm_gone)
        self.vms.on_launched(self.clone_api.attach)
        self.runtime.add_explainer(self.memory.explain)
        self.resources = Resources(self.vms, VmCgroups(paths.tag, probe_host()), self.families.in_namespace)
        self.vms.on_launched(self.resources.vm_launched)
        self.vms.on_gone(self.resources.vm_gone)
        self.sampling = StatsTask(self.vms, paths.netns, StatsHistory(paths.home / "stats.db", max_age_from_env()),
                               interval_from_env())
        self.control = ControlLoops(self.vms, self.sampling.history, self.resources,
                                    pools=PoolLatency(paths.home))

    # -- bookkeeping -----------------------------------------------------
    def usage(self) -> Usage:
        live = [r for r in self.vms.records() if r.state not in (VmState.STOPPED, VmState.CRASHED)]
        held_mb, held_cpus = self.tickets.reserved()  # granted tickets' clones to come
        return Usage(mem_mb=sum(r.spec["mem_mb"] for r in live) + held_mb,
                     vcpus=sum(r.spec["cpus"] for r in live) + held_cpus)

    def family_usage(self, family: str) -> Usage:
        live = [r for r in self.vms.records() if r.family == family
                and r.state not in (VmState.STOPPED, VmState.CRASHED)]
        held_mb, held_cpus = self.tickets.reserved(family)
        return Usage(mem_mb=sum(r.spec["mem_mb"] for r in live) + held_mb,
                     vcpus=sum(r.spec["cpus"] for r in live) + held_cpus)

    def _remembered_options(self, family: str) -> NetOptions:
        return NetOptions.from_json(self.store.family_options(family))

    def family_options(self, family: str) -> NetOptions:
        """A living family's network options, else the ones remembered for that name."""
        if not family:
            return NetOptions()
        fam = self.families.by_name.get(family)
        return fam.options if fam is not None else self._remembered_options(family)

    def describe(self, rec: VmRecord) -> dict:
        return {
            "name": rec.name, "role": rec.role.value, "state": rec.state.value, "pid": rec.pid,
            "mem_mb": rec.spec["mem_mb"], "cpus": rec.spec["cpus"], "accel": rec.spec["accel"],
            "checkpoint": rec.checkpoint, "error": rec.error.splitlines()[0] if rec.error else "",
            "family": rec.family, "family_no": rec.family_no or None,
            "netid": rec.netid if rec.family else None,
            "ip": str(netplan.ip(rec.family_no, rec.netid)) if rec.family_no else "",
            "ticket": rec.ticket, "host": self.host_name, **self.family_options(rec.family).to_json(),
            "resources": rec.resources,
        }

    # -- operations ------------------------------------------------------
    async def start_vm(self, name: str, image: str, **kwargs) -> dict:
        res = await self.parents.start(name, image, **kwargs)
        return {**self.describe(res.pop("rec")), **res}

    async def stop_vm(self, name: str) -> dict:
        return await self.runtime.stop(name)

    def list_vms(self) -> list[dict]:
        return [self.describe(r) for r in self.vms.records()]

    async def exec(self, name, argv, sink, env=None, cwd=None) -> int:
        return await self.runtime.exec(name, argv, sink, env, cwd)

    async def checkpoint(self, name: str, mode: str | None = None, keep: int | None = None) -> dict:
        if keep is not None:
            if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
                raise UsageError(f"--keep must be at least 1 (got {keep!r})")
        res = await self.checkpoints.take(name, mode)
        if keep is not None:
            res["removed"] = self.retention.keep_newest(name, keep)
        res["merged_layers"] = await self.retention.bound_chain(name)
        return res

    def checkpoint_list(self) -> list[dict]:
        return self.retention.list()

    def checkpoint_remove(self, ckpt_id: str) -> dict:
        return self.retention.remove(ckpt_id)

    async def clone(self, ref: str, n: int, allow_fewer: bool = False, memory: str = "local",
                    policy: str | None = None, served: ServedOptions = ServedOptions()) -> dict:
        if policy is not None and self.span is None:
            raise UsageError("clone: --policy places clones over the hosts of a cluster; this hostd is alone")
        return await self.cloner.clone(ref, n, allow_fewer, memory, policy, served)

    def stats(self) -> dict:
        """Counters of the lazy memory path (memory server, memtaps)."""
        return {"memory": self.memory.stats()}

    def vm_stats(self, name: str, since: float = 0.0, last: int | None = None) -> dict:
        """A VM's statistics history (a Get-Stat): samples from `since` (Unix s), or its `last` ones."""
        if isinstance(since, bool) or not isinstance(since, (int, float)) or since < 0:
            raise UsageError(f"--since must be a time (got {since!r})")
        history = self.sampling.history
        samples = history.since_last(name, last) if last else history.since(name, float(since))
        rec = self.vms.record(name)
        if rec is None and not samples:
            raise NotFound(f"no VM named {name} (see `sfmpi vm list`)")
        return {"vm": name, "state": rec.state.value if rec else "gone", "interval_s": self.sampling.interval,
                "samples": samples}

    # -- recovery and teardown --------------------------------------------
    async def recover(self) -> dict:
        """After a restart: re-attach to VMs whose QEMU still runs, reap the rest."""
        attached, reaped = [], []
        seen_families: set[int] = set()
        for rec in self.vms.records():
            if rec.family_no:
                seen_families.add(rec.family_no)
            if rec.state in (VmState.CRASHED, VmState.STOPPED):
                continue
            alive = rec.pid is not None and pid_alive(rec.pid) and is_our_qemu(rec.pid, rec.qmp_path)
            if alive and rec.role != VmRole.RECEIVER and rec.state != VmState.STARTING:
                try:
                    vm = await self.runtime.attach(rec)
                    await self._resync(vm)
                    if rec.family_no:
                        # Re-adopt the family: same bridge, the running QEMU's tap,
                        # the rules of its remembered options (NAT, open ports).
                        fam = await self.families.ensure(rec.family, rec.family_no)
                        await self.families.add(fam, [(rec.name, rec.netid)])
                    attached.append(rec.name)
                    continue
                except SfmpiError as exc:
                    log.warning("VM %s: cannot re-attach (%s); reaping it", rec.name, exc)
                    vm = self.vms.detach(rec.name)
                    if vm is not None and vm.agent is not None:
                        await vm.agent.close()
            if alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rec.pid, 9)
            self.runtime.release(rec, reason="lost while hostd was down")
            self.vms.delete(rec.name)
            reaped.append(rec.name)
        reaped += self._reap_unexplained()
        await self.families.sweep(seen_families)
        # Tickets after VMs: a ticket's clones are known to be alive or gone now.
        self.clone_api.restored(self.tickets.restore(alive=set(self.vms.live)))
        self.retention.recover(live_tickets=set(self.tickets.tickets))
        return {"attached": attached, "reaped": reaped}

    async def _resync(self, vm: Vm) -> None:
        """A hostd killed mid-checkpoint may have left its VM paused, or on a new
        disk layer it never recorded: what QEMU says wins."""
        _node, top = await top_disk(vm.qemu)
        if top != vm.rec.overlay:
            log.warning("VM %s writes to %s, not %s: taking QEMU's word", vm.name, top, vm.rec.overlay)
            self.vms.update(vm, overlay=top, backing=tuple(await backing_chain(top)))
        status = await vm.qemu.status()
        if status in ("paused", "postmigrate", "finish-migrate") and vm.rec.state == VmState.RUNNING:
            log.warning("VM %s was left %s by a hostd that died: continuing it", vm.name, status)
            await resume_after_migration(vm.qemu)

    def _reap_unexplained(self) -> list[str]:
        """What a hostd killed mid-step left that no record explains: QEMUs of
        this state directory, partial checkpoints, runtime sockets."""
        known = {r.pid for r in self.vms.records() if r.pid}
        reaped = []
        for pid in _qemus_of(self.paths.shm):
            if pid not in known:
                log.warning("reaping QEMU %d of %s that no record explains", pid, self.paths.shm)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
                reaped.append(f"pid {pid}")
        for partial in self.paths.checkpoints.glob(".*.partial"):
            shutil.rmtree(partial, ignore_errors=True)
        names = {r.name for r in self.vms.records()}
        for f in self.paths.shm.glob("*"):
            if f.suffix in (".qmp", ".agent", ".mig", ".ram") and f.stem not in names:
                f.unlink(missing_ok=True)
        return reaped

    async def down(self) -> dict:
        """Stop every VM (clones first), remove every runtime file."""
        await self.control.clear()
        recs = self.vms.records()
        stopped = []
        for role in (VmRole.CLONE, VmRole.RECEIVER, VmRole.PARENT):
            batch = [r for r in recs if r.role == role]
            await asyncio.gather(*(self.runtime.stop(r.name) for r in batch), return_exceptions=True)
            stopped += [r.name for r in batch]
        self.runtime.cancel_watchers()
        await self.resources.down()
        if self.span is not None:
            await self.span.down()
        await asyncio.to_thread(self.memory.down)   # before the namespaces it runs in go
        await self.driver.close(down=True)          # libvirtd runs in the families' namespace
        await self.families.down()
        shutil.rmtree(self.paths.shm, ignore_errors=True)
        for ram in hugepages.leftover_files(self.paths.shm.name):  # a parent whose stop failed
            ram.unlink(missing_ok=True)
        for leftover in self.paths.vms.glob("*"):  # logs of VMs that failed to start
            shutil.rmtree(leftover, ignore_errors=True)
        self.retention.collect_layers()
        self.paths.driver_file.unlink(missing_ok=True)   # the next hostd may choose another
        return {"stopped": stopped}


def _qemus_of(shm: Path) -> list[int]:
    """PIDs of QEMU processes whose sockets live in this state directory's runtime dir."""
    import psutil
    found = []
    needle = str(shm) + "/"
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if "qemu-system" in (p.info["name"] or "") and any(needle in a for a in p.info["cmdline"] or []):
                found.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found
