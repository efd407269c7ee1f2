"""The memory server's and memtap's processes, one owner class each.

Both are `python3 -m sfmpi.native.<daemon>` (the C extension sfmpi._native
does the work), started in a network namespace through `wrap` (nsenter --net
only: memtap's FUSE mount must be in the host's mount namespace, where QEMU
opens it). Each prints one line when it is ready; each is stopped by SIGTERM
(memtap then unmounts), SIGKILL after a grace, and a memtap mount left by a
killed memtap is detached (fusermount3 -u -z).

States: new -> running -> stopped | died (the process ended by itself).
"""
from __future__ import annotations

import contextlib
import enum
import logging
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sfmpi.errors import LazyMemoryError
from sfmpi.native import counters as native_counters

from ..mounts import mounted

log = logging.getLogger("sfmpi.hostd.memory")

START_TIMEOUT = 20.0
STOP_GRACE = 5.0
Wrap = Callable[[list[str]], list[str]]


class DaemonState(str, enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"
    DIED = "died"


def memserver_argv(listen: str, control: Path, counters: Path, multicast: bool = False) -> list[str]:
    """multicast: checkpoints' groups are sent from the listen address."""
    return [sys.executable, "-m", "sfmpi.native.memserver", "--listen", listen, "--port", "0",
            "--control", str(control), "--counters", str(counters)] + (["--multicast-from", listen] if multicast else [])


@dataclass(frozen=True)
class Multicast:
    """How a memtap takes part in its checkpoint's group."""
    group: str                 # "A.B.C.D:PORT"
    local: str                 # this host's address on the group's network
    wait_ms: int = 200


def memtap_argv(mount: Path, server: str, port: int, checkpoint: str, token_file: Path, page_map: Path,
                counters: Path, timeout_ms: int, read_ahead_kb: int, multicast: Multicast | None = None,
                push: bool = False, working_set: Path | None = None) -> list[str]:
    argv = [sys.executable, "-m", "sfmpi.native.memtap", "--mount", str(mount), "--server", f"{server}:{port}",
            "--checkpoint", checkpoint, "--token-file", str(token_file), "--page-map", str(page_map),
            "--counters", str(counters), "--timeout-ms", str(timeout_ms), "--read-ahead-kb", str(read_ahead_kb)]
    if multicast is not None:
        argv += ["--group", multicast.group, "--multicast-local", multicast.local,
                 "--multicast-wait-ms", str(multicast.wait_ms)]
    return argv + (["--push"] if push else []) + (["--working-set", str(working_set)] if working_set else [])


def tail(path: Path, lines: int = 3) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


class _Daemon:
    """What both owners share: start until the ready line, stop, state."""
    what = "daemon"

    def __init__(self, directory: Path, wrap: Wrap):
        self.dir = Path(directory)
        self.wrap = wrap
        self.popen: subprocess.Popen | None = None
        self.state = DaemonState.NEW
        self.log_path = self.dir / f"{self.what}.log"
        self.counters_path = self.dir / f"{self.what}.counters"

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        if self.popen is not None and self.state == DaemonState.RUNNING and self.popen.poll() is not None:
            self.state = DaemonState.DIED
            log.warning("%s %d died (%s): %s", self.what, self.popen.pid, self.popen.returncode, tail(self.log_path))
        return self.state == DaemonState.RUNNING

    def _start(self, argv: list[str]) -> str:
        """Run argv; its first stdout line (the ready line)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as logf:   # this run only: why_failed reads its last line
            try:
                self.popen = subprocess.Popen(self.wrap(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                              stderr=logf, start_new_session=True)
            except OSError as exc:
                raise LazyMemoryError(f"cannot run the {self.what}: {exc}") from exc
        assert self.popen.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.popen.stdout], [], [], max(0.0, left))
            chunk = os.read(self.popen.stdout.fileno(), 256) if ready else b""
            if not chunk:
                self.popen.poll()
                why = tail(self.log_path) or (f"no ready line within {START_TIMEOUT:.0f} s" if left <= 0
                                              else f"exited with {self.popen.returncode}")
                self.stop()
                raise LazyMemoryError(f"the {self.what} did not start: {why}")
            line += chunk
        self.state = DaemonState.RUNNING
        return line.decode(errors="replace").strip()

    def stop(self) -> None:
        """SIGTERM, SIGKILL after a grace. Safe twice."""
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.terminate()
                try:
                    self.popen.wait(STOP_GRACE)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait()
            if self.popen.stdout is not None:
                self.popen.stdout.close()
        if self.state in (DaemonState.NEW, DaemonState.RUNNING):
            self.state = DaemonState.STOPPED
        self._after_stop()

    def _after_stop(self) -> None:
        pass

    def counters(self) -> list[native_counters.CounterSlot]:
        return native_counters.read(self.counters_path) if self.counters_path.exists() else []


class MemoryServer(_Daemon):
    """The memory server of this host: start(listen address) / add / remove / stop."""
    what = "memserver"

    def __init__(self, directory: Path, wrap: Wrap):
        super().__init__(directory, wrap)
        self.control = self.dir / "memserver.sock"
        self.address = ""
        self.port = 0

    def start(self, listen: str, multicast: bool = False) -> None:
        line = self._start(memserver_argv(listen, self.control, self.counters_path, multicast))
        word, _, port = line.partition(" ")
        if word != "listening" or not port.isdigit():
            self.stop()
            raise LazyMemoryError(f"the memory server said {line!r}, not where it listens")
        self.address, self.port = listen, int(port)
        log.info("memory server %d listens on %s:%d", self.pid, listen, self.port)

    def _command(self, line: str) -> str:
        if not self.alive():
            raise LazyMemoryError(f"the memory server is not running: {tail(self.log_path) or self.state.value}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10.0)
            try:
                s.connect(str(self.control))
                s.sendall(line.encode() + b"\n")
                answer = s.makefile("rb").readline().decode(errors="replace").strip()
            except OSError as exc:
                raise LazyMemoryError(f"the memory server's control socket: {exc}") from exc
        if not answer.startswith("ok"):
            raise LazyMemoryError(f"the memory server refused {line.split()[0]}: {answer or 'no answer'}")
        return answer[2:].strip()

    def add(self, checkpoint: str, token: str, ram: Path, page_map: Path, group: str | None = None) -> int:
        """Serve a checkpoint's RAM file (to a multicast group too): its size in bytes."""
        for p in (ram, page_map):
            if any(c.isspace() for c in str(p)):
                raise LazyMemoryError(f"the memory server takes no path with spaces: {p}")
        return int(self._command(f"add {checkpoint} {token} {ram} {page_map}" + (f" {group}" if group else "")))

    def save_working_set(self, checkpoint: str, path: Path) -> int:
        """The order in which the checkpoint's ranges were first asked for, to path: its entries."""
        if any(c.isspace() for c in str(path)):
            raise LazyMemoryError(f"the memory server takes no path with spaces: {path}")
        return int(self._command(f"workingset {checkpoint} {path}"))

    def remove(self, checkpoint: str) -> None:
        self._command(f"remove {checkpoint}")

    def _after_stop(self) -> None:
        self.control.unlink(missing_ok=True)


def detach(mount: Path) -> None:
    """Lazily unmount what a killed memtap left ("transport endpoint is not connected")."""
    if mounted(mount):
        subprocess.run(["fusermount3", "-u", "-z", str(mount)], capture_output=True, timeout=30)


class Memtap(_Daemon):
    """One remote checkpoint's RAM as the file `<dir>/mnt/ram`: start / alive / why / stop."""
    what = "memtap"

    def __init__(self, directory: Path, wrap: Wrap, checkpoint: str):
        super().__init__(directory, wrap)
        self.checkpoint = checkpoint
        self.mount = self.dir / "mnt"
        self.ram = self.mount / "ram"
        self.token_file = self.dir / "token"

    def start(self, server: str, port: int, token: str, page_map: Path, timeout_ms: int = 10000,
              read_ahead_kb: int = 0, multicast: Multicast | None = None, push: bool = False,
              working_set: Path | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        detach(self.mount)
        self.mount.mkdir(exist_ok=True)
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        line = self._start(memtap_argv(self.mount, server, port, self.checkpoint, self.token_file, page_map,
                                       self.counters_path, timeout_ms, read_ahead_kb, multicast, push,
                                       working_set))
        if line != "ready" or not self.ram.exists():
            self.stop()
            raise LazyMemoryError(f"memtap for checkpoint {self.checkpoint} said {line!r}, not ready")
        log.info("memtap %d serves checkpoint %s from %s:%d at %s", self.pid, self.checkpoint, server, port,
                 self.ram)

    def why_failed(self) -> str:
        """What memtap last said went wrong (fetch failures, its death), or ''."""
        dead = not self.alive() and self.state == DaemonState.DIED
        said = tail(self.log_path, 1)
        if dead:
            return f"memtap for checkpoint {self.checkpoint} died" + (f": {said}" if said else "")
        return said

    def _after_stop(self) -> None:
        detach(self.mount)                    # a killed memtap leaves its mount
        with contextlib.suppress(OSError):
            self.mount.rmdir()
        self.token_file.unlink(missing_ok=True)
