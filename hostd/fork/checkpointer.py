"""Taking a checkpoint of a running VM: capture, freeze the disk, write the descriptor.

The checkpoint is built in `.ID.partial` and renamed into place only when
complete, so a crash leaves a partial directory (reaped at start) and never a
checkpoint that looks whole. Whatever fails, the parent runs on: on the old
disk layer if the freeze did not happen, else on the new one.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from pathlib import Path

from sfmpi import proc
from sfmpi.errors import NotFound, UsageError
from sfmpi.paths import Paths

from ..state.records import VmRole
from ..state.store import Store
from ..vm.cmdline import MachineSpec
from ..vm.registry import Vm, VmRegistry
from ..vm.runtime import VmRuntime
from .. import crashpoints
from .capture import MODES, capture_background, capture_paused, capture_precopy, sparse_copy
from .disks import DiskFreeze, backing_chain, make_overlay_template, top_disk
from .manifest import OVERLAY_TEMPLATE, Checkpoint, sha256_file
from .receiver import Receivers


def qemu_version() -> str:
    out = proc.output(["qemu-system-x86_64", "--version"], timeout=30)
    return out.splitlines()[0].strip()


class Checkpointer:
    def __init__(self, paths: Paths, store: Store, vms: VmRegistry, runtime: VmRuntime, receivers: Receivers):
        self.paths = paths
        self.store = store
        self.vms = vms
        self.runtime = runtime
        self.receivers = receivers
        self._qemu_version: str | None = None

    def default_mode(self, vm: Vm) -> str:
        # A clone's RAM is a private (copy-on-write) mapping of its checkpoint:
        # QEMU's background snapshot can only write-protect shared memory.
        return "paused" if vm.rec.role == VmRole.CLONE else "background"

    async def take(self, name: str, mode: str | None = None) -> dict:
        """`sfmpi checkpoint NAME`: refused while the VM is busy with another."""
        if mode is not None and mode not in MODES:
            raise UsageError(f"checkpoint mode must be one of {', '.join(MODES)} (got {mode!r})")
        vm = self.vms.get(name)
        if vm.rec.role == VmRole.RECEIVER:
            raise UsageError(f"VM {name} is a checkpoint receiver")
        if vm.rec.role == VmRole.CLONE and mode == "background":
            raise UsageError(f"VM {name} is a clone: its RAM is a private copy-on-write mapping, which the "
                             "background snapshot cannot track; use --mode paused (the default for clones)")
        if vm.lock.locked():
            raise UsageError(f"VM {name} is busy with another checkpoint or stop")
        async with vm.lock:
            return await self._take(vm, mode or self.default_mode(vm))

    async def take_for_guest(self, name: str, mode: str, guest_req: int | None = None,
                             ticket: str = "") -> Checkpoint:
        """A checkpoint for the clone API (guest_req: the guest's pending call;
        ticket: the ticket it is taken for, which frees it when it ends)."""
        vm = self.vms.get(name)
        async with vm.lock:
            res = await self._take(vm, mode, guest_req, ticket)
        return self.find(res["id"])

    def find_id(self, ckpt_id: str) -> Checkpoint:
        """A checkpoint of this host by id only (what a guest may name: never a path)."""
        path = self.store.checkpoint_path(ckpt_id) if isinstance(ckpt_id, str) else None
        if path is None:
            raise NotFound(f"no checkpoint {ckpt_id!r} on this host")
        return Checkpoint.load(path)

    def find(self, ref: str) -> Checkpoint:
        """A checkpoint by id (of this host), or by directory."""
        path = self.store.checkpoint_path(ref)
        if path is None:
            candidate = Path(ref)
            if not candidate.is_dir():
                raise NotFound(f"no checkpoint {ref} (give an id from `sfmpi checkpoint` or a checkpoint directory)")
            path = str(candidate.resolve())
        return Checkpoint.load(path)

    async def _take(self, vm: Vm, mode: str, guest_req: int | None = None, ticket: str = "") -> dict:
        name = vm.name
        ckpt_id = f"{name}-ck{self.store.next('ckpt:' + name)}"
        final = self.paths.checkpoints / ckpt_id
        work = self.paths.checkpoints / f".{ckpt_id}.partial"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(mode=0o700, parents=True)
        frozen = vm.rec.overlay
        new_layer = self.runtime.new_layer(name)
        node = "disk0-" + Path(new_layer).stem.rsplit("-", 1)[-1]
        spec = MachineSpec.from_json(vm.rec.spec)
        t0 = time.monotonic()
        receiver = None
        try:
            crashpoints.reached("checkpoint:start")
            if mode in ("background", "precopy"):
                receiver = await self.receivers.start(vm, work / "ram")
                crashpoints.reached("checkpoint:receiver")
                capture = capture_background if mode == "background" else capture_precopy
                timings = await capture(
                    vm.qemu, receiver.qemu, f"unix:{self.receivers.socket(receiver.name)}",
                    DiskFreeze(vm.qemu, new_layer, node), work / "state")
            else:
                timings = await capture_paused(
                    vm.qemu, vm.rec.ram_path, work / "ram", DiskFreeze(vm.qemu, new_layer, node),
                    work / "state", sparse_copy)
            crashpoints.reached("checkpoint:captured")
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            if await self._top_is(vm, new_layer):
                # The disk was frozen before the failure: the parent now writes to
                # new_layer, whose backing is the old layer. Keep both.
                self.vms.update(vm, overlay=new_layer, backing=(frozen, *vm.rec.backing))
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(new_layer)
            raise
        finally:
            if receiver is not None:
                await self.receivers.drop(receiver)
        # From here on the parent runs on new_layer; `frozen` belongs to the checkpoint.
        chain = await backing_chain(frozen)
        self.vms.update(vm, overlay=new_layer, backing=(frozen, *chain))
        try:
            ckpt = await self._describe(vm, mode, ckpt_id, final, work, frozen, chain, spec, timings, guest_req)
            crashpoints.reached("checkpoint:described")
            ckpt.write(work)
            os.rename(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        self.store.add_checkpoint(ckpt_id, name, str(final), family=ckpt.family, ticket=ticket,
                                  kept=not ticket)
        timings["total_ms"] = (time.monotonic() - t0) * 1000.0
        return {"id": ckpt_id, "path": str(final), "mode": mode, "pause_ms": ckpt.pause_ms,
                "ram_mb": ckpt.ram_size >> 20, "ram_allocated_mb": round(ckpt.ram_allocated / 2**20, 1),
                "state_kb": ckpt.state_size // 1024, "timings": timings}

    async def _describe(self, vm: Vm, mode: str, ckpt_id: str, final: Path, work: Path, frozen: str,
                        chain: list[str], spec: MachineSpec, timings: dict, guest_req: int | None) -> Checkpoint:
        ram = work / "ram"
        if mode != "paused":  # sparse_copy made the holes already
            # The receiver wrote every page, zero pages too: give those back.
            t_dig = time.monotonic()
            await proc.run_async(["fallocate", "--dig-holes", str(ram)])
            timings["dig_holes_ms"] = (time.monotonic() - t_dig) * 1000.0
        os.chmod(ram, 0o600)
        await make_overlay_template(work / OVERLAY_TEMPLATE, frozen)
        if self._qemu_version is None:
            self._qemu_version = await asyncio.to_thread(qemu_version)
        ram_stat = ram.stat()
        return Checkpoint(
            id=ckpt_id, vm=vm.name, path=str(final), machine=spec.to_json(), disk=frozen,
            disk_chain=tuple(chain), state_sha256=sha256_file(work / "state"),
            state_size=(work / "state").stat().st_size, ram_size=ram_stat.st_size,
            ram_allocated=ram_stat.st_blocks * 512, mode=mode, pause_ms=timings["pause_ms"],
            qemu_version=self._qemu_version, timings=timings, family=vm.rec.family or vm.name,
            guest_req=guest_req, resources=dict(vm.rec.resources), driver=self.runtime.driver.name,
        )

    @staticmethod
    async def _top_is(vm: Vm, layer: str) -> bool:
        with contextlib.suppress(Exception):
            return (await top_disk(vm.qemu))[1] == layer
        return False
