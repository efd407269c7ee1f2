"""hostd's statistics task: every interval, one reading of every live VM, kept
as history (hostd/monitor/history.py) and served as the latest samples to
`sfmpi stats vm`, the Prometheus port and the feedback controllers.

One tick: QMP query-blockstats per VM (and query-cpus-fast once per QEMU, for
its vCPU thread IDs), the taps' counters in hostd's namespace, then the /proc
readings and the database write in a worker thread so the event loop serves
requests meanwhile. A VM whose QMP does not answer within a second is sampled
without new disk counters this time rather than holding up the others.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable

from sfmpi.errors import QemuError, SfmpiError, UsageError

from ..net import netplan
from ..state.records import VmRole, VmState
from ..vm.registry import Vm, VmRegistry
from .devices import tap_counters, vcpu_threads
from .history import Sampler, StatsHistory, Target
from .procfs import blockstats_totals

log = logging.getLogger("sfmpi.hostd.stats")

DEFAULT_INTERVAL_S = 1.0
DEFAULT_MAX_AGE_S = 3600.0
QMP_TIMEOUT_S = 1.0


def interval_from_env() -> float:
    return _bounded_env("SFMPI_STATS_INTERVAL", DEFAULT_INTERVAL_S, 0.1, 3600.0)


def max_age_from_env() -> float:
    return _bounded_env("SFMPI_STATS_MAX_AGE", DEFAULT_MAX_AGE_S, 10.0, 90 * 86400.0)


def _bounded_env(name: str, default: float, low: float, high: float) -> float:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{name} must be a number of seconds (got {text!r})") from None
    if not low <= value <= high:
        raise UsageError(f"{name} must be {low:g}-{high:g} s (got {text})")
    return value


class StatsTask:
    """Lifecycle: created -> start() (running) -> stop(). Reads the registry, never changes it."""

    def __init__(self, vms: VmRegistry, netns: str, history: StatsHistory, interval: float = DEFAULT_INTERVAL_S,
                 clock: Callable[[], float] = time.time):
        self.vms, self.netns, self.history, self.interval = vms, netns, history, interval
        self.sampler = Sampler(clock)
        self.latest: dict[str, dict] = {}
        self._threads: dict[tuple[str, int], tuple[int, ...]] = {}
        self._task: asyncio.Task | None = None
        self.ticks = 0
        self.listeners: list[Callable[[list[dict]], None]] = []

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad reading must not end the statistics for good
                log.exception("statistics tick failed")
            next_at += self.interval
            delay = next_at - loop.time()
            if delay < 0:   # fell behind (a slow tick): skip, do not burst
                next_at, delay = loop.time(), 0.0
            await asyncio.sleep(delay)

    def _sampled(self) -> list[Vm]:
        return [vm for vm in self.vms.live.values()
                if vm.rec.pid and vm.rec.role != VmRole.RECEIVER
                and vm.rec.state in (VmState.RUNNING, VmState.PAUSED) and not vm.qemu.exited.is_set()]

    async def _disk_and_threads(self, vm: Vm) -> tuple[tuple[int, ...], dict]:
        key = (vm.name, vm.rec.pid)
        try:
            if key not in self._threads:
                self._threads[key] = vcpu_threads(await vm.qemu.execute("query-cpus-fast", timeout=QMP_TIMEOUT_S))
            disk = blockstats_totals(await vm.qemu.execute("query-blockstats", timeout=QMP_TIMEOUT_S))
        except (QemuError, SfmpiError):
            return self._threads.get(key, ()), {}
        return self._threads[key], disk

    async def tick(self) -> list[dict]:
        vms = self._sampled()
        found = await asyncio.gather(*(self._disk_and_threads(vm) for vm in vms))
        taps = {vm.name: netplan.tap_name(vm.rec.family_no, vm.rec.netid) for vm in vms if vm.rec.family_no}
        nets = await asyncio.to_thread(tap_counters, self.netns, list(taps.values())) if taps else {}
        targets = []
        for vm, (threads, disk) in zip(vms, found):
            counters = dict(disk)
            if not disk and vm.name in self.latest:   # QMP was busy: carry the last totals on
                counters.update({k: self.latest[vm.name][k] for k in ("disk_read_bytes", "disk_write_bytes")})
            counters.update(nets.get(taps.get(vm.name, ""), {}))
            targets.append(Target(vm.name, vm.rec.pid, threads, counters))
        samples = await asyncio.to_thread(self.sampler.sample, targets)
        self.history.add(samples)
        live = {vm.name for vm in vms}
        self.latest = {**{k: v for k, v in self.latest.items() if k in live}, **{s["vm"]: s for s in samples}}
        self._threads = {k: v for k, v in self._threads.items() if k[0] in live}
        self.ticks += 1
        for listener in self.listeners:
            listener(samples)
        return samples

    def latest_samples(self) -> list[dict]:
        return sorted(self.latest.values(), key=lambda s: s["vm"])
