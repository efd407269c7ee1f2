"""HostManager: every VM on this host, from start to cleanup.

It owns the QemuProcess and AgentChannel of each VM, keeps the store in step,
and implements the operations hostd serves: start, stop, list, exec,
checkpoint, clone, down. A VM that dies on its own is marked crashed with
QEMU's stderr and the serial console tail, and its resources are released.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sfmpi import proc
from sfmpi.errors import (AgentError, AlreadyExists, CapacityError, NetworkError, NotFound, QemuError,
                          SfmpiError, UsageError)
from sfmpi.image import Image
from sfmpi.paths import Paths

from . import accel as accel_mod
from . import hugepages, netplan
from .admission import Budget, Usage, admit
from .agent_channel import AgentChannel, OutputSink
from .checkpoint import (MODES, OVERLAY_TEMPLATE, Checkpoint, DiskFreeze, capture_background,
                         capture_paused, capture_precopy, make_overlay_template, set_capabilities,
                         sha256_file, sparse_copy, top_disk)
from .clone_api import CloneApi
from .cloning import Cloner
from .families import Families, NetOptions
from .tap import open_unattached_tap
from .qemu import QemuProcess, pid_alive
from .qemu_cmdline import MachineSpec, Nic, NullDisk, Qcow2Disk, Sockets, overlay_argv, vm_argv
from .store import Store, VmRecord, VmRole, VmState
from .tickets import DEFAULT_FAMILY_LIMIT, TicketBook

log = logging.getLogger("sfmpi.hostd")

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
BOOT_TIMEOUT = float(os.environ.get("SFMPI_BOOT_TIMEOUT", "300"))
IDENTIFY_TIMEOUT = 60.0
FAMILY_LIMIT = int(os.environ.get("SFMPI_FAMILY_LIMIT", DEFAULT_FAMILY_LIMIT))


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise UsageError(f"bad VM name {name!r}: use 1-40 of a-z, 0-9 and '-', starting with a letter or digit")
    return name


def qemu_version() -> str:
    out = proc.output(["qemu-system-x86_64", "--version"])
    return out.splitlines()[0].strip()


@dataclass
class Vm:
    rec: VmRecord
    qemu: QemuProcess
    agent: AgentChannel | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class HostManager:
    def __init__(self, paths: Paths, store: Store, budget: Budget):
        self.paths = paths
        self.store = store
        self.budget = budget
        self.vms: dict[str, Vm] = {}
        self.admission = asyncio.Lock()
        self._watchers: set[asyncio.Task] = set()
        self.families = Families(paths.home / "net", remembered=self.remembered_options)
        self.tickets = TicketBook(FAMILY_LIMIT, store)
        self.clone_api = CloneApi(self, self.tickets)
        self.cloner = Cloner(self)

    # -- bookkeeping -----------------------------------------------------
    def usage(self) -> Usage:
        live = [r for r in self.store.vms() if r.state not in (VmState.STOPPED, VmState.CRASHED)]
        held_mb, held_cpus = self.tickets.reserved()  # granted tickets' clones to come
        return Usage(mem_mb=sum(r.spec["mem_mb"] for r in live) + held_mb,
                     vcpus=sum(r.spec["cpus"] for r in live) + held_cpus)

    def host_room(self, mem_mb: int, cpus: int) -> int:
        """How many more VMs of this size the budget holds."""
        try:
            return admit(self.budget, self.usage(), 1 << 16, mem_mb, cpus, allow_fewer=True)
        except CapacityError:
            return 0

    def files(self, name: str) -> dict:
        vm_dir = self.paths.vm_dir(name)
        return dict(
            ram_path=str(self.paths.shm / f"{name}.ram"),
            qmp_path=str(self.paths.shm / f"{name}.qmp"),
            agent_path=str(self.paths.shm / f"{name}.agent"),
            log_path=str(vm_dir / "qemu.log"),
            serial_log=str(vm_dir / "serial.log"),
        )

    def remembered_options(self, family: str) -> NetOptions:
        return NetOptions.from_json(self.store.family_options(family))

    def family_options(self, family: str) -> NetOptions:
        """A living family's network options, else the ones remembered for that name."""
        if not family:
            return NetOptions()
        fam = self.families.by_name.get(family)
        return fam.options if fam is not None else self.remembered_options(family)

    def name_taken(self, name: str) -> bool:
        return name in self.vms or self.store.get_vm(name) is not None

    def new_layer(self, name: str) -> str:
        return str(self.paths.disks / f"{name}-{self.store.next('layer')}.qcow2")

    def reserve(self, rec: VmRecord) -> None:
        if rec.name in self.vms or self.store.get_vm(rec.name) is not None:
            raise AlreadyExists(f"VM {rec.name} already exists (stop it first, or pick another name)")
        self.paths.vm_dir(rec.name).mkdir(parents=True, exist_ok=True)
        self.store.put_vm(rec)

    def release_files(self, rec: VmRecord, keep_logs: bool = False, reason: str = "stopped") -> None:
        # Only a parent owns its RAM file (on tmpfs). A clone maps the checkpoint's
        # RAM privately and a receiver writes it: that file belongs to the checkpoint.
        owned = [rec.qmp_path, rec.agent_path] + ([rec.ram_path] if rec.role == VmRole.PARENT else [])
        for f in owned:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)
        # The active overlay is never part of a checkpoint (a checkpoint freezes
        # the layer and moves the VM to a new one), so it can always go.
        if rec.overlay and rec.role != VmRole.RECEIVER:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rec.overlay)
        if not keep_logs:
            shutil.rmtree(self.paths.vm_dir(rec.name), ignore_errors=True)
        self.families.leave_soon(rec.name)
        self.clone_api.vm_gone(rec.name, reason)

    def _watch(self, vm: Vm) -> None:
        task = asyncio.ensure_future(self._on_exit(vm))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _on_exit(self, vm: Vm) -> None:
        await vm.qemu.exited.wait()
        if vm.qemu.stopping or self.vms.get(vm.rec.name) is not vm:
            return
        report = vm.qemu.failure_report()
        log.warning("VM %s: QEMU exited unexpectedly (code %s)%s", vm.rec.name, vm.qemu.returncode, report)
        self.vms.pop(vm.rec.name, None)
        if vm.agent is not None:
            await vm.agent.close()
        await vm.qemu.stop()
        rec = vm.rec.with_(state=VmState.CRASHED, pid=None,
                           error=f"QEMU exited with code {vm.qemu.returncode}{report}")
        self.release_files(rec, keep_logs=True, reason=f"crashed: QEMU exited with code {vm.qemu.returncode}")
        self.store.put_vm(rec)

    def _get(self, name: str) -> Vm:
        vm = self.vms.get(name)
        if vm is not None:
            return vm
        rec = self.store.get_vm(name)
        if rec is not None and rec.state == VmState.CRASHED:
            raise QemuError(f"VM {name} crashed: {rec.error}")
        raise NotFound(f"no VM named {name} (see `sfmpi vm list`)")

    # -- start -----------------------------------------------------------
    async def start_vm(self, name: str, image: str, mem_mb: int = 512, cpus: int = 1,
                       accel: str | None = None, timeout: float = BOOT_TIMEOUT,
                       nat: bool = False, open_ports: list[str] | tuple = (), ram_backing: str = "auto") -> dict:
        """Boot a parent VM; it starts family `name` with NAT and open ports as given
        (its clones inherit them). Its RAM goes on huge pages when the host has
        them (ram_backing auto), which keeps checkpoint pauses short at any size."""
        check_name(name)
        if cpus < 1 or mem_mb < 64:
            raise UsageError(f"VM {name}: need at least 1 vCPU and 64 MiB (got {cpus}, {mem_mb} MiB)")
        ram_dir, backing = hugepages.ram_dir(ram_backing, mem_mb, self.paths.shm, hugepages.pool())
        options = NetOptions.parse(nat, open_ports)
        img = Image.load(image)
        chosen = await asyncio.to_thread(accel_mod.choose, str(img.kernel), str(img.initrd),
                                         self.paths.accel_cache, accel)
        spec = MachineSpec(mem_mb=mem_mb, cpus=cpus, accel=chosen, kernel=str(img.kernel),
                           initrd=str(img.initrd), append=img.append, disk_size=img.virtual_size)
        async with self.admission:
            admit(self.budget, self.usage(), 1, mem_mb, cpus, what=f"start of VM {name}")
            rec = VmRecord(name=name, role=VmRole.PARENT, state=VmState.STARTING, spec=spec.to_json(),
                           overlay=self.new_layer(name), image=str(img.disk), family=name, netid=0,
                           **{**self.files(name), "ram_path": self._parent_ram_path(name, ram_dir, backing)})
            self.reserve(rec)
        t0 = time.monotonic()
        try:
            fam = await self.families.ensure(name, options=options)
            # Remembered so that a restarted hostd, or a clone of a checkpoint
            # after the family is gone, re-makes the family with the same rules.
            self.store.put_family_options(name, options.to_json())
            tap = (await self.families.add(fam, [(name, 0)]))[name]
            vm_rec = rec.with_(family_no=fam.number)
            self.store.put_vm(vm_rec)
            await proc.run_async(overlay_argv(rec.overlay, str(img.disk)))
            argv = vm_argv(spec, name=name, ram_path=rec.ram_path, share_ram=True,
                           disk=Qcow2Disk(rec.overlay), sockets=Sockets(rec.qmp_path, rec.agent_path),
                           serial_log=rec.serial_log, nic=Nic(mac=netplan.mac(fam.number, 0), tap=tap),
                           vmgenid=str(uuid.uuid4()), prealloc=True)
            vm = await self.launch(vm_rec, argv)
            info = await vm.agent.wait_ready(timeout)
            t_agent = time.monotonic()
            system = await self._wait_booted(vm, max(1.0, timeout - (t_agent - t0)))
            await self._identify(vm)
        except BaseException as exc:
            await self.abandon(name, exc)
            raise
        vm.rec = vm.rec.with_(state=VmState.RUNNING)
        self.store.put_vm(vm.rec)
        return {**self.describe(vm.rec), "ram_backing": backing, "boot_ms": (time.monotonic() - t0) * 1000.0,
                "agent_ms": (t_agent - t0) * 1000.0, "system": system,
                "guest_uptime_s": info.get("uptime")}

    def _parent_ram_path(self, name: str, ram_dir: Path, backing: str) -> str:
        if backing == "tmpfs":
            return str(ram_dir / f"{name}.ram")
        return str(ram_dir / hugepages.ram_file_name(self.paths.shm.name, name))

    def identity_of(self, name: str) -> dict:
        rec = self._get(name).rec
        fam = self.families.of_vm(name)
        if fam is None:
            return {}
        return netplan.identity(fam.number, fam.name, rec.netid)

    def family_hosts(self, name: str) -> list[list[str]]:
        fam = self.families.of_vm(name)
        return fam.hosts() if fam is not None else []

    async def _identify(self, vm: Vm) -> None:
        """Give a booted parent its family identity (address, hostname)."""
        fam = self.families.of_vm(vm.rec.name)
        assert fam is not None and vm.agent is not None
        ident = {**netplan.identity(fam.number, fam.name, 0), "ticket": None}
        await vm.agent.send_op({"op": "identify", "identity": ident, "hosts": fam.hosts()})
        report = await vm.agent.wait_event("identified", IDENTIFY_TIMEOUT)
        if not report.get("ok"):
            raise NetworkError(f"VM {vm.rec.name}: the guest could not configure its identity: "
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
            raise AgentError(f"VM {vm.rec.name}: guest did not finish booting in {timeout:.0f} s") from None
        state = out.decode(errors="replace").strip().splitlines()[-1:] or ["unknown"]
        return state[0]

    async def launch(self, rec: VmRecord, argv: list[str], pass_fds: tuple[int, ...] = ()) -> Vm:
        """Start QEMU for rec, connect its agent channel, start watching it."""
        qemu = QemuProcess(rec.name, argv, rec.qmp_path, rec.log_path, rec.serial_log, pass_fds)
        vm = Vm(rec=rec, qemu=qemu)
        self.vms[rec.name] = vm
        await qemu.start()
        vm.rec = rec = rec.with_(pid=qemu.pid)
        self.store.put_vm(rec)
        self._watch(vm)
        vm.agent = AgentChannel(rec.name, rec.agent_path)
        await vm.agent.connect()
        self.clone_api.attach(vm)
        return vm

    async def abandon(self, name: str, exc: BaseException) -> None:
        """Undo a VM that failed to come up: nothing of it may stay behind."""
        vm = self.vms.pop(name, None)
        report = ""
        if vm is not None:
            report = vm.qemu.failure_report()
            if vm.agent is not None:
                await vm.agent.close()
            await vm.qemu.stop()
        rec = self.store.get_vm(name)
        if rec is not None:
            # Logs stay in vms/NAME/ for the user to read; `down` clears them.
            self.release_files(rec, keep_logs=True)
            self.store.delete_vm(name)
        if isinstance(exc, AgentError) and report and isinstance(exc.args[0], str) and report not in exc.args[0]:
            exc.args = (exc.args[0] + report,)

    # -- stop / list / exec ----------------------------------------------
    async def stop_vm(self, name: str) -> dict:
        vm = self.vms.get(name)
        rec = self.store.get_vm(name)
        if vm is None and rec is None:
            raise NotFound(f"no VM named {name} (see `sfmpi vm list`)")
        if vm is not None:
            async with vm.lock:
                self.vms.pop(name, None)
                if vm.agent is not None:
                    await vm.agent.close()
                await vm.qemu.stop()
                rec = vm.rec
        self.release_files(rec)
        self.store.delete_vm(name)
        return {"name": name, "state": VmState.STOPPED.value}

    def describe(self, rec: VmRecord) -> dict:
        return {
            "name": rec.name, "role": rec.role.value, "state": rec.state.value, "pid": rec.pid,
            "mem_mb": rec.spec["mem_mb"], "cpus": rec.spec["cpus"], "accel": rec.spec["accel"],
            "checkpoint": rec.checkpoint, "error": rec.error.splitlines()[0] if rec.error else "",
            "family": rec.family, "family_no": rec.family_no or None,
            "netid": rec.netid if rec.family else None,
            "ip": str(netplan.ip(rec.family_no, rec.netid)) if rec.family_no else "",
            "ticket": rec.ticket, **self.family_options(rec.family).to_json(),
        }

    def list_vms(self) -> list[dict]:
        return [self.describe(self.vms[r.name].rec if r.name in self.vms else r) for r in self.store.vms()]

    async def exec(self, name: str, argv: list[str], sink: OutputSink, env: dict | None = None,
                   cwd: str | None = None) -> int:
        if not argv:
            raise UsageError("vm exec: no command given (use `sfmpi vm exec NAME -- CMD...`)")
        vm = self._get(name)
        if vm.rec.role == VmRole.RECEIVER or vm.agent is None:
            raise UsageError(f"VM {name} does not run guest commands")
        try:
            return await vm.agent.exec(argv, sink, env=env, cwd=cwd)
        except AgentError:
            if vm.qemu.exited.is_set():
                raise QemuError(f"VM {name} died while running {argv[0]}{vm.qemu.failure_report()}")
            raise

    # -- checkpoint ------------------------------------------------------
    async def checkpoint(self, name: str, mode: str | None = None) -> dict:
        if mode is not None and mode not in MODES:
            raise UsageError(f"checkpoint mode must be one of {', '.join(MODES)} (got {mode!r})")
        vm = self._get(name)
        if vm.rec.role == VmRole.RECEIVER:
            raise UsageError(f"VM {name} is a checkpoint receiver")
        # A clone's RAM is a private (copy-on-write) mapping of its checkpoint:
        # QEMU's background snapshot can only write-protect shared memory.
        if vm.rec.role == VmRole.CLONE and mode == "background":
            raise UsageError(f"VM {name} is a clone: its RAM is a private copy-on-write mapping, which the "
                             "background snapshot cannot track; use --mode paused (the default for clones)")
        mode = mode or ("paused" if vm.rec.role == VmRole.CLONE else "background")
        if vm.lock.locked():
            raise UsageError(f"VM {name} is busy with another checkpoint or stop")
        async with vm.lock:
            return await self._checkpoint(vm, mode)

    async def checkpoint_for_clone(self, name: str, mode: str, guest_req: int | None = None) -> Checkpoint:
        """A checkpoint taken for the clone API (guest_req: the guest's pending call)."""
        vm = self._get(name)
        async with vm.lock:
            res = await self._checkpoint(vm, mode, guest_req)
        return self.find_checkpoint(res["id"])

    async def _checkpoint(self, vm: Vm, mode: str, guest_req: int | None = None) -> dict:
        name = vm.rec.name
        ckpt_id = f"{name}-ck{self.store.next('ckpt:' + name)}"
        final = self.paths.checkpoints / ckpt_id
        work = self.paths.checkpoints / f".{ckpt_id}.partial"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        frozen = vm.rec.overlay
        new_layer = self.new_layer(name)
        node = "disk0-" + Path(new_layer).stem.rsplit("-", 1)[-1]
        spec = MachineSpec.from_json(vm.rec.spec)
        t0 = time.monotonic()
        receiver = None
        try:
            if mode in ("background", "precopy"):
                receiver = await self._start_receiver(vm, work / "ram")
                capture = capture_background if mode == "background" else capture_precopy
                timings = await capture(
                    vm.qemu, receiver.qemu, f"unix:{self._mig_socket(receiver.rec.name)}",
                    DiskFreeze(vm.qemu, new_layer, node), work / "state")
            else:
                timings = await capture_paused(
                    vm.qemu, vm.rec.ram_path, work / "ram", DiskFreeze(vm.qemu, new_layer, node),
                    work / "state", sparse_copy)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            if await self._top_is(vm, new_layer):
                # The disk was frozen before the failure: the parent now writes to
                # new_layer, whose backing is the old layer. Keep both.
                vm.rec = vm.rec.with_(overlay=new_layer)
                self.store.put_vm(vm.rec)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(new_layer)
            raise
        finally:
            if receiver is not None:
                await self._drop_receiver(receiver)
        # From here on the parent runs on new_layer; `frozen` belongs to the checkpoint.
        vm.rec = vm.rec.with_(overlay=new_layer)
        self.store.put_vm(vm.rec)
        if mode != "paused":  # sparse_copy made the holes already
            # The receiver wrote every page, zero pages too: give those back.
            t_dig = time.monotonic()
            await proc.run_async(["fallocate", "--dig-holes", str(work / "ram")])
            timings["dig_holes_ms"] = (time.monotonic() - t_dig) * 1000.0
        chain = await self._backing_chain(frozen)
        await make_overlay_template(work / OVERLAY_TEMPLATE, frozen)
        ram_stat = (work / "ram").stat()
        ckpt = Checkpoint(
            id=ckpt_id, vm=name, path=str(final), machine=spec.to_json(), disk=frozen,
            disk_chain=tuple(chain), state_sha256=sha256_file(work / "state"),
            state_size=(work / "state").stat().st_size, ram_size=ram_stat.st_size,
            ram_allocated=ram_stat.st_blocks * 512, mode=mode, pause_ms=timings["pause_ms"],
            qemu_version=qemu_version(), timings=timings, family=vm.rec.family or name,
            guest_req=guest_req,
        )
        ckpt.write(work)
        os.rename(work, final)
        self.store.add_checkpoint(ckpt_id, name, str(final))
        timings["total_ms"] = (time.monotonic() - t0) * 1000.0
        return {"id": ckpt_id, "path": str(final), "mode": mode, "pause_ms": ckpt.pause_ms,
                "ram_mb": ckpt.ram_size >> 20, "ram_allocated_mb": round(ckpt.ram_allocated / 2**20, 1),
                "state_kb": ckpt.state_size // 1024, "timings": timings}

    async def _top_is(self, vm: Vm, layer: str) -> bool:
        with contextlib.suppress(Exception):
            return (await top_disk(vm.qemu))[1] == layer
        return False

    def _mig_socket(self, name: str) -> str:
        return str(self.paths.shm / f"{name}.mig")

    async def _start_receiver(self, parent: Vm, ram_file: Path) -> Vm:
        name = f"{parent.rec.name}-rx"
        spec = MachineSpec.from_json(parent.rec.spec)
        async with self.admission:
            admit(self.budget, self.usage(), 1, spec.mem_mb, spec.cpus,
                  what=f"checkpoint receiver for VM {parent.rec.name}")
            rec = VmRecord(name=name, role=VmRole.RECEIVER, state=VmState.STARTING, spec=spec.to_json(),
                           overlay="", **{**self.files(name), "ram_path": str(ram_file)})
            self.reserve(rec)
        # The receiver's NIC must negotiate what the parent's did (a tap's
        # offloads), but it never runs: a tap that vanishes with it, on no bridge.
        tap_fd = open_unattached_tap()
        argv = vm_argv(spec, name=name, ram_path=str(ram_file), share_ram=True,
                       disk=NullDisk(spec.disk_size), sockets=Sockets(rec.qmp_path, rec.agent_path),
                       serial_log=rec.serial_log, nic=Nic(mac=netplan.mac(1, 0), tap_fd=tap_fd),
                       vmgenid=str(uuid.uuid4()), incoming=f"unix:{self._mig_socket(name)}", paused=True)
        qemu = QemuProcess(name, argv, rec.qmp_path, rec.log_path, rec.serial_log, pass_fds=(tap_fd,))
        vm = Vm(rec=rec, qemu=qemu)
        self.vms[name] = vm
        try:
            await qemu.start()
        except BaseException as exc:
            await self.abandon(name, exc)
            raise
        finally:
            os.close(tap_fd)
        vm.rec = vm.rec.with_(pid=qemu.pid, state=VmState.PAUSED)
        self.store.put_vm(vm.rec)
        self._watch(vm)
        await set_capabilities(qemu, events=True)
        return vm

    async def _drop_receiver(self, receiver: Vm) -> None:
        self.vms.pop(receiver.rec.name, None)
        await receiver.qemu.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._mig_socket(receiver.rec.name))
        self.release_files(receiver.rec)
        self.store.delete_vm(receiver.rec.name)

    @staticmethod
    async def _backing_chain(layer: str) -> list[str]:
        _, out, _ = await proc.run_async(["qemu-img", "info", "-U", "--backing-chain", "--output=json", layer])
        return [entry["filename"] for entry in json.loads(out)][1:]

    def find_checkpoint(self, ref: str) -> Checkpoint:
        path = self.store.checkpoint_path(ref)
        if path is None:
            candidate = Path(ref)
            if not candidate.is_dir():
                raise NotFound(f"no checkpoint {ref} (give an id from `sfmpi checkpoint` or a checkpoint directory)")
            path = str(candidate.resolve())
        return Checkpoint.load(path)

    # -- clone -----------------------------------------------------------
    async def clone(self, ref: str, n: int, allow_fewer: bool = False) -> dict:
        return await self.cloner.clone(ref, n, allow_fewer)

    async def start_family_clones(self, ckpt: Checkpoint, count: int, ticket: str, greeting,
                                  on_reserved=lambda names: None) -> dict:
        return await self.cloner.clone_for_ticket(ckpt, count, ticket, greeting, on_reserved)

    def mark_running(self, name: str) -> None:
        vm = self.vms.get(name)
        if vm is None:  # a clone that already called exit (or died): nothing to mark
            return
        vm.rec = vm.rec.with_(state=VmState.RUNNING)
        self.store.put_vm(vm.rec)

    # -- recovery and teardown --------------------------------------------
    async def recover(self) -> dict:
        """After a restart: re-attach to VMs whose QEMU still runs, reap the rest."""
        attached, reaped = [], []
        seen_families: set[int] = set()
        for rec in self.store.vms():
            if rec.family_no:
                seen_families.add(rec.family_no)
            if rec.state in (VmState.CRASHED, VmState.STOPPED):
                continue
            alive = rec.pid is not None and pid_alive(rec.pid) and _is_our_qemu(rec.pid, rec.qmp_path)
            if alive and rec.role != VmRole.RECEIVER and rec.state != VmState.STARTING:
                try:
                    qemu = await QemuProcess.attach(rec.name, rec.pid, rec.qmp_path, rec.log_path, rec.serial_log)
                    vm = Vm(rec=rec, qemu=qemu)
                    self.vms[rec.name] = vm
                    self._watch(vm)
                    vm.agent = AgentChannel(rec.name, rec.agent_path)
                    await vm.agent.connect()
                    self.clone_api.attach(vm)
                    if rec.family_no:
                        # Re-adopt the family: same bridge, the running QEMU's tap,
                        # the rules of its remembered options (NAT, open ports).
                        fam = await self.families.ensure(rec.family, rec.family_no)
                        await self.families.add(fam, [(rec.name, rec.netid)])
                    attached.append(rec.name)
                    continue
                except SfmpiError as exc:
                    log.warning("VM %s: cannot re-attach (%s); reaping it", rec.name, exc)
                    self.vms.pop(rec.name, None)
            if alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(rec.pid, 9)
            self.release_files(rec)
            self.store.delete_vm(rec.name)
            reaped.append(rec.name)
        for partial in self.paths.checkpoints.glob(".*.partial"):
            shutil.rmtree(partial, ignore_errors=True)
        await self.families.sweep(seen_families)
        # Tickets after VMs: a ticket's clones are known to be alive or gone now.
        self.clone_api.restored(self.tickets.restore(alive=set(self.vms)))
        return {"attached": attached, "reaped": reaped}

    async def down(self) -> dict:
        """Stop every VM (clones first), remove every runtime file."""
        order = {VmRole.CLONE: 0, VmRole.RECEIVER: 1, VmRole.PARENT: 2}
        recs = sorted(self.store.vms(), key=lambda r: order[r.role])
        stopped = []
        for role in (VmRole.CLONE, VmRole.RECEIVER, VmRole.PARENT):
            batch = [r for r in recs if r.role == role]
            await asyncio.gather(*(self.stop_vm(r.name) for r in batch), return_exceptions=True)
            stopped += [r.name for r in batch]
        for task in list(self._watchers):
            task.cancel()
        await self.families.down()
        shutil.rmtree(self.paths.shm, ignore_errors=True)
        for ram in hugepages.leftover_files(self.paths.shm.name):  # a parent whose stop failed
            ram.unlink(missing_ok=True)
        for leftover in self.paths.vms.glob("*"):  # logs of VMs that failed to start
            shutil.rmtree(leftover, ignore_errors=True)
        return {"stopped": stopped}


def _is_our_qemu(pid: int, qmp_path: str) -> bool:
    """Guard against PID reuse: the process must be the QEMU with our QMP socket."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(qmp_path.encode() in arg for arg in cmdline)
