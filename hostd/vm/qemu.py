"""QemuProcess: the one owner of one QEMU process and its QMP connection.

QEMU runs in its own session with stdout/stderr in a log file, so it outlives a
restarted hostd (which re-attaches by PID and QMP socket) and so a failure is
always reported with what QEMU printed (a daemonized QEMU's stderr is lost, and
then a failed migration says nothing: docs/architecture.md).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Awaitable, Callable

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.qmp_client import ExecuteError
from qemu.qmp.protocol import ConnectError

from sfmpi.errors import QemuError

from .cmdline import DISK_DEVICE

log = logging.getLogger("sfmpi.hostd.qemu")


def tail(path: str | Path, lines: int = 8) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class QemuProcess:
    """start() / stop() (safe twice, always cleans up) / async context manager."""

    def __init__(self, name: str, argv: list[str], qmp_path: str, log_path: str, serial_log: str,
                 pass_fds: tuple[int, ...] = ()):
        self.name = name
        self.argv = argv
        # File descriptors QEMU inherits under the same numbers (e.g. the
        # checkpoint's device state, for `migrate-incoming fd:N`).
        self.pass_fds = pass_fds
        self.qmp_path = qmp_path
        self.log_path = log_path
        self.serial_log = serial_log
        self.pid: int | None = None
        self.popen: subprocess.Popen | None = None
        self.qmp: QMPClient | None = None
        self.exited = asyncio.Event()
        self.returncode: int | None = None
        self.stopping = False
        self._pidfd: int | None = None
        # How this QEMU is ended when not by hostd's `quit` (a libvirt domain: libvirt destroys it).
        self.terminate: Callable[[], Awaitable[None]] | None = None
        # The guest disk's device ID (libvirt prefixes the IDs it is given with "ua-").
        self.disk_device = DISK_DEVICE

    # -- lifecycle -------------------------------------------------------
    async def start(self, timeout: float = 30.0, on_spawned: Callable[[int], None] | None = None) -> None:
        """Run QEMU and connect to QMP. on_spawned(pid) runs before the wait for
        QMP: the PID is on record before anything can stall (a hostd killed
        while it waits still finds and reaps this QEMU)."""
        log.debug("start %s: %s", self.name, " ".join(self.argv))
        with open(self.log_path, "ab") as logf:
            try:
                self.popen = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                    start_new_session=True, pass_fds=self.pass_fds,
                )
            except OSError as exc:
                raise QemuError(f"VM {self.name}: cannot run {self.argv[0]}: {exc}") from exc
        self.pid = self.popen.pid
        self._watch_exit()
        if on_spawned is not None:
            on_spawned(self.pid)
        await self._connect(timeout)

    @classmethod
    async def attach(cls, name: str, pid: int, qmp_path: str, log_path: str, serial_log: str,
                     timeout: float = 5.0, on_attached: Callable[["QemuProcess"], None] | None = None,
                     disk_device: str = DISK_DEVICE) -> "QemuProcess":
        """Take over a QEMU that is not our child (a previous hostd's, libvirt's).
        on_attached(proc) before the wait for QMP, as start()'s on_spawned."""
        proc = cls(name, [], qmp_path, log_path, serial_log)
        proc.pid = pid
        proc.disk_device = disk_device
        proc._watch_exit()
        if on_attached is not None:
            on_attached(proc)
        await proc._connect(timeout)
        return proc

    def _watch_exit(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            self._on_exit()
            return
        loop.add_reader(self._pidfd, self._on_exit)

    def _on_exit(self) -> None:
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self.popen is not None:
            self.returncode = self.popen.wait()
        self.exited.set()

    async def _connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.exited.is_set():
                raise QemuError(f"VM {self.name}: QEMU exited at start (code {self.returncode})"
                                f"{self.failure_report()}")
            if os.path.exists(self.qmp_path):
                qmp = QMPClient(self.name)
                # The default listener (which cannot be removed) would queue every
                # event forever; we listen only where we wait for something.
                qmp.events.event_filter = lambda _event: False
                try:
                    # A QEMU that accepts but never greets must not hold us past the deadline.
                    await asyncio.wait_for(qmp.connect(self.qmp_path), max(0.1, deadline - time.monotonic()))
                    self.qmp = qmp
                    return
                except (ConnectError, asyncio.TimeoutError):
                    with contextlib.suppress(Exception):
                        await qmp.disconnect()
            if time.monotonic() > deadline:
                raise QemuError(f"VM {self.name}: QMP socket did not come up in {timeout:.0f} s"
                                f"{self.failure_report()}")
            await asyncio.sleep(0.01)

    def failure_report(self) -> str:
        """QEMU's stderr and the serial console tail, for error messages."""
        parts = []
        err = tail(self.log_path)
        if err:
            parts.append(f"\n  QEMU stderr ({self.log_path}):\n    " + err.replace("\n", "\n    "))
        ser = tail(self.serial_log)
        if ser:
            parts.append(f"\n  serial console ({self.serial_log}):\n    " + ser.replace("\n", "\n    "))
        return "".join(parts)

    async def stop(self, timeout: float = 5.0) -> None:
        """Quit QEMU (QMP `quit`, then SIGTERM, then SIGKILL). Safe to call twice."""
        self.stopping = True
        if self.terminate is not None and not self.exited.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.terminate(), timeout + 5.0)
                await asyncio.wait_for(self.exited.wait(), timeout)
        if self.qmp is not None and not self.exited.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), 2.0)
        if self.pid is not None and not self.exited.is_set():
            for sig, wait in ((None, timeout), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
                if sig is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, sig)
                try:
                    await asyncio.wait_for(self.exited.wait(), wait)
                    break
                except asyncio.TimeoutError:
                    continue
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await self.qmp.disconnect()
            self.qmp = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.qmp_path)

    async def __aenter__(self) -> "QemuProcess":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- QMP -------------------------------------------------------------
    async def execute(self, cmd: str, args: dict | None = None, timeout: float = 60.0):
        if self.qmp is None or self.exited.is_set():
            raise QemuError(f"VM {self.name}: QEMU is not running{self.failure_report()}")
        try:
            return await asyncio.wait_for(self.qmp.execute(cmd, args), timeout)
        except ExecuteError as exc:
            raise QemuError(f"VM {self.name}: {cmd} failed: {exc.error_class}: {exc.error.error.desc}") from exc
        except asyncio.TimeoutError as exc:
            raise QemuError(f"VM {self.name}: {cmd} timed out after {timeout:.0f} s") from exc
        except Exception as exc:
            if self.exited.is_set():
                raise QemuError(f"VM {self.name}: QEMU died during {cmd}{self.failure_report()}") from exc
            raise QemuError(f"VM {self.name}: {cmd}: {exc}") from exc

    def listen(self, *names: str) -> EventListener:
        """An event listener; use as `with vm.listening(l):` around the command."""
        return EventListener(names)

    @contextlib.contextmanager
    def listening(self, listener: EventListener):
        assert self.qmp is not None
        with self.qmp.listen(listener):
            yield listener

    async def next_event(self, listener: EventListener, timeout: float) -> dict:
        """The next event, or QemuError if QEMU dies or nothing comes in time."""
        get = asyncio.ensure_future(listener.get())
        died = asyncio.ensure_future(self.exited.wait())
        done, _ = await asyncio.wait({get, died}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            died.cancel()
            return get.result()
        get.cancel()
        died.cancel()
        if died in done:
            raise QemuError(f"VM {self.name}: QEMU died{self.failure_report()}")
        raise QemuError(f"VM {self.name}: no event from QEMU in {timeout:.0f} s")

    async def wait_migration(self, listener: EventListener, want: set[str], timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QemuError(f"VM {self.name}: migration did not reach {sorted(want)} in {timeout:.0f} s")
            ev = await self.next_event(listener, left)
            status = ev["data"]["status"]
            if status in want:
                return status
            if status in ("failed", "cancelled"):
                info = await self.execute("query-migrate")
                desc = info.get("error-desc", "no reason given")
                raise QemuError(f"VM {self.name}: migration {status}: {desc}{self.failure_report()}")

    async def status(self) -> str:
        return (await self.execute("query-status"))["status"]


def is_our_qemu(pid: int, qmp_path: str) -> bool:
    """Guard against PID reuse: the process must be the QEMU with our QMP socket."""
    import psutil
    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return any(qmp_path in arg for arg in cmdline)
