"""Applies a VM's resource settings to its QEMU, and keeps them with the VM.

- CPU shares and limit, memory limit: the VM's own cgroups (cgroups.py).
- Disk IOPS and bytes/s: QMP block_set_io_throttle on the VM's disk device.
- Network rate: tc and nftables on the VM's tap, in hostd's namespace (traffic.py).

Settings live in the VM's record (the store), so they survive a hostd restart:
a re-attached VM is launched again as far as the registry is concerned, and
apply() is idempotent. A checkpoint copies its VM's settings into its manifest,
and a clone starts with them unless its request carries its own.
Lifecycle of a VM's applied state: none -> applied (launched or set) -> removed (gone).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from sfmpi import proc
from sfmpi.errors import CommandError, HostdError, QemuError, UsageError

from ..net import netplan
from ..state.records import VmRecord, VmRole
from ..vm.cmdline import DISK_DEVICE
from ..vm.registry import Vm, VmRegistry
from . import settings as S
from . import traffic
from .cgroups import VmCgroups, cpu_files, memory_files

log = logging.getLogger("sfmpi.hostd.resources")

InNamespace = Callable[..., Awaitable]


def throttle_args(settings: dict, disk_device: str = DISK_DEVICE) -> dict:
    """QMP block_set_io_throttle's arguments (0: no limit)."""
    # The virtio-blk-pci proxy has no block backend of its own: its virtio child has.
    return {"id": f"/machine/peripheral/{disk_device}/virtio-backend", "bps": int(settings.get("disk_bps", 0)), "bps_rd": 0, "bps_wr": 0,
            "iops": int(settings.get("disk_iops", 0)), "iops_rd": 0, "iops_wr": 0}


def _cpu_wanted(settings: dict) -> bool:
    return any(k in settings for k in ("cpu_shares", "cpu_limit", "priority"))


class Resources:
    def __init__(self, vms: VmRegistry, cgroups: VmCgroups, in_namespace: InNamespace):
        self.vms, self.cgroups, self.in_namespace = vms, cgroups, in_namespace
        self._tasks: set[asyncio.Task] = set()
        self._rated: set[str] = set()     # taps with a rate table
        # CPU limits a feedback controller (hostd/control/) puts on top of the
        # user's: the lower one holds; never persisted (the controller re-applies them).
        self.overrides: dict[str, float] = {}

    # -- the operation -----------------------------------------------------
    def check_host(self, settings: dict) -> None:
        """A clear error naming the controller this host lacks for a setting."""
        if _cpu_wanted(settings):
            self.cgroups.layout.require("cpu", "--cpu-shares/--cpu-limit/--priority")
        if "mem_limit" in settings:
            self.cgroups.layout.require("memory", "--mem-limit")

    async def set(self, name: str, given: dict) -> dict:
        rec = self.vms.record(name)
        if rec is None:
            self.vms.get(name)  # NotFound (or why it crashed)
        if rec.role == VmRole.RECEIVER:
            raise UsageError(f"VM {name} is a transient receiver; it takes no settings")
        cpus = int(rec.spec.get("cpus", 1))
        changes = S.parse_changes(given, cpus)
        self.check_host({k: v for k, v in changes.items() if v is not None})
        new = S.merged(rec.resources, changes)
        vm = self.vms.find(name)
        if vm is not None:
            await self.apply(vm, new, previous=rec.resources)
        self.vms.update(name, resources=new)
        return {"name": name, "resources": new, "applied": vm is not None}

    # -- applying ------------------------------------------------------------
    async def apply(self, vm: Vm, settings: dict, previous: dict | None = None) -> None:
        previous = previous or {}
        pid = vm.rec.pid
        if pid is None:
            raise HostdError(f"VM {vm.name} has no QEMU process yet")
        layout = self.cgroups.layout
        if _cpu_wanted(settings) or _cpu_wanted(previous) or vm.name in self.overrides:
            self._place_cpu(vm, settings)
        if "mem_limit" in settings or "mem_limit" in previous:
            h = layout.require("memory", "--mem-limit")
            self.cgroups.place(h, vm.name, pid, memory_files(h.version, settings.get("mem_limit")))
        if any(k in d for d in (settings, previous) for k in ("disk_iops", "disk_bps")):
            try:
                await vm.qemu.execute("block_set_io_throttle", throttle_args(settings, vm.qemu.disk_device), timeout=10)
            except QemuError as exc:
                raise HostdError(f"VM {vm.name}: cannot throttle its disk: {exc}") from None
        if "net_rate" in settings or "net_rate" in previous:
            if not vm.rec.family_no:
                raise UsageError(f"--net-rate: VM {vm.name} has no network")
            await self._rate(netplan.tap_name(vm.rec.family_no, vm.rec.netid), settings.get("net_rate"))
        if settings:
            log.info("VM %s: resources %s", vm.name, settings)

    def _place_cpu(self, vm: Vm, settings: dict) -> None:
        h = self.cgroups.layout.require("cpu", "--cpu-shares/--cpu-limit/--priority")
        limits = [v for v in (settings.get("cpu_limit"), self.overrides.get(vm.name)) if v is not None]
        self.cgroups.place(h, vm.name, vm.rec.pid, cpu_files(h.version,
                                                             S.effective_shares(settings, int(vm.rec.spec.get("cpus", 1))),
                                                             min(limits) if limits else None))

    def limit_cpu(self, name: str, limit: float | None) -> bool:
        """A controller's CPU limit for a VM (None: lifted). False if the VM does not run here."""
        if limit is None:
            had = self.overrides.pop(name, None) is not None
        else:
            had, self.overrides[name] = True, float(limit)
        vm = self.vms.find(name)
        if vm is None or vm.rec.pid is None:
            return False
        if had:
            self._place_cpu(vm, vm.rec.resources)
        return True

    async def _rate(self, tap: str, rate: int | None) -> None:
        def run() -> None:
            if rate is None:
                proc.run(traffic.tbf_clear_argv(tap), check=False)
            else:
                proc.run(traffic.tbf_argv(tap, rate))
            proc.run(["nft", "-f", "-"], input=traffic.ingress_script(tap, rate).encode())
        try:
            await self.in_namespace(run)
        except CommandError as exc:
            raise HostdError(f"network rate on {tap}: {exc}") from None
        (self._rated.add if rate is not None else self._rated.discard)(tap)

    # -- registry events -----------------------------------------------------
    def vm_launched(self, vm: Vm) -> None:
        """A VM came up (started, cloned, or re-attached by a new hostd): its settings go on."""
        if not vm.rec.resources and vm.name not in self.overrides:
            return
        task = asyncio.ensure_future(self._apply_logged(vm))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _apply_logged(self, vm: Vm) -> None:
        try:
            await self.apply(vm, vm.rec.resources)
        except Exception as exc:  # the VM runs; the operator sees why its settings did not hold
            log.warning("VM %s: its resource settings could not be applied: %s", vm.name, exc)

    async def settled(self) -> None:
        """Wait for the settings of VMs that just came up (a clone request returns after them)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def vm_gone(self, rec: VmRecord, _reason: str) -> None:
        for left in self.cgroups.remove(rec.name):
            log.warning("VM %s: cgroup left: %s", rec.name, left)
        if rec.family_no:
            tap = netplan.tap_name(rec.family_no, rec.netid)
            if tap in self._rated or rec.resources.get("net_rate"):
                task = asyncio.ensure_future(self._drop_rate(tap))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _drop_rate(self, tap: str) -> None:
        try:
            script = traffic.ingress_script(tap, None).encode()
            await self.in_namespace(lambda: proc.run(["nft", "-f", "-"], input=script))
        except Exception as exc:
            log.warning("rate table of %s left: %s", tap, exc)
        self._rated.discard(tap)

    async def down(self) -> None:
        await self.settled()
        for left in self.cgroups.remove_all():
            log.warning("cgroup left: %s", left)
