"""Where a pool's workers come from: clones of its warm checkpoint, or (for
comparison, `pool up --workers boot`) VMs cold-booted from the image whose
service is started and probed like the first one's.

Both talk to hostd through the CLI's client only (a narrow interface: the pool
runs beside hostd, not inside it), and both are safe to call from worker
threads: the client opens one connection per call.
"""
from __future__ import annotations

import itertools
import logging
import shlex
from dataclasses import dataclass
from typing import Protocol

from sfmpi.errors import PoolError, SfmpiError

log = logging.getLogger("sfmpi.pool.workers")
SERVICE_LOG = "/var/log/sfmpi-service.log"


@dataclass(frozen=True)
class Started:
    name: str
    ip: str


class Hostd(Protocol):
    def call(self, op: str, on_output=None, **args): ...


def default_service(port: int) -> str:
    return f"python3 -m sfmpi.guest.service --port {port}"


def start_service_argv(command: str) -> list[str]:
    """Run the service detached in the guest, its output in SERVICE_LOG (pure)."""
    return ["setsid", "-f", "sh", "-c", f"exec {command} >{SERVICE_LOG} 2>&1 </dev/null"]


def probe_argv(port: int, timeout_s: float) -> list[str]:
    return ["python3", "-m", "sfmpi.guest.service", "--probe", str(port), "--timeout", f"{timeout_s:g}"]


def ip_of(hostd: Hostd, name: str) -> str:
    for vm in hostd.call("vm.list"):
        if vm["name"] == name:
            if not vm.get("ip"):
                raise PoolError(f"worker {name} has no address on its family network")
            return vm["ip"]
    raise PoolError(f"worker {name} is not in hostd's list")


def start_service(hostd: Hostd, name: str, command: str, port: int, timeout_s: float) -> None:
    """Start the service in VM `name` and wait until it answers on `port`."""
    out: list[bytes] = []
    code = hostd.call("vm.exec", name=name, argv=start_service_argv(command),
                      on_output=lambda fd, data: out.append(data))["code"]
    if code != 0:
        raise PoolError(f"the service did not start in {name} (exit {code}): {b''.join(out).decode()[-300:]}")
    out.clear()
    code = hostd.call("vm.exec", name=name, argv=probe_argv(port, timeout_s),
                      on_output=lambda fd, data: out.append(data))["code"]
    if code != 0:
        log_tail: list[bytes] = []
        hostd.call("vm.exec", name=name, argv=["tail", "-n", "5", SERVICE_LOG],
                   on_output=lambda fd, data: log_tail.append(data))
        raise PoolError(f"the service `{command}` in {name} never answered on port {port} within "
                        f"{timeout_s:g} s; its log says: {b''.join(log_tail).decode().strip()[-400:] or '(nothing)'}")


class CloneWorkers:
    """Workers cloned from the pool's warm checkpoint (the default)."""
    kind = "clone"

    def __init__(self, hostd: Hostd, checkpoint: str):
        self.hostd = hostd
        self.checkpoint = checkpoint

    def launch(self, count: int) -> list[Started]:
        res = self.hostd.call("clone", checkpoint=self.checkpoint, n=count, allow_fewer=True)
        names = list(res.get("clones", []))
        started = []
        for name in names:
            try:
                started.append(Started(name, ip_of(self.hostd, name)))
            except SfmpiError:
                self.stop(name)
                raise
        return started

    def stop(self, name: str) -> None:
        try:
            self.hostd.call("vm.stop", name=name)
        except SfmpiError as exc:  # gone already (it crashed, or `sfmpi down` ran): nothing to stop
            log.info("stopping worker %s: %s", name, exc)


class BootWorkers:
    """Workers cold-booted from the image, service started and probed: what a
    pool without fork does (the benchmark's baseline)."""
    kind = "boot"

    def __init__(self, hostd: Hostd, pool: str, image: str, service: str, port: int, mem_mb: int, cpus: int,
                 timeout_s: float = 300.0):
        self.hostd, self.pool, self.image = hostd, pool, image
        self.service, self.port, self.mem_mb, self.cpus, self.timeout_s = service, port, mem_mb, cpus, timeout_s
        self.serial = itertools.count(1)

    def _boot_one(self) -> Started:
        taken = {vm["name"] for vm in self.hostd.call("vm.list")}
        name = next(n for n in (f"{self.pool}-b{k}" for k in self.serial) if n not in taken)
        self.hostd.call("vm.start", name=name, image=self.image, mem_mb=self.mem_mb, cpus=self.cpus,
                        timeout=self.timeout_s)
        try:
            start_service(self.hostd, name, self.service, self.port, self.timeout_s)
            return Started(name, ip_of(self.hostd, name))
        except SfmpiError:
            self.stop(name)
            raise

    def launch(self, count: int) -> list[Started]:
        # One after another: two TCG boots at once on this kind of machine only
        # halve each other's speed, and a real pool boots one per request too.
        return [self._boot_one() for _ in range(count)]

    def stop(self, name: str) -> None:
        CloneWorkers.stop(self, name)  # type: ignore[arg-type]


def describe_command(command: str) -> str:
    return shlex.join(shlex.split(command))
