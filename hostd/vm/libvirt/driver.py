"""The libvirt driver: every sfmpi VM is a transient domain of hostd's private libvirtd.

libvirt starts, lists and ends the QEMUs (virsh and the tools built on it
see every VM by name, `sfmpi-TAG-VM`); hostd still speaks to each over its own
QMP monitor (domain.py says why), so checkpoints, clones and throttling are
the same code on either driver. Transient domains: a domain is defined only
while its QEMU runs, and is gone with it, whoever ended it.

libvirt-python is imported here only, when the driver is made: the direct
driver and the unit tests need none of it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from sfmpi.errors import HostdError, QemuError, UsageError
from sfmpi.paths import Paths

from ...state.records import VmRecord
from ..cmdline import Launch, NullDisk
from ..qemu import QemuProcess
from .daemon import LibvirtDaemon
from .domain import DISK_ALIAS, domain_name, domain_xml

log = logging.getLogger("sfmpi.hostd.libvirt")

# The name under which a clone's QEMU holds the checkpoint's device state (QMP getfd).
STATE_FD_NAME = "sfmpi-state"
# libvirt-python blocks: its calls run on threads. asyncio's default pool has
# cores + 4 threads (6 here), which let only 6 of a clone-8's domains start at
# once (measured in libvirtd's log); a request's clones all start together.
LIBVIRT_THREADS = 32


def _libvirt():
    try:
        import libvirt
    except ImportError:
        raise UsageError("the libvirt driver needs libvirt-python (`make deps` installs it)") from None
    # libvirt prints every error on stderr by default; hostd reports them itself.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    return libvirt


class LibvirtDriver:
    name = "libvirt"

    def __init__(self, paths: Paths, netns_path: str, tag: str):
        self.lv = _libvirt()
        self.paths = paths
        self.tag = tag
        # memtap mounts served clones' RAM files there after libvirtd started.
        self.daemon = LibvirtDaemon(paths.home / "libvirt", netns_path, shared=(paths.memory,))
        self._conn = None
        self._ready = asyncio.Lock()
        self._threads = ThreadPoolExecutor(LIBVIRT_THREADS, thread_name_prefix="libvirt")

    async def _call(self, fn, *args):
        """fn(*args) on one of the driver's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    # -- the daemon and the connection -------------------------------------
    async def _connection(self):
        """libvirtd is started at the first VM: it must run in the families'
        namespace, which hostd makes with the first family."""
        async with self._ready:
            if self._conn is not None and self.daemon.alive():
                return self._conn
            await self._call(self.daemon.start)
            try:
                self._conn = await self._call(self.lv.open, self.daemon.uri)
            except self.lv.libvirtError as exc:
                raise HostdError(f"cannot connect to libvirtd at {self.daemon.uri}: {exc}") from None
            return self._conn

    def domain(self, vm: str) -> str:
        return domain_name(self.tag, vm)

    def log_path(self, vm: str) -> str:
        # libvirt's own log of the domain (virtlogd writes QEMU's stderr there).
        return str(self.daemon.root / "log" / "qemu" / f"{self.domain(vm)}.log")

    # -- VMs ---------------------------------------------------------------
    async def start(self, rec: VmRecord, launch: Launch, state_fd: int | None,
                    on_spawned: Callable[[QemuProcess], None]) -> QemuProcess:
        null_disk = None
        if isinstance(launch.disk, NullDisk):
            # libvirt has no null block driver: a sparse file, never read, gone with the VM's directory.
            null_disk = str(self.paths.vm_dir(rec.name) / "null-disk.raw")
            with open(null_disk, "wb") as f:
                f.truncate(launch.disk.size)
        domain = self.domain(rec.name)
        try:
            xml = domain_xml(launch, domain, null_disk)
        except ValueError as exc:
            raise UsageError(f"VM {rec.name}: the libvirt driver cannot run it: {exc}") from None
        conn = await self._connection()
        # Paused when it must load state first: libvirt would otherwise `cont`
        # a QEMU that waits for its incoming migration.
        flags = self.lv.VIR_DOMAIN_START_PAUSED if (launch.paused or launch.incoming) else 0
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.log_path(rec.name))   # a previous VM of this name's
        try:
            await self._call(conn.createXML, xml, flags)
        except self.lv.libvirtError as exc:
            raise QemuError(f"VM {rec.name}: libvirt could not start domain {domain}: "
                            f"{exc.get_error_message()}") from None
        pid = self._pid(domain)
        if pid is None:
            await self._destroy(domain)
            raise QemuError(f"VM {rec.name}: libvirt started domain {domain} but names no QEMU PID")
        qemu = await QemuProcess.attach(rec.name, pid, rec.qmp_path, rec.log_path, rec.serial_log,
                                        timeout=30.0, on_attached=self._ending(domain, on_spawned),
                                        disk_device=DISK_ALIAS)
        if state_fd is not None:
            # Not inherited as under the direct driver: libvirt starts QEMU. Passed over hostd's monitor.
            qemu.qmp.send_fd_scm(state_fd)
            await qemu.execute("getfd", {"fdname": STATE_FD_NAME})
        log.info("VM %s: domain %s, QEMU %d", rec.name, domain, pid)
        return qemu

    def _ending(self, domain: str, then: Callable[[QemuProcess], None]) -> Callable[[QemuProcess], None]:
        def attached(qemu: QemuProcess) -> None:
            qemu.terminate = lambda: self._destroy(domain)
            then(qemu)
        return attached

    def _pid(self, domain: str) -> int | None:
        try:
            return int((self.daemon.root / "run" / "qemu" / f"{domain}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    async def _destroy(self, domain: str) -> None:
        """End a domain (gone already: nothing to do)."""
        conn = self._conn
        if conn is None:
            return

        def destroy() -> None:
            with contextlib.suppress(self.lv.libvirtError):
                conn.lookupByName(domain).destroy()
        await self._call(destroy)

    async def attach(self, rec: VmRecord) -> QemuProcess:
        domain = self.domain(rec.name)
        conn = await self._connection()
        try:
            await self._call(conn.lookupByName, domain)
        except self.lv.libvirtError:
            raise QemuError(f"VM {rec.name}: libvirt has no domain {domain}") from None
        return await QemuProcess.attach(rec.name, rec.pid, rec.qmp_path, rec.log_path, rec.serial_log,
                                        on_attached=self._ending(domain, lambda _q: None),
                                        disk_device=DISK_ALIAS)

    def state_uri(self, fd: int) -> str:
        return f"fd:{STATE_FD_NAME}"

    def running(self) -> list[str]:
        """The sfmpi domains of this hostd that libvirt lists."""
        if self._conn is None or not self.daemon.alive():
            return []
        prefix = self.domain("")
        with contextlib.suppress(self.lv.libvirtError):
            return sorted(d.name() for d in self._conn.listAllDomains() if d.name().startswith(prefix))
        return []

    async def close(self, down: bool) -> None:
        """down: no domain and no daemon stays (the log directory goes with
        the VMs'). Otherwise libvirtd keeps running with the VMs hostd keeps."""
        if down:
            if self._conn is None and self.daemon.adopt():
                self._conn = await self._call(self.lv.open, self.daemon.uri)
            for domain in await self._call(self.running):
                await self._destroy(domain)
        if self._conn is not None:
            with contextlib.suppress(self.lv.libvirtError):
                await self._call(self._conn.close)
            self._conn = None
        if down:
            await self._call(self.daemon.stop)
            shutil.rmtree(self.daemon.root / "log" / "qemu", ignore_errors=True)

