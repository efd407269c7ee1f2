"""The checkpoint receiver: a QEMU that never runs, whose RAM is the checkpoint's RAM file.

The background and pre-copy modes migrate the parent into it (on the same
host), then save its device state. It has the parent's machine, a null disk
of the right size and an unattached tap (virtio-net's negotiated offloads are
part of the state), so the state it saves loads into clones.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from ..net import netplan
from ..policy.admission import Admission
from ..state.records import VmRecord, VmRole, VmState
from ..vm.cmdline import Launch, MachineSpec, Nic, NullDisk, Sockets
from ..vm.registry import Vm
from ..vm.runtime import VmRuntime
from .capture import set_capabilities


class Receivers:
    def __init__(self, runtime: VmRuntime, admission: Admission):
        self.runtime = runtime
        self.admission = admission

    def socket(self, name: str) -> str:
        return str(self.runtime.paths.shm / f"{name}.mig")

    async def start(self, parent: Vm, ram_file: Path) -> Vm:
        name = f"{parent.name}-rx"
        spec = MachineSpec.from_json(parent.rec.spec)
        async with self.admission.lock:
            self.admission.admit(1, spec.mem_mb, spec.cpus, what=f"checkpoint receiver for VM {parent.name}")
            rec = VmRecord(name=name, role=VmRole.RECEIVER, state=VmState.STARTING, spec=spec.to_json(),
                           overlay="", **{**self.runtime.files(name), "ram_path": str(ram_file)})
            self.runtime.reserve(rec)
        try:
            # The receiver's NIC must negotiate what the parent's did (a tap's
            # offloads), but it never runs: a tap the driver makes, on no bridge.
            launch = Launch(spec, name=name, ram_path=str(ram_file), share_ram=True,
                            disk=NullDisk(spec.disk_size), sockets=Sockets(rec.qmp_path, rec.agent_path),
                            serial_log=rec.serial_log, nic=Nic(mac=netplan.mac(1, 0)),
                            vmgenid=str(uuid.uuid4()), incoming=f"unix:{self.socket(name)}", paused=True)
            vm = await self.runtime.launch(rec, launch, agent=False, state=VmState.PAUSED)
            await set_capabilities(vm.qemu, events=True)
        except BaseException as exc:
            await self.drop_named(name, exc)
            raise
        return vm

    async def drop(self, receiver: Vm) -> None:
        await self.drop_named(receiver.name)

    async def drop_named(self, name: str, exc: BaseException | None = None) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket(name))
        await self.runtime.abandon(name, exc)
