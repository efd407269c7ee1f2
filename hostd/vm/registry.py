"""The VM registry: every VM hostd knows, live or crashed, and the one place a record changes.

A VM's record lives in the store (hostd/state/store.py), which survives a
restart; a live VM also has its QEMU and agent channel here. Every change goes
through update(), which writes the new record through to the store and keeps
the live copy in step: there is no second copy to forget.

Events: "launched" (a VM's agent channel is up: the clone API attaches to it)
and "gone" (a VM ended, stopped or crashed: families take it off the network,
tickets finish its clone slot). Parts subscribe; nothing calls back into an owner.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable

from sfmpi.errors import AlreadyExists, NotFound, QemuError

from ..guestapi.channel import AgentChannel
from ..state.records import VmRecord, VmState
from ..state.store import Store
from .qemu import QemuProcess

log = logging.getLogger("sfmpi.hostd.vms")

GoneHandler = Callable[[VmRecord, str], None]
LaunchedHandler = Callable[["Vm"], None]


@dataclass
class Vm:
    """A live VM: its record (read-only here; change it with VmRegistry.update), QEMU, agent."""
    rec: VmRecord
    qemu: QemuProcess
    agent: AgentChannel | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def name(self) -> str:
        return self.rec.name


class VmRegistry:
    def __init__(self, store: Store):
        self.store = store
        self.live: dict[str, Vm] = {}
        self._gone: list[GoneHandler] = []
        self._launched: list[LaunchedHandler] = []

    # -- events ----------------------------------------------------------
    def on_gone(self, handler: GoneHandler) -> None:
        self._gone.append(handler)

    def on_launched(self, handler: LaunchedHandler) -> None:
        self._launched.append(handler)

    def announce_gone(self, rec: VmRecord, reason: str) -> None:
        for handler in self._gone:
            try:
                handler(rec, reason)
            except Exception:  # one part's bug must not keep the others from cleaning up
                log.exception("VM %s: a 'gone' handler failed", rec.name)

    def announce_launched(self, vm: Vm) -> None:
        for handler in self._launched:
            handler(vm)

    # -- lookups ---------------------------------------------------------
    def find(self, name: str) -> Vm | None:
        return self.live.get(name)

    def get(self, name: str) -> Vm:
        """The live VM `name`; NotFound, or QemuError naming why it crashed."""
        vm = self.live.get(name)
        if vm is not None:
            return vm
        rec = self.store.get_vm(name)
        if rec is not None and rec.state == VmState.CRASHED:
            raise QemuError(f"VM {name} crashed: {rec.error}")
        raise NotFound(f"no VM named {name} (see `sfmpi vm list`)")

    def record(self, name: str) -> VmRecord | None:
        vm = self.live.get(name)
        return vm.rec if vm is not None else self.store.get_vm(name)

    def records(self) -> list[VmRecord]:
        return self.store.vms()

    def name_taken(self, name: str) -> bool:
        return name in self.live or self.store.get_vm(name) is not None

    # -- changes ---------------------------------------------------------
    def reserve(self, rec: VmRecord) -> None:
        if self.name_taken(rec.name):
            raise AlreadyExists(f"VM {rec.name} already exists (stop it first, or pick another name)")
        self.store.put_vm(rec)

    def add(self, vm: Vm) -> None:
        self.live[vm.name] = vm
        self.store.put_vm(vm.rec)

    def update(self, vm_or_name: Vm | str, **changes) -> VmRecord:
        """Change a VM's record (live or not) and write it through."""
        vm = self.live.get(vm_or_name) if isinstance(vm_or_name, str) else vm_or_name
        if vm is not None:
            vm.rec = vm.rec.with_(**changes)
            # A VM deleted meanwhile (a clone that exited) is not brought back.
            if self.store.get_vm(vm.name) is not None:
                self.store.put_vm(vm.rec)
            return vm.rec
        rec = self.store.get_vm(vm_or_name)
        if rec is None:
            raise NotFound(f"no VM named {vm_or_name}")
        rec = rec.with_(**changes)
        self.store.put_vm(rec)
        return rec

    def detach(self, name: str) -> Vm | None:
        """No longer live (its record stays until delete)."""
        return self.live.pop(name, None)

    def delete(self, name: str) -> None:
        self.live.pop(name, None)
        self.store.delete_vm(name)
