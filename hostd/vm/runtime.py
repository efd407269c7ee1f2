"""The VM runtime: QEMU processes and their agent channels, from launch to cleanup.

launch() starts QEMU for a reserved record, puts its PID on record before
waiting for QMP, connects the agent channel and watches for QEMU's exit. A VM
that dies on its own is marked crashed, with QEMU's stderr and the serial
console's tail, and announced gone like a stopped one.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
import logging
import os
import shutil
from typing import Callable

from sfmpi.errors import AgentError, NotFound, QemuError, SfmpiError, UsageError
from sfmpi.paths import Paths

from ..guestapi.channel import AgentChannel, OutputSink
from ..state.records import VmRecord, VmRole, VmState
from ..state.store import Store
from .cmdline import Launch
from .driver import VmDriver
from .qemu import QemuProcess
from .registry import Vm, VmRegistry

log = logging.getLogger("sfmpi.hostd.runtime")


class VmRuntime:
    def __init__(self, paths: Paths, store: Store, registry: VmRegistry, driver: VmDriver):
        """driver: what starts and ends QEMU (hostd/vm/driver.py)."""
        self.driver = driver
        self.paths = paths
        self.store = store          # counters only (layer names)
        self.vms = registry
        self._watchers: set[asyncio.Task] = set()
        self._explainers: list[Callable[[VmRecord], str]] = []

    def add_explainer(self, explain: Callable[[VmRecord], str]) -> None:
        """explain(rec): why a VM that died unexpectedly died, if a part knows ('' if not)."""
        self._explainers.append(explain)

    def explain(self, rec: VmRecord) -> str:
        """'; why' for each part that knows why the VM died, or ''."""
        whys = [w for w in (e(rec) for e in self._explainers) if w]
        return "".join(f"; {w}" for w in whys)

    # -- names -----------------------------------------------------------
    def files(self, name: str) -> dict:
        """Where a VM's runtime files go (the fields of its record)."""
        vm_dir = self.paths.vm_dir(name)
        return dict(
            ram_path=str(self.paths.shm / f"{name}.ram"),
            qmp_path=str(self.paths.shm / f"{name}.qmp"),
            agent_path=str(self.paths.shm / f"{name}.agent"),
            log_path=self.driver.log_path(name),
            serial_log=str(vm_dir / "serial.log"),
        )

    def new_layer(self, name: str) -> str:
        return str(self.paths.disks / f"{name}-{self.store.next('layer')}.qcow2")

    def reserve(self, rec: VmRecord) -> None:
        self.vms.reserve(rec)
        self.paths.vm_dir(rec.name).mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- start -----------------------------------------------------------
    async def launch(self, rec: VmRecord, launch: Launch, state_fd: int | None = None,
                     agent: bool = True, state: VmState | None = None) -> Vm:
        """Start QEMU for the reserved record `rec`, connect its agent, watch it.
        state_fd: the device state a clone loads (see state_uri)."""
        started: list[Vm] = []

        def spawned(qemu: QemuProcess) -> None:
            # On record before anything can stall: a hostd killed while it
            # waits still finds and reaps this QEMU, a failure here ends it.
            vm = Vm(rec=rec, qemu=qemu)
            self.vms.add(vm)
            self.vms.update(vm, pid=qemu.pid)
            started.append(vm)
        await self.driver.start(rec, launch, state_fd, spawned)
        vm = started[0]
        if state is not None:
            self.vms.update(vm, state=state)
        self._watch(vm)
        if agent:
            vm.agent = AgentChannel(rec.name, rec.agent_path)
            await vm.agent.connect()
            self.vms.announce_launched(vm)
        return vm

    def state_uri(self, fd: int) -> str:
        """migrate-incoming's URI for the state_fd given to launch()."""
        return self.driver.state_uri(fd)

    async def attach(self, rec: VmRecord) -> Vm:
        """Take over a VM whose QEMU a previous hostd started."""
        qemu = await self.driver.attach(rec)
        vm = Vm(rec=rec, qemu=qemu)
        self.vms.add(vm)
        self._watch(vm)
        vm.agent = AgentChannel(rec.name, rec.agent_path)
        await vm.agent.connect()
        self.vms.announce_launched(vm)
        return vm

    def _watch(self, vm: Vm) -> None:
        task = asyncio.ensure_future(self._on_exit(vm))
        self._watchers.add(task)   # referenced: a bare future may be collected mid-wait
        task.add_done_callback(self._watchers.discard)

    async def _on_exit(self, vm: Vm) -> None:
        await vm.qemu.exited.wait()
        if vm.qemu.stopping or self.vms.find(vm.name) is not vm:
            return
        report = self.explain(vm.rec) + vm.qemu.failure_report()
        # A QEMU hostd did not start itself (a libvirt domain's, a re-attached
        # one) has no exit code to read.
        how = f"with code {vm.qemu.returncode}" if vm.qemu.returncode is not None else "while hostd did not stop it"
        log.warning("VM %s: QEMU exited unexpectedly (%s)%s", vm.name, how, report)
        self.vms.detach(vm.name)
        if vm.agent is not None:
            await vm.agent.close()
        await vm.qemu.stop()
        rec = self.vms.update(vm, state=VmState.CRASHED, pid=None,
                              error=f"QEMU exited {how}{report}")
        self.release(rec, keep_logs=True, reason=f"crashed: QEMU exited {how}")

    # -- end -------------------------------------------------------------
    def release(self, rec: VmRecord, keep_logs: bool = False, reason: str = "stopped") -> None:
        """Remove what the VM owned on the host and announce it gone (its record stays)."""
        # Only a parent owns its RAM file. A clone maps the checkpoint's RAM
        # privately and a receiver writes it: that file belongs to the checkpoint.
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
        self.vms.announce_gone(rec, reason)

    async def abandon(self, name: str, exc: BaseException | None = None) -> None:
        """End a VM that failed to come up (exc: why) or was only ever transient
        (a receiver): nothing of it may stay behind but, after a failure, its logs."""
        vm = self.vms.detach(name)
        report = why = ""
        if vm is not None:
            why = self.explain(vm.rec)
            report = why + vm.qemu.failure_report()
            if vm.agent is not None:
                await vm.agent.close()
            await vm.qemu.stop()
        rec = self.vms.record(name) or (vm.rec if vm is not None else None)
        if rec is not None:
            # After a failure, logs stay in vms/NAME/ for the user to read; `down` clears them.
            self.release(rec, keep_logs=exc is not None, reason="failed to start" if exc else "stopped")
            self.vms.delete(name)
        if isinstance(exc, AgentError) and report and isinstance(exc.args[0], str) and report not in exc.args[0]:
            exc.args = (exc.args[0] + report,)
        elif isinstance(exc, SfmpiError) and why and exc.args and isinstance(exc.args[0], str) \
                and why not in exc.args[0]:
            exc.args = (exc.args[0] + why,)   # QEMU's own report is in it already

    async def stop(self, name: str) -> dict:
        vm = self.vms.find(name)
        rec = self.vms.record(name)
        if vm is None and rec is None:
            raise NotFound(f"no VM named {name} (see `sfmpi vm list`)")
        if vm is not None:
            async with vm.lock:
                self.vms.detach(name)
                if vm.agent is not None:
                    await vm.agent.close()
                await vm.qemu.stop()
                rec = vm.rec
        self.release(rec)
        self.vms.delete(name)
        return {"name": name, "state": VmState.STOPPED.value}

    def cancel_watchers(self) -> None:
        for task in list(self._watchers):
            task.cancel()

    # -- guest commands --------------------------------------------------
    async def exec(self, name: str, argv: list[str], sink: OutputSink, env: dict | None = None,
                   cwd: str | None = None) -> int:
        if not argv:
            raise UsageError("vm exec: no command given (use `sfmpi vm exec NAME -- CMD...`)")
        vm = self.vms.get(name)
        if vm.rec.role == VmRole.RECEIVER or vm.agent is None:
            raise UsageError(f"VM {name} does not run guest commands")
        try:
            return await vm.agent.exec(argv, sink, env=env, cwd=cwd)
        except AgentError:
            if await self.died_soon(vm):
                raise QemuError(f"VM {name} died while running {argv[0]}{self.explain(vm.rec)}"
                                 f"{vm.qemu.failure_report()}") from None
            raise

    async def report_load(self, names: list[str], interval: float) -> dict:
        """Ask these VMs' agents for load reports every `interval` s (0: stop)."""
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval <= 3600:
            raise UsageError(f"load report interval must be 0-3600 s (got {interval!r})")
        vms = [self.vms.get(name) for name in names]
        for vm in vms:
            if vm.agent is None:
                raise UsageError(f"VM {vm.name} has no agent to report its load")
            await vm.agent.send_op({"op": "load", "interval": float(interval)})
        return {"asked": [vm.name for vm in vms]}

    def loads(self) -> dict:
        """The last load report of every live VM that sent one, and how old it is."""
        now = time.time()
        out = {}
        for name, vm in self.vms.live.items():
            last = vm.agent.last_load if vm.agent is not None else None
            if last is not None:
                out[name] = {**last, "age_s": round(now - last["at"], 3), "state": vm.rec.state.value}
        return out

    @staticmethod
    async def died_soon(vm: Vm, grace: float = 3.0) -> bool:
        """Did QEMU exit, or is it exiting? The agent's line closes a moment
        before QEMU's exit is seen; the error must name the cause, not the symptom."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(vm.qemu.exited.wait(), grace)
        return vm.qemu.exited.is_set()
