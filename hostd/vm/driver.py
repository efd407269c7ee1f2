"""VM drivers: what hostd asks of whatever runs its QEMUs.

hostd speaks to every QEMU over a QMP monitor of its own (checkpoints,
clones, throttling), whoever started it; a driver only starts QEMU for a
launch description (hostd/vm/cmdline.py, Launch), re-attaches to one after a
restart, ends it, and says where its log is. Two drivers:
- direct: hostd runs QEMU itself (this module);
- libvirt: each VM is a transient libvirt domain of a private libvirtd
  (hostd/vm/libvirt/driver.py; libvirt-python is imported only there).
`SFMPI_DRIVER` or `sfmpi hostd --driver` chooses; direct is the default. A
state directory keeps the driver its hostd started with until `sfmpi down`
(choose_driver): a hostd of the other driver would neither re-attach to its
VMs nor end the libvirtd they run under.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Awaitable, Callable, Protocol

from sfmpi.errors import UsageError
from sfmpi.paths import Paths

from ..state.records import VmRecord
from .cmdline import Launch, Nic, launch_argv
from .qemu import QemuProcess
from .tap import open_unattached_tap

DRIVERS = ("direct", "libvirt")
InNamespace = Callable[..., Awaitable]


def driver_from_env() -> str:
    name = os.environ.get("SFMPI_DRIVER", "direct") or "direct"
    if name not in DRIVERS:
        raise UsageError(f"SFMPI_DRIVER must be one of {', '.join(DRIVERS)} (got {name!r})")
    return name


def choose_driver(recorded: Path) -> str:
    """The driver of this hostd: the one `recorded` names (what the state
    directory's hostd started with, until `sfmpi down` removes it), else the
    environment's. A different one asked for explicitly is refused."""
    asked = os.environ.get("SFMPI_DRIVER", "")
    name = driver_from_env()
    try:
        before = recorded.read_text().strip()
    except FileNotFoundError:
        before = ""
    if before in DRIVERS:
        if asked and asked != before:
            raise UsageError(f"this state directory runs the {before} driver until `sfmpi down` "
                             f"(asked for {asked}): its VMs and daemons belong to that driver")
        name = before
    recorded.write_text(name + "\n")
    return name


class VmDriver(Protocol):
    name: str

    def log_path(self, vm: str) -> str:
        """Where QEMU's own output (its stderr) goes."""

    async def start(self, rec: VmRecord, launch: Launch, state_fd: int | None,
                    on_spawned: Callable[[QemuProcess], None]) -> QemuProcess:
        """Start QEMU, connected over hostd's QMP. on_spawned(qemu) as soon as a
        process exists (its PID known): from then on, whatever fails, the caller
        can end it. state_fd: a descriptor QEMU must read (state_uri names it)."""

    async def attach(self, rec: VmRecord) -> QemuProcess:
        """Take over a QEMU started before a restart of hostd."""

    def state_uri(self, fd: int) -> str:
        """The migrate-incoming URI of the descriptor given to start()."""

    def running(self) -> list[str]:
        """What the runtime under the driver itself lists as running (for `down`'s check)."""

    async def close(self, down: bool) -> None:
        """hostd exits (down: and leaves nothing running)."""


class DirectDriver:
    """hostd runs QEMU as a child of its own, in the families' namespace by `wrap`."""
    name = "direct"

    def __init__(self, paths: Paths, wrap: Callable[[list[str]], list[str]] = lambda argv: argv,
                 in_namespace: InNamespace | None = None):
        self.paths = paths
        self.wrap = wrap
        self.in_namespace = in_namespace   # runs a function where the families' links live

    def log_path(self, vm: str) -> str:
        return str(self.paths.vm_dir(vm) / "qemu.log")

    async def start(self, rec: VmRecord, launch: Launch, state_fd: int | None,
                    on_spawned: Callable[[QemuProcess], None]) -> QemuProcess:
        own_tap = None
        nic = launch.nic
        if nic.tap is None and nic.tap_fd is None:
            # An unattached tap that vanishes with QEMU: opened where the families' links are.
            own_tap = await self.in_namespace(open_unattached_tap) if self.in_namespace else open_unattached_tap()
            nic = Nic(mac=nic.mac, tap_fd=own_tap)
        fds = tuple(fd for fd in (state_fd, nic.tap_fd) if fd is not None)
        argv = launch_argv(launch, nic)
        try:
            qemu = QemuProcess(rec.name, self.wrap(argv) if launch.in_families_netns else argv,
                               rec.qmp_path, rec.log_path, rec.serial_log, fds)
            await qemu.start(on_spawned=lambda _pid: on_spawned(qemu))
        finally:
            if own_tap is not None:
                os.close(own_tap)
        return qemu

    async def attach(self, rec: VmRecord) -> QemuProcess:
        return await QemuProcess.attach(rec.name, rec.pid, rec.qmp_path, rec.log_path, rec.serial_log)

    def state_uri(self, fd: int) -> str:
        return f"fd:{fd}"   # inherited under the same number

    def running(self) -> list[str]:
        return []   # no runtime of its own: hostd's records are the whole truth

    async def close(self, down: bool) -> None:
        return None


def make_driver(name: str, paths: Paths, netns_path: str | Path, tag: str,
                wrap: Callable[[list[str]], list[str]], in_namespace: InNamespace) -> VmDriver:
    if name == "direct":
        return DirectDriver(paths, wrap, in_namespace)
    if name == "libvirt":
        from .libvirt.driver import LibvirtDriver
        return LibvirtDriver(paths, str(netns_path), tag)
    raise UsageError(f"unknown VM driver {name!r} (one of {', '.join(DRIVERS)})")
