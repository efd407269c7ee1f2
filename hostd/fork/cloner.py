"""Starting clones from a checkpoint: N QEMUs in parallel, all or nothing.

Each clone maps the checkpoint's RAM privately, starts on a copy of the
checkpoint's overlay template, loads the device state from an inherited
descriptor, and waits at a barrier so all resume together. Then hostd greets
it: the answer to the clone call it is inside of (in-guest clone), or an
`identify` op (host-side `sfmpi clone`); either way the agent re-identifies the
clone (MAC, IP, hostname, clock, entropy, machine-id, hooks) and reports back.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import os
import secrets
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from sfmpi.errors import AgentError, CloneError, QemuError, SfmpiError, UsageError
from sfmpi.native import keepram_path, nothp_path

from .. import crashpoints
from ..memory.options import ServedOptions
from ..net import netplan
from ..net.families import Families, Family
from ..policy.admission import Admission
from ..resources.settings import validate_stored
from ..state.records import VmRecord, VmRole, VmState
from ..vm.cmdline import Launch, NbdBacking, Nic, Qcow2Disk, Sockets
from ..vm.registry import VmRegistry
from ..vm.runtime import VmRuntime
from ..vm.tap import open_tap
from .capture import set_capabilities
from .disks import make_overlay_template
from .manifest import Checkpoint

log = logging.getLogger("sfmpi.hostd.cloning")

CLONE_READY_TIMEOUT = 120.0
# greeting(identity, extras) -> the first message a resumed clone's agent gets.
Greeting = Callable[[dict, dict], dict]
ServedRam = Callable[[Checkpoint, list[str], ServedOptions], Awaitable[str]]


@dataclass(frozen=True)
class Order:
    """One clone to start: its VM name, family ID (address) and index in the request."""
    name: str
    netid: int
    index: int


def identify_greeting(ident: dict, extras: dict) -> dict:
    return {"op": "identify", "identity": ident, **extras}


def greeting_from(spec: dict) -> tuple[Greeting, str]:
    """A greeting and the event it is answered with, from its description
    (which travels to the clone hosts of a fork across hosts):
    {"kind": "identify"} (host-side clone), or {"kind": "ticket", "re": the
    pending call's id, "size", "ticket"} (the answer to the guest's clone call)."""
    if spec.get("kind") == "identify":
        return identify_greeting, "identified"
    if spec.get("kind") != "ticket":
        raise UsageError(f"unknown greeting {spec.get('kind')!r}")
    re_, size, ticket = spec.get("re"), spec.get("size"), spec.get("ticket")
    if not isinstance(re_, int) or isinstance(re_, bool) or not isinstance(size, int) or not isinstance(ticket, str):
        raise UsageError("a ticket greeting needs re, size and ticket")

    def greet(ident: dict, extras: dict) -> dict:
        return {"re": re_, "ok": True, "id": ident["id"], "size": size, "ticket": ticket, "family": ident["family"],
                "ip": ident["ip"], "hostname": ident["hostname"], "identity": ident, **extras}
    return greet, "cloned"



def inherited_resources(ckpt: Checkpoint) -> dict:
    """The settings a clone starts with: its checkpoint's VM's (a manifest from
    another host is checked like any input; a bad one gives no settings, logged)."""
    try:
        return validate_stored(ckpt.resources, int(ckpt.machine.get("cpus", 1)))
    except UsageError as exc:
        log.warning("checkpoint %s: resource settings ignored: %s", ckpt.id, exc)
        return {}


def clone_env(ram_path: str, served: bool, reports_free_pages: bool) -> tuple[tuple[str, str], ...]:
    """The shims a clone's QEMU runs with preloaded: served memory takes no
    huge-page advice (else every fault reads 4 MiB from the server); a guest
    that reports free pages must not punch holes in the RAM file every clone
    maps (QEMU 7.2 does, even on a private mapping)."""
    shims = ([nothp_path()] if served else []) + ([keepram_path()] if reports_free_pages else [])
    if not shims:
        return ()
    keep = (("SFMPI_KEEP_FILE", ram_path),) if reports_free_pages else ()
    return (("LD_PRELOAD", ":".join(shims)), *keep)


class Cloner:
    """Depends on the VM runtime (launch, abandon), the registry, the host's
    admission and the families; find(ref) looks up a checkpoint."""

    def __init__(self, runtime: VmRuntime, vms: VmRegistry, admission: Admission, families: Families,
                 find: Callable[[str], Checkpoint], served_ram: ServedRam | None = None, host_name: str = ""):
        """served_ram(ckpt, clone names): the file served clones map (memtap's), for --memory served.
        host_name: what a clone's whoami says it runs on."""
        self.served_ram = served_ram
        self.host_name = host_name
        # Checkpoints of other hosts whose frozen disk is read over NBD (cluster/spanning.py).
        self.remote_disks: dict[str, NbdBacking] = {}
        # Set in a cluster: forks whose clones the master places on several hosts.
        self.span = None
        self.runtime = runtime
        self.vms = vms
        self.admission = admission
        self.families = families
        self.find = find
        self._template_lock = asyncio.Lock()

    # -- host side: `sfmpi clone CKPT -n N` ------------------------------
    async def clone(self, ref: str, n: int, allow_fewer: bool = False, memory: str = "local",
                    policy: str | None = None,
                    served: ServedOptions = ServedOptions()) -> dict:
        if not isinstance(n, int) or n <= 0:
            raise UsageError(f"clone: -n must be at least 1 (got {n})")
        if memory not in ("local", "served") or (memory == "served" and self.served_ram is None):
            raise UsageError(f"clone: --memory is local or served (got {memory!r})")
        t0 = time.monotonic()
        ckpt = self.find(ref)
        if ckpt.driver != self.runtime.driver.name:
            raise UsageError(f"clone: checkpoint {ckpt.id} was taken under the {ckpt.driver} driver, and its "
                             f"state loads only into a VM of that driver; this hostd runs the "
                             f"{self.runtime.driver.name} driver (docs/libvirt.md)")
        spec = ckpt.spec
        if self.span is not None:
            placement = await self.span.place(ckpt.family or ckpt.vm, n, spec.mem_mb, spec.cpus, allow_fewer,
                                              policy)
            if set(placement) != {self.span.host}:
                res = await self._clone_across(ckpt, placement, memory, t0, served=served)
                return {"checkpoint": ckpt.id, "requested": n, "granted": sum(placement.values()),
                        "memory": memory, "placement": placement, **res}
            n, allow_fewer = placement[self.span.host], False
        async with self.admission.lock:
            granted = self.admission.admit(n, spec.mem_mb, spec.cpus, allow_fewer,
                                           what=f"clone of checkpoint {ckpt.id}")
            fam = await self.families.ensure(ckpt.family or ckpt.vm)
            ids = self._free_ids(fam, granted)
            orders = [Order(name=netplan.hostname(fam.name, k), netid=k, index=k) for k in ids]
            recs = await self._reserve(ckpt, fam, orders, ticket="", memory=memory, served=served)
        res = await self.start(ckpt, fam, orders, recs, identify_greeting, "identified", t0)
        return {"checkpoint": ckpt.id, "requested": n, "granted": granted, "memory": memory, **res}

    async def _clone_across(self, ckpt: Checkpoint, placement: dict[str, int], memory: str, t0: float,
                            ticket: str = "", greeting: dict | None = None,
                            on_reserved: Callable[[list[str]], None] | None = None,
                            index_from_one: bool = False, served: ServedOptions = ServedOptions()) -> dict:
        """A host-side fork whose clones the master spread over hosts: this
        host's share as usual, each other host's started there from the
        checkpoint's descriptor (cluster/spanning.py); all or nothing."""
        assert self.span is not None
        spec, here = ckpt.spec, self.span.host
        local_n = placement.get(here, 0)
        greeting = greeting or {"kind": "identify"}
        greet, awaited = greeting_from(greeting)
        async with self.admission.lock:
            if local_n and not ticket:   # a ticket reserved its room already
                self.admission.admit(local_n, spec.mem_mb, spec.cpus, False, what=f"clone of checkpoint {ckpt.id}")
            fam = await self.families.ensure(ckpt.family or ckpt.vm)
            ids = self._free_ids(fam, sum(placement.values()))
            orders = [Order(name=netplan.hostname(fam.name, k), netid=k, index=i + 1 if index_from_one else k)
                      for i, k in enumerate(ids)]
            by_host: dict[str, list[Order]] = {}
            for host, count in placement.items():
                by_host[host], orders = orders[:count], orders[count:]
            recs = await self._reserve(ckpt, fam, by_host[here], ticket=ticket, memory=memory,
                                       served=served) if local_n else []
            for host, mine in by_host.items():
                if host != here:
                    fam.remote.update({o.name: (o.netid, host) for o in mine})
        remote = {h: o for h, o in by_host.items() if h != here}
        if on_reserved is not None:
            # Every clone's slot, on whichever host, before any of them runs.
            on_reserved([o.name for mine in by_host.values() for o in mine])
        try:
            await self.span.join_family(fam, set(remote))
            jobs = [self.span.start_remote(ckpt, fam, host, mine, greeting, ticket, served)
                    for host, mine in remote.items()]
            if local_n:
                jobs.append(self.start(ckpt, fam, by_host[here], recs, greet, awaited, t0))
            results = await asyncio.gather(*jobs, return_exceptions=True)
        except BaseException as exc:
            results = [exc]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            # start() undid this host's share itself; the other hosts' go too.
            await self.span.stop_remote(remote)
            for mine in remote.values():
                for o in mine:
                    fam.remote.pop(o.name, None)
            for rec in recs:
                await self.runtime.abandon(rec.name, failed[0])
            self.families.drop_if_empty(fam)
            raise failed[0]
        out: dict = {"clones": [], "ids": [], "per_clone": [], "hosts": {}}
        for host, r in zip([*remote, *([here] if local_n else [])], results):
            out["clones"] += r["clones"]
            out["ids"] += r["ids"]
            out["per_clone"] += r["per_clone"]
            out["hosts"].update({name: host for name in r["clones"]})
            for k in ("total_ms", "resumed_ms"):
                out[k] = max(out.get(k, 0.0), r[k])
        out["total_ms"] = (time.monotonic() - t0) * 1000.0
        return out

    # -- in-guest: the clone call of a ticket ----------------------------
    async def clone_for_ticket(self, ckpt: Checkpoint, count: int, ticket: str,
                               greeting: dict, on_reserved: Callable[[list[str]], None],
                               memory: str = "local", placement: dict[str, int] | None = None,
                               served: ServedOptions = ServedOptions()) -> dict:
        """The ticket reserved the room already; only IDs and names are new here.
        greeting: its spec (greeting_from). placement: where the master put the
        ticket's clones when it was granted (a cluster), as for a host-side clone."""
        t0 = time.monotonic()
        if self.span is not None and placement:
            if set(placement) != {self.span.host}:
                return await self._clone_across(ckpt, placement, memory, t0, ticket=ticket, greeting=greeting,
                                                on_reserved=on_reserved, index_from_one=True, served=served)
        greet, awaited = greeting_from(greeting)
        async with self.admission.lock:
            fam = await self.families.ensure(ckpt.family or ckpt.vm)
            ids = self._free_ids(fam, count)
            orders = [Order(name=netplan.hostname(fam.name, k), netid=k, index=i + 1)
                      for i, k in enumerate(ids)]
            recs = await self._reserve(ckpt, fam, orders, ticket=ticket, memory=memory, served=served)
        on_reserved([r.name for r in recs])
        return await self.start(ckpt, fam, orders, recs, greet, awaited, t0)

    def _free_ids(self, fam: Family, count: int) -> list[int]:
        try:
            return self.families.free_ids(fam, count, self.vms.name_taken)
        except BaseException:
            self.families.drop_if_empty(fam)
            raise

    async def _reserve(self, ckpt: Checkpoint, fam: Family, orders: list[Order], ticket: str,
                       memory: str = "local", ram: str | None = None, served: ServedOptions = ServedOptions()) -> list[VmRecord]:
        """ram: the file the clones map when it is given (another host's checkpoint, through memtap)."""
        recs = []
        given = ram is not None
        ram = ram if ram is not None else str(ckpt.ram_file)
        try:
            if memory == "served" and not given:
                assert self.served_ram is not None
                ram = await self.served_ram(ckpt, [o.name for o in orders], served)
            for o in orders:
                rec = VmRecord(name=o.name, role=VmRole.CLONE, state=VmState.STARTING,
                               spec=ckpt.spec.to_json(), overlay=self.runtime.new_layer(o.name),
                               checkpoint=ckpt.id, family=fam.name, family_no=fam.number,
                               netid=o.netid, ticket=ticket, resources=inherited_resources(ckpt),
                               backing=(ckpt.disk, *ckpt.disk_chain) if ckpt.disk else (),
                               **{**self.runtime.files(o.name), "ram_path": ram})
                self.runtime.reserve(rec)
                recs.append(rec)
            await self.families.add(fam, [(o.name, o.netid) for o in orders])
        except BaseException:
            for rec in recs:
                self.runtime.release(rec, reason="clone request failed")
                self.vms.delete(rec.name)
            # A family made for this request alone must not stay up without members.
            self.families.drop_if_empty(fam)
            raise
        crashpoints.reached("clone:reserved")
        return recs

    async def start(self, ckpt: Checkpoint, fam: Family, orders: list[Order], recs: list[VmRecord],
                    greeting: Greeting, awaited: str, t0: float) -> dict:
        resume = asyncio.Barrier(len(recs))
        results = await asyncio.gather(
            *(self._start_clone(rec, o, ckpt, fam, resume, greeting, awaited) for rec, o in zip(recs, orders)),
            return_exceptions=True)
        # A clone that only saw the resume barrier broken is not the cause.
        failures = sorted(((rec.name, r) for rec, r in zip(recs, results) if isinstance(r, BaseException)),
                          key=lambda f: isinstance(f[1], asyncio.BrokenBarrierError))
        if failures:
            # Never half-done: one failed clone undoes the whole request.
            for rec in recs:
                await self.runtime.abandon(rec.name, failures[0][1])
            name, exc = failures[0]
            if isinstance(exc, SfmpiError):
                raise exc
            raise QemuError(f"clone {name}: {exc}") from exc
        total_ms = (time.monotonic() - t0) * 1000.0
        # All clones resumed (running guest code) vs all re-identified and
        # answering: under TCG the gap is mostly code translation.
        resumed_ms = (max(r.pop("resumed_at") for r in results) - t0) * 1000.0
        # Where the time to "all resumed" went: reserving names, addresses and
        # nft rules before the first QEMU starts, and the barrier's release.
        first_start_ms = (min(r.pop("started_at") for r in results) - t0) * 1000.0
        released_ms = (max(r.pop("released_at") for r in results) - t0) * 1000.0
        for rec in recs:
            if self.vms.find(rec.name) is not None:  # not one that already called exit
                self.vms.update(rec.name, state=VmState.RUNNING)
        log.info("%d clones of %s in %.0f ms, resumed at %.0f ms; per clone (QEMU start, state load, "
                 "resume to answer, of it re-identification in the guest): %s", len(recs), ckpt.id, total_ms,
                 resumed_ms, ", ".join(f"{r['qemu_start_ms']:.0f}/{r['state_load_ms']:.0f}/"
                                       f"{r['resume_to_agent_ms']:.0f}/{r['guest_ms'].get('identity', 0):.0f}"
                                       for r in results))
        log.info("re-identification steps in the guest (ms): %s", "; ".join(
            " ".join(f"{k} {v:.0f}" for k, v in r["guest_ms"].items()) for r in results))
        return {"clones": [r.name for r in recs], "ids": [o.index for o in orders],
                "total_ms": total_ms, "resumed_ms": resumed_ms, "first_start_ms": first_start_ms,
                "released_ms": released_ms, "per_clone": list(results)}

    async def _start_clone(self, rec: VmRecord, order: Order, ckpt: Checkpoint, fam: Family,
                           resume: asyncio.Barrier, greeting: Greeting, awaited: str) -> dict:
        try:
            return await self._start_one_clone(rec, order, ckpt, fam, resume, greeting, awaited)
        except BaseException:
            await resume.abort()  # the others must not wait for this one
            raise

    async def _start_one_clone(self, rec: VmRecord, order: Order, ckpt: Checkpoint, fam: Family,
                               resume: asyncio.Barrier, greeting: Greeting, awaited: str) -> dict:
        t0 = time.monotonic()
        # A fresh qcow2 overlay is the same bytes for every clone of a checkpoint:
        # copying the checkpoint's template costs far less than running qemu-img.
        shutil.copyfile(await self._overlay_template(ckpt), rec.overlay)
        remote_disk = self.remote_disks.get(ckpt.id)
        tap = netplan.tap_name(fam.number, order.netid)
        # A clone whose disk is on another host runs in hostd's own namespace,
        # where the hosts' network is; its tap, opened in the families', is passed in.
        tap_fd = await self.families.in_namespace(open_tap, tap) if remote_disk is not None else None
        nic = Nic(mac=netplan.mac(fam.number, order.netid), tap=None if tap_fd is not None else tap, tap_fd=tap_fd)
        # The checkpoint's RAM file, or memtap's file of it (served memory): mapped privately either way.
        launch = Launch(ckpt.spec, name=rec.name, ram_path=rec.ram_path, share_ram=False,
                        disk=Qcow2Disk(rec.overlay, ephemeral=True, backing=self.remote_disks.get(ckpt.id)),
                        sockets=Sockets(rec.qmp_path, rec.agent_path),
                        serial_log=rec.serial_log, nic=nic, vmgenid=str(uuid.uuid4()), incoming="defer",
                        env=clone_env(rec.ram_path, served=rec.ram_path != str(ckpt.ram_file),
                                      reports_free_pages=ckpt.spec.free_page_reporting),
                        in_families_netns=tap_fd is None)
        # QEMU reads the device state from a descriptor it is given: no shell and
        # no `cat` process per clone (QEMU 7.2 has no file: migration URI).
        state_fd = os.open(ckpt.state_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            vm = await self.runtime.launch(rec, launch, state_fd=state_fd)
        finally:
            os.close(state_fd)
            if tap_fd is not None:
                os.close(tap_fd)
        crashpoints.reached("clone:launched")
        t_started = time.monotonic()
        qemu = vm.qemu
        await set_capabilities(qemu, events=True, x_ignore_shared=True)
        listener = qemu.listen("MIGRATION")
        with qemu.listening(listener):
            await qemu.execute("migrate-incoming", {"uri": self.runtime.state_uri(state_fd)})
            await qemu.wait_migration(listener, {"completed"}, 60.0)
        t_loaded = time.monotonic()
        # All clones of one request resume together, from the same instant: a
        # clone that ran early would take the CPU from the others still loading.
        await resume.wait()
        t_released = time.monotonic()
        await qemu.execute("cont")
        t_resumed = time.monotonic()
        crashpoints.reached("clone:resumed")
        ident = {**netplan.identity(fam.number, fam.name, order.netid), "id": order.index,
                 "netid": order.netid, "ticket": rec.ticket or None, "host": self.host_name}
        assert vm.agent is not None
        await vm.agent.send_op(greeting(ident, self.extras(fam, ckpt)))
        try:
            report = await vm.agent.wait_event(awaited, CLONE_READY_TIMEOUT)
        except AgentError:
            if await self.runtime.died_soon(vm):
                raise QemuError(f"clone {rec.name} died after resuming{self.runtime.explain(rec)}"
                               f"{vm.qemu.failure_report()}") from None
            raise
        if not report.get("ok"):
            raise CloneError(f"clone {order.index} ({rec.name}): {report.get('error')}")
        t_ready = time.monotonic()
        return {"name": rec.name, "qemu_start_ms": (t_started - t0) * 1000.0,
                "state_load_ms": (t_loaded - t_started) * 1000.0,
                "started_at": t0, "released_at": t_released, "cont_ms": (t_resumed - t_released) * 1000.0,
                "resume_to_agent_ms": (t_ready - t_resumed) * 1000.0,
                "guest_ms": report.get("guest_ms") or {},
                "resumed_at": t_resumed, "total_ms": (t_ready - t0) * 1000.0}

    @staticmethod
    def extras(fam: Family, ckpt: Checkpoint) -> dict:
        """What makes each copy unique, sent just before it re-identifies."""
        return {"time": time.time(), "entropy": base64.b64encode(secrets.token_bytes(64)).decode(),
                "machine_id": uuid.uuid4().hex, "boot_id": str(uuid.uuid4()), "hosts": fam.hosts(),
                "checkpoint": {"id": ckpt.id, "family": fam.name}}

    async def _overlay_template(self, ckpt: Checkpoint) -> Path:
        template = ckpt.overlay_template
        async with self._template_lock:
            if not template.exists():  # a checkpoint from before templates existed
                await make_overlay_template(template, ckpt.disk)
        return template
