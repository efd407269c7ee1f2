"""The DHCP responder of a family: one dnsmasq per bridge, answering each VM's
MAC with the address of the plan (hostd/net/netplan.py), so a rebooted guest
gets the same address."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterable

import psutil

from sfmpi.errors import NetworkError

from . import netplan

log = logging.getLogger("sfmpi.hostd.dhcp")


def dnsmasq_argv(f: int, directory: Path) -> list[str]:
    files = DhcpServer.files(directory)
    return [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null",
        "--port=0",  # no DNS, DHCP only (and then it does not offer itself as DNS server)
        f"--interface={netplan.bridge_name(f)}", "--bind-interfaces", "--except-interface=lo",
        f"--dhcp-range={netplan.ip(f, 0)},static,255.255.255.0",
        f"--dhcp-hostsfile={files['hosts']}", f"--dhcp-leasefile={files['leases']}",
        f"--pid-file={files['pid']}", "--dhcp-authoritative", f"--log-facility={files['log']}",
        # It reads the hosts file (at start and on SIGHUP) after dropping to
        # nobody, who cannot enter root's state directory: stay root. It serves
        # DHCP only, bound to this one bridge.
        "--user=root",
    ]


def hosts_text(entries: Iterable[tuple[str, str, str]]) -> str:
    """dnsmasq --dhcp-hostsfile lines: mac,ip,hostname."""
    return "".join(f"{mac},{ip},{host}\n" for mac, ip, host in entries)


class DhcpServer:
    """The one dnsmasq of family f; start() / stop() (safe twice) / reload() / context manager."""

    def __init__(self, f: int, directory: Path):
        self.f = netplan.check_family(f)
        self.dir = Path(directory)
        self.popen: subprocess.Popen | None = None

    @staticmethod
    def files(directory: Path) -> dict[str, Path]:
        d = Path(directory)
        return {"hosts": d / "dhcp-hosts", "leases": d / "dhcp-leases",
                "pid": d / "dnsmasq.pid", "log": d / "dnsmasq.log"}

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen and self.popen.poll() is None else None

    def write_hosts(self, entries: Iterable[tuple[str, str, str]]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        hosts = self.files(self.dir)["hosts"]
        tmp = hosts.with_suffix(".tmp")
        tmp.write_text(hosts_text(entries))
        os.replace(tmp, hosts)  # dnsmasq never reads half a file

    def start(self, timeout: float = 5.0) -> None:
        if self.pid:
            return
        self.stop_leftover()
        files = self.files(self.dir)
        if not files["hosts"].exists():
            self.write_hosts([])
        files["pid"].unlink(missing_ok=True)
        argv = dnsmasq_argv(self.f, self.dir)
        log.debug("start: %s", " ".join(argv))
        with open(files["log"], "ab") as logf:  # its startup errors go to stderr
            try:
                self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                              stderr=logf, start_new_session=True)
            except OSError as exc:
                raise NetworkError(f"family {self.f}: cannot run dnsmasq: {exc}") from exc
        # Ready once it wrote its pid file: its sockets are bound by then.
        deadline = time.monotonic() + timeout
        while not self._pid_file_is(self.popen.pid):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise NetworkError(f"family {self.f}: dnsmasq did not start:\n"
                                   f"{_tail(files['log'])}")
            time.sleep(0.01)

    def _pid_file_is(self, pid: int) -> bool:
        try:
            return int(self.files(self.dir)["pid"].read_text().strip() or 0) == pid
        except (OSError, ValueError):
            return False

    def reload(self) -> None:
        """Re-read the hosts file (after write_hosts)."""
        if not self.pid:
            raise NetworkError(f"family {self.f}: dnsmasq is not running")
        os.kill(self.pid, signal.SIGHUP)

    def stop(self) -> None:
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.terminate()
                try:
                    self.popen.wait(5)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait()
            self.popen = None
        self.stop_leftover()

    def stop_leftover(self) -> None:
        """Stop a dnsmasq a previous process started for this directory, found
        by its pid file; only if that PID really is that dnsmasq."""
        files = self.files(self.dir)
        try:
            pid = int(files["pid"].read_text().strip())
        except (OSError, ValueError):
            return
        try:
            cmdline = psutil.Process(pid).cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            cmdline = []
        if cmdline and cmdline[0].endswith("dnsmasq") and f"--pid-file={files['pid']}" in cmdline:
            log.info("family %d: stopping leftover dnsmasq %d", self.f, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            if _running(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        files["pid"].unlink(missing_ok=True)

    def __enter__(self) -> "DhcpServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie is dead; its parent has yet to reap it)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""
