"""Booting a parent VM from an image: its family, its tap, its RAM file, its identity.

A parent starts family `name`, with NAT and open ports as given (its clones
inherit them). Its RAM goes on huge pages when the host has them (ram_backing
auto), which keeps checkpoint pauses short at any size (docs/architecture.md).
"""
from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from pathlib import Path

from sfmpi import proc
from sfmpi.errors import AgentError, NetworkError, UsageError
from sfmpi.image import Image

from ..net import netplan
from ..net.families import Families, NetOptions
from ..policy.admission import Admission, check_ram_dir
from ..state.records import VmRecord, VmRole, VmState
from ..state.store import Store
from . import accel as accel_mod
from . import hugepages
from .cmdline import Launch, MachineSpec, Nic, Qcow2Disk, Sockets, overlay_argv
from .registry import Vm, VmRegistry
from .runtime import VmRuntime

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
BOOT_TIMEOUT = float(os.environ.get("SFMPI_BOOT_TIMEOUT", "300"))
IDENTIFY_TIMEOUT = 60.0


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UsageError(f"bad VM name {name!r}: use 1-40 of a-z, 0-9 and '-', starting with a letter or digit")
    return name


class Parents:
    def __init__(self, runtime: VmRuntime, vms: VmRegistry, admission: Admission, families: Families,
                 store: Store, host_name: str = ""):
        self.host_name = host_name  # what the guest's whoami says it runs on
        self.runtime = runtime
        self.vms = vms
        self.admission = admission
        self.families = families
        self.store = store          # the families' remembered options
        self.paths = runtime.paths

    async def start(self, name: str, image: str, mem_mb: int = 512, cpus: int = 1,
                    accel: str | None = None, timeout: float = BOOT_TIMEOUT,
                    nat: bool = False, open_ports: list[str] | tuple = (), ram_backing: str = "auto",
                    free_page_reporting: bool = True) -> dict:
        check_name(name)
        if cpus < 1 or mem_mb < 64:
            raise UsageError(f"VM {name}: need at least 1 vCPU and 64 MiB (got {cpus}, {mem_mb} MiB)")
        ram_dir, backing = hugepages.ram_dir(ram_backing, mem_mb, self.paths.shm, hugepages.pool())
        options = NetOptions.parse(nat, open_ports)
        img = Image.load(image)
        chosen = await asyncio.to_thread(accel_mod.choose, str(img.kernel), str(img.initrd),
                                         self.paths.accel_cache, accel)
        # Never on huge pages: a reported page would go back to the host's
        # pool (QEMU punches it out of the hugetlbfs file), and a later guest
        # touch that finds the pool empty is a SIGBUS that kills the VM. The
        # preallocated reservation is the point of huge pages.
        spec = MachineSpec(mem_mb=mem_mb, cpus=cpus, accel=chosen, kernel=str(img.kernel),
                           initrd=str(img.initrd), append=img.append, disk_size=img.virtual_size,
                           free_page_reporting=free_page_reporting and backing == "tmpfs")
        async with self.admission.lock:
            self.admission.admit(1, mem_mb, cpus, what=f"start of VM {name}")
            if backing == "tmpfs":   # hugetlbfs room was checked by ram_dir()
                check_ram_dir(ram_dir, mem_mb, what=f"start of VM {name}", pending_mb=self._ram_to_come(ram_dir))
            rec = VmRecord(name=name, role=VmRole.PARENT, state=VmState.STARTING, spec=spec.to_json(),
                           overlay=self.runtime.new_layer(name), image=str(img.disk), family=name, netid=0,
                           backing=(str(img.disk),),
                           **{**self.runtime.files(name), "ram_path": self._ram_path(name, ram_dir, backing)})
            self.runtime.reserve(rec)
        t0 = time.monotonic()
        try:
            fam = await self.families.ensure(name, options=options)
            # Remembered so that a restarted hostd, or a clone of a checkpoint
            # after the family is gone, re-makes the family with the same rules.
            self.store.put_family_options(name, options.to_json())
            tap = (await self.families.add(fam, [(name, 0)]))[name]
            rec = self.vms.update(name, family_no=fam.number)
            await proc.run_async(overlay_argv(rec.overlay, str(img.disk)))
            launch = Launch(spec, name=name, ram_path=rec.ram_path, share_ram=True,
                            disk=Qcow2Disk(rec.overlay), sockets=Sockets(rec.qmp_path, rec.agent_path),
                            serial_log=rec.serial_log, nic=Nic(mac=netplan.mac(fam.number, 0), tap=tap),
                            vmgenid=str(uuid.uuid4()), prealloc=True)
            vm = await self.runtime.launch(rec, launch)
            info = await vm.agent.wait_ready(timeout)
            t_agent = time.monotonic()
            system = await self._wait_booted(vm, max(1.0, timeout - (t_agent - t0)))
            await self._identify(vm)
        except BaseException as exc:
            await self.runtime.abandon(name, exc)
            raise
        rec = self.vms.update(vm, state=VmState.RUNNING)
        return {"rec": rec, "ram_backing": backing, "free_page_reporting": spec.free_page_reporting,
                "boot_ms": (time.monotonic() - t0) * 1000.0,
                "agent_ms": (t_agent - t0) * 1000.0, "system": system, "guest_uptime_s": info.get("uptime")}

    def _ram_to_come(self, ram_dir: Path) -> int:
        """MiB of parents admitted whose QEMU has not made its RAM file in ram_dir yet."""
        return sum(r.spec["mem_mb"] for r in self.vms.records()
                   if r.role == VmRole.PARENT and r.state == VmState.STARTING and r.ram_path
                   and Path(r.ram_path).parent == ram_dir and not os.path.exists(r.ram_path))

    def _ram_path(self, name: str, ram_dir: Path, backing: str) -> str:
        if backing == "tmpfs":
            return str(ram_dir / f"{name}.ram")
        return str(ram_dir / hugepages.ram_file_name(self.paths.shm.name, name))

    async def _identify(self, vm: Vm) -> None:
        """Give a booted parent its family identity (address, hostname)."""
        fam = self.families.of_vm(vm.name)
        assert fam is not None and vm.agent is not None
        ident = {**netplan.identity(fam.number, fam.name, 0), "ticket": None, "host": self.host_name}
        await vm.agent.send_op({"op": "identify", "identity": ident, "hosts": fam.hosts()})
        report = await vm.agent.wait_event("identified", IDENTIFY_TIMEOUT)
        if not report.get("ok"):
            raise NetworkError(f"VM {vm.name}: the guest could not configure its identity: "
                               f"{report.get('error')}")

    async def _wait_booted(self, vm: Vm, timeout: float) -> str:
        """Return once the guest finished booting (systemd running or degraded, udev settled).

        The agent answers early in boot; a VM handed to the user (and any
        checkpoint of it) should not still be starting services, or every clone
        would spend its first seconds finishing the parent's boot.
        """
        out = bytearray()

        async def sink(_fd: int, data: bytes) -> None:
            out.extend(data)
        try:
            # udev goes on loading CPU-feature modules after systemd reports the
            # boot done; their crypto self-tests take seconds under TCG (measured:
            # settle took 5 s more), and clones of a checkpoint taken then inherit that work.
            await asyncio.wait_for(vm.agent.exec(
                ["sh", "-c", "systemctl is-system-running --wait; udevadm settle"], sink), timeout)
        except asyncio.TimeoutError:
            raise AgentError(f"VM {vm.name}: guest did not finish booting in {timeout:.0f} s") from None
        state = out.decode(errors="replace").strip().splitlines()[-1:] or ["unknown"]
        return state[0]
