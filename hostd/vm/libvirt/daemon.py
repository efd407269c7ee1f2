"""LibvirtDaemon: the one owner of a private libvirtd and its virtlogd.

Why private, and how (docs/platform.md, "libvirt 9.0"): a root libvirtd is
always the system instance, with its configuration in /etc/libvirt and its
state in /run, /var/lib, /var/log and /var/cache. This one runs in a mount
namespace of its own where directories of sfmpi's state directory are bound
over those five, so it shares nothing with a system libvirtd and leaves
nothing on the host, and in hostd's network namespace, so that the QEMUs it
starts open the families' taps there. Mounts hostd makes after libvirtd
started (memtap's FUSE files, for clones whose RAM is served) would not be
in that namespace: the directories they go in (`shared`) are made shared
mounts in hostd's namespace first and libvirtd's namespace a slave of
hostd's, so those mounts, and their unmounts, reach its QEMUs, while its
own binds stay inside. virsh reaches it by its socket:
`virsh -c URI` (see `uri`). Lifecycle: created -> start() (running: started,
or adopted from a hostd that exited and left it, with its domains) -> stop(),
safe twice; stop() ends only the two daemons of this root, by PID.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import socket
import subprocess
import time
from pathlib import Path

import psutil

from sfmpi import proc
from sfmpi.errors import CommandError, HostdError, UsageError

from ...mounts import mounted

# Where a root libvirtd keeps things: each gets a directory of ours bound over it.
SYSTEM_DIRS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
               "log": "/var/log/libvirt", "cache": "/var/cache/libvirt"}
# libvirtd resolves the QEMU user it was built with before it reads qemu.conf (docs/platform.md).
QEMU_USER = "libvirt-qemu"


def libvirtd_conf() -> str:
    """Only root reaches the socket (the directory is hostd's, mode 0700).
    hostd is one client that starts a request's clones at once: libvirtd's
    default of 5 requests in flight per client would queue them."""
    return ('unix_sock_group = "root"\nunix_sock_rw_perms = "0700"\nunix_sock_ro_perms = "0700"\n'
            'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            'max_client_requests = 64\nmax_workers = 64\nmin_workers = 16\n'
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n')


def qemu_conf() -> str:
    """QEMU as hostd runs it: as root, no relabelling, no private /dev (the
    families' taps and hostd's sockets must be reachable), no cgroups of
    libvirt's (sfmpi makes its own, and touches no others), and no seccomp
    sandbox, as under the direct driver: libvirt's `-sandbox spawn=deny`
    killed the checkpoint receiver with SIGSYS on a clone(2) at its incoming
    migration (measured, QEMU 7.2)."""
    return ('user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n'
            'security_driver = "none"\nnamespaces = [ ]\ncgroup_controllers = [ ]\nstdio_handler = "logd"\n'
            'seccomp_sandbox = 0\n')


def virtlogd_conf() -> str:
    return 'log_outputs = "3:file:/var/log/libvirt/virtlogd.log"\n'


def start_script(root: Path) -> str:
    """Run under `unshare --mount --propagation slave`: the binds, virtlogd, then libvirtd in this process."""
    binds = "".join(f"mount --bind {root / mine} {system}\n" for mine, system in SYSTEM_DIRS.items())
    return ("set -e\n" + binds +
            "virtlogd -d -f /etc/libvirt/virtlogd.conf -p /run/libvirt/virtlogd.pid\n"
            "exec libvirtd -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid\n")


def start_argv(root: Path, netns_path: str) -> list[str]:
    # slave: hostd's later mounts in its shared directories propagate in; none goes out.
    return ["unshare", "--mount", "--propagation", "slave", "nsenter", f"--net={netns_path}", "sh", "-c",
            start_script(root)]


def share_argvs(directory: Path) -> list[list[str]]:
    """Make `directory` a mount point of its own, shared with the namespaces made after."""
    return [["mount", "--bind", str(directory), str(directory)], ["mount", "--make-shared", str(directory)]]


class LibvirtDaemon:
    def __init__(self, root: Path, netns_path: str, shared: tuple[Path, ...] = ()):
        self.root = Path(root)
        self.netns_path = netns_path
        self.shared = tuple(Path(d) for d in shared)
        self.proc: subprocess.Popen | None = None   # when started by this process
        self.pid: int | None = None

    @property
    def socket(self) -> Path:
        return self.root / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def log(self) -> Path:
        return self.root / "log" / "libvirtd.log"

    def _prepare(self) -> None:
        try:
            pwd.getpwnam(QEMU_USER)
        except KeyError:
            raise UsageError(f"libvirtd needs the system user {QEMU_USER} (`make deps` makes it)") from None
        for mine, system in SYSTEM_DIRS.items():
            (self.root / mine).mkdir(parents=True, exist_ok=True, mode=0o700)
            # The mount points: libvirt's own directories (empty on a host without libvirt-daemon-system).
            Path(system).mkdir(parents=True, exist_ok=True)
        (self.root / "etc" / "libvirtd.conf").write_text(libvirtd_conf())
        (self.root / "etc" / "qemu.conf").write_text(qemu_conf())
        (self.root / "etc" / "virtlogd.conf").write_text(virtlogd_conf())
        for directory in self.shared:
            directory.mkdir(parents=True, exist_ok=True)
            try:
                for argv in share_argvs(directory)[1 if mounted(directory) else 0:]:
                    proc.run(argv, timeout=30)
            except CommandError as exc:
                self._unshare()
                raise HostdError(f"cannot share {directory} with libvirtd's QEMUs: "
                                 f"{exc.stderr.strip() or exc}") from None

    def _unshare(self) -> None:
        """Undo share_argvs once nothing of libvirtd's namespace holds them:
        lazily, so a mount below that a dead memtap left cannot keep the bind."""
        for directory in self.shared:
            if mounted(directory):
                proc.run(["umount", "-l", directory], check=False, timeout=30)

    def adopt(self) -> bool:
        """Take over the libvirtd of this root that a previous hostd left running."""
        pid = self._pid_of("libvirtd")
        if pid is None or not _is_ours(pid, "libvirtd", self.root) or not self._answers():
            return False
        self.pid = pid
        return True

    def start(self, timeout: float = 30.0) -> None:
        if self.alive() or self.adopt():
            return
        self._prepare()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        with open(self.root / "daemon.out", "ab") as out:
            self.proc = subprocess.Popen(start_argv(self.root, self.netns_path), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=out, start_new_session=True)
        # unshare, nsenter and sh each exec the next: the PID is libvirtd's.
        self.pid = self.proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                why = self._tail()
                self.stop()
                raise HostdError(f"libvirtd exited at start: {why}")
            if self._answers():
                return
            time.sleep(0.1)
        why = self._tail()
        self.stop()
        raise HostdError(f"libvirtd did not open {self.socket} within {timeout:g} s: {why}")

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self.socket))
            except OSError:
                return False
        return True

    def _tail(self, lines: int = 3) -> str:
        text = ""
        for path in (self.root / "daemon.out", self.log):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        wanted = [ln for ln in text.splitlines() if "error" in ln.lower()] or text.splitlines()
        return " | ".join(wanted[-lines:]) or "(no log)"

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and _is_ours(self.pid, "libvirtd", self.root)

    def _pid_of(self, daemon: str) -> int | None:
        try:
            return int((self.root / "run" / f"{daemon}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def virtlogd_pid(self) -> int | None:
        return self._pid_of("virtlogd")

    def stop(self, timeout: float = 10.0) -> None:
        """libvirtd first (domains it started keep running: the driver ends them before), then virtlogd."""
        proc, self.proc = self.proc, None
        pid, self.pid = self.pid, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        elif proc is None and pid is not None:   # adopted: not our child
            _end(pid, "libvirtd", self.root, timeout)
        virtlogd = self.virtlogd_pid()
        if virtlogd is not None:
            _end(virtlogd, "virtlogd", self.root, timeout)
        for daemon in ("libvirtd", "virtlogd"):
            with contextlib.suppress(FileNotFoundError):
                (self.root / "run" / f"{daemon}.pid").unlink()
        self._unshare()

    def __enter__(self) -> "LibvirtDaemon":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _end(pid: int, daemon: str, root: Path, timeout: float) -> None:
    """SIGTERM, then SIGKILL, and wait until it is gone (an exiting daemon
    loses its mount namespace before its PID: _is_ours no longer tells)."""
    if not _is_ours(pid, daemon, root):
        return
    try:
        proc = psutil.Process(pid)
        proc.terminate()
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
            proc.wait(timeout)
    except psutil.NoSuchProcess:
        pass


def _is_ours(pid: int, daemon: str, root: Path) -> bool:
    """The libvirtd or virtlogd of this root (a PID from a pid file may have been
    reused): a live `daemon` whose own /run/libvirt is our run directory (bound there)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        state = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("State:"))
        theirs, ours = os.stat(f"/proc/{pid}/root/run/libvirt"), os.stat(root / "run")
    except (OSError, StopIteration):
        return False
    return comm == daemon and "Z" not in state.split()[1] \
        and (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)
