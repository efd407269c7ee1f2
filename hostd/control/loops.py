"""hostd's feedback controllers: `sfmpi control add|rm|list|log`.

A controller (a group, "default" unless named) has members of two classes:
- high: VMs with a quality-of-service target on a measure of their own
  statistics (cpu_percent: the CPU share they get, percent of one host core),
  or service pools (`pool:NAME`) with a target on their response time
  (p95_ms: the 95th percentile at the pool's balancer, lower is better);
- best-effort: VMs whose CPU limit the controller sets.

Every period it takes each high member's measurement over the period (a VM's
mean from the statistics history, a pool's p95 of the requests that ended in
it), feeds the member furthest short of its target (relative error) to a PI
controller (pi.py), and puts the output on every
best-effort member as a CPU limit above the user's own (resources.limit_cpu).
Each step is logged in stats.db (measurement, target, error, integral,
actuation), which `control log` prints and the console plots. Definitions are
kept there too, so a restarted hostd resumes its controllers (released first).
Lifecycle of a group: defined (no high or no best-effort member: idle) ->
running -> removed (its limits lifted).
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Protocol

from sfmpi.errors import NotFound, UsageError

from ..monitor.history import StatsHistory
from ..resources.applier import Resources
from ..vm.registry import VmRegistry
from .pi import PI, Gains

log = logging.getLogger("sfmpi.hostd.control")

@dataclass(frozen=True)
class Measure:
    of: str                 # "vm" or "pool": what a member with this target is
    higher_is_better: bool
    max_target: float
    text: str

    def shortfall(self, measured: float, target: float) -> float:
        """How far short of its target, relative to it (> 0: short)."""
        return (target - measured) / target if self.higher_is_better else (measured - target) / target

    def error(self, measured: float, target: float) -> float:
        """The PI controller's input, positive while short: a CPU share's in
        points of a core; a response time's in percent of its target, so that
        one set of gains suits targets of 50 ms and of 5 s alike."""
        return target - measured if self.higher_is_better else 100.0 * (measured - target) / target


MEASURES = {
    "cpu_percent": Measure("vm", True, 6400, "CPU the VM gets, percent of one host core (higher is better)"),
    "p95_ms": Measure("pool", False, 600_000, "a pool's 95th-percentile response time in ms (lower is better)"),
}
POOL_PREFIX = "pool:"
CLASSES = ("high", "best-effort")
DEFAULTS = {"period_s": 2.0, "kp": 0.5, "ki": 0.6, "min_limit": 5.0, "max_limit": 100.0}
BOUNDS = {"period_s": (0.5, 3600.0), "kp": (0.0, 100.0), "ki": (0.0, 100.0), "min_limit": (1.0, 6400.0),
          "max_limit": (1.0, 6400.0)}
_GROUP = re.compile(r"^[a-z][a-z0-9-]{0,31}$")


def parse_target(text: str) -> tuple[str, float]:
    """'cpu_percent=60' (or >=60), 'p95_ms=200' (or <=200) -> (measure, value)."""
    m = re.match(r"^\s*([a-z][a-z0-9_]*)\s*(?:>=|<=|=)\s*([0-9]+(?:\.[0-9]*)?)\s*$", str(text))
    if not m:
        raise UsageError(f"--target: {text!r} is not MEASURE=VALUE (e.g. cpu_percent=60 or p95_ms=200)")
    measure, value = m.group(1), float(m.group(2))
    if measure not in MEASURES:
        raise UsageError(f"--target: unknown measure {measure!r} (known: {', '.join(MEASURES)})")
    top = MEASURES[measure].max_target
    if not 0 < value <= top:
        raise UsageError(f"--target: {measure} must be above 0 and at most {top:g} (got {value:g})")
    return measure, value


def checked_params(given: dict, current: dict | None = None) -> dict:
    out = dict(current or DEFAULTS)
    for key, value in given.items():
        if key not in BOUNDS:
            raise UsageError(f"control: unknown parameter {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UsageError(f"control: {key} must be a number (got {value!r})")
        low, high = BOUNDS[key]
        if not low <= value <= high:
            raise UsageError(f"control: {key} must be {low:g}-{high:g} (got {value:g})")
        out[key] = float(value)
    if out["min_limit"] >= out["max_limit"]:
        raise UsageError(f"control: min_limit ({out['min_limit']:g}) must be below max_limit ({out['max_limit']:g})")
    return out


class PoolLatency(Protocol):
    """What a controller reads of the service pools (hostd/pool/status.py)."""
    def exists(self, name: str) -> bool: ...
    def p95_ms(self, name: str, since: float, until: float) -> float | None: ...


class NoPools:
    def exists(self, name: str) -> bool:
        return False

    def p95_ms(self, name: str, since: float, until: float) -> float | None:
        return None


class Group:
    def __init__(self, body: dict):
        self.body = body
        self.pi = PI(self.gains())
        self.task: asyncio.Task | None = None

    def gains(self) -> Gains:
        b = self.body
        return Gains(b["kp"], b["ki"], b["min_limit"], b["max_limit"])

    def members(self, cls: str) -> list[str]:
        return [vm for vm, m in self.body["members"].items() if m["class"] == cls]


class ControlLoops:
    def __init__(self, vms: VmRegistry, history: StatsHistory, resources: Resources, clock=time.time,
                 pools: PoolLatency = NoPools()):
        self.vms, self.history, self.resources, self.clock = vms, history, resources, clock
        self.pools = pools
        self.groups: dict[str, Group] = {}

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> None:
        for name, body in self.history.controls().items():
            self.groups[name] = Group(body)
            self._run(name)

    async def stop(self) -> None:
        for g in self.groups.values():
            await self._cancel(g)

    async def _cancel(self, g: Group) -> None:
        if g.task is not None:
            g.task.cancel()
            try:
                await g.task
            except asyncio.CancelledError:
                pass
            g.task = None

    async def clear(self) -> None:
        """`sfmpi down`: the VMs are gone, so are the controllers of them."""
        for name, g in list(self.groups.items()):
            await self._cancel(g)
            self._release(g)
            self.history.delete_control(name)
        self.groups.clear()

    def _run(self, name: str) -> None:
        g = self.groups[name]
        if g.task is None and g.members("high") and g.members("best-effort"):
            g.task = asyncio.ensure_future(self._loop(name))

    # -- operations ----------------------------------------------------------
    async def add(self, vm: str, cls: str, target: str | None, group: str = "default", params: dict | None = None) -> dict:
        if not _GROUP.match(str(group)):
            raise UsageError(f"control: bad group name {group!r} (lower-case letters, digits, '-'; up to 32)")
        if cls not in CLASSES:
            raise UsageError(f"control: --class is high or best-effort (got {cls!r})")
        if vm.startswith(POOL_PREFIX):
            if cls != "high":
                raise UsageError(f"control: a pool ({vm}) is a high-class member: its response time is held, "
                                 "best-effort VMs are limited for it")
            if not self.pools.exists(vm[len(POOL_PREFIX):]):
                raise NotFound(f"no pool named {vm[len(POOL_PREFIX):]!r} (see `sfmpi pool list`)")
        elif self.vms.record(vm) is None:
            raise NotFound(f"no VM named {vm} (see `sfmpi vm list`)")
        for other, g in self.groups.items():
            if other != group and vm in g.body["members"]:
                raise UsageError(f"control: VM {vm} is already in controller {other}")
        member: dict = {"class": cls}
        if cls == "high":
            if target is None:
                raise UsageError("control: a high-class member needs --target MEASURE=VALUE (e.g. cpu_percent=60)")
            member["measure"], member["target"] = parse_target(target)
            of = MEASURES[member["measure"]].of
            if (of == "pool") != vm.startswith(POOL_PREFIX):
                raise UsageError(f"control: {member['measure']} is a target for a "
                                 + ("pool (pool:NAME)" if of == "pool" else "VM") + f", not for {vm}")
        elif target is not None:
            raise UsageError("control: a best-effort member takes no --target (the controller limits it)")
        if cls == "best-effort":
            self.resources.check_host({"cpu_limit": 1})
        old = self.groups.get(group)
        body = {"name": group, "members": dict(old.body["members"]) if old else {},
                **checked_params(params or {}, {k: old.body[k] for k in DEFAULTS} if old else None)}
        body["members"][vm] = member
        if old is not None:
            await self._cancel(old)
            self._release(old)
        self.history.put_control(group, body)
        self.groups[group] = Group(body)
        self._run(group)
        return self.describe(group)

    async def remove(self, vm: str) -> dict:
        for name, g in self.groups.items():
            if vm in g.body["members"]:
                await self._cancel(g)
                self._release(g)
                del g.body["members"][vm]
                if g.body["members"]:
                    self.history.put_control(name, g.body)
                    self.groups[name] = Group(g.body)
                    self._run(name)
                else:
                    self.history.delete_control(name)
                    del self.groups[name]
                return {"removed": vm, "group": name}
        raise NotFound(f"VM {vm} is in no controller (see `sfmpi control list`)")

    def describe(self, name: str) -> dict:
        g = self.groups[name]
        last = self.history.steps(name, self.clock() - 10 * g.body["period_s"])
        return {**g.body, "running": g.task is not None, "last_step": last[-1] if last else None}

    def list(self) -> list[dict]:
        return [self.describe(name) for name in self.groups]

    def steps(self, name: str, since: float = 0.0) -> dict:
        if name not in self.groups:
            raise NotFound(f"no controller {name} (see `sfmpi control list`)")
        return {"name": name, **self.describe(name), "steps": self.history.steps(name, since)}

    # -- the loop --------------------------------------------------------------
    def _release(self, g: Group) -> None:
        for vm in g.members("best-effort"):
            self.resources.limit_cpu(vm, None)

    def _mean(self, vm: str, since: float) -> float | None:
        values = [s["cpu_percent"] for s in self.history.since(vm, since)]
        return sum(values) / len(values) if values else None

    def _measured(self, member: str, since: float, now: float) -> float | None:
        if member.startswith(POOL_PREFIX):
            # No request ended in the period (no load, or the pool went): nobody
            # waits, so the target is met and the limit unwinds, not held.
            p95 = self.pools.p95_ms(member[len(POOL_PREFIX):], since, now)
            return 0.0 if p95 is None else p95
        return self._mean(member, since)

    def step(self, name: str) -> dict:
        """One period of a group: measure, decide, actuate, log (a unit of the loop, tested alone)."""
        g = self.groups[name]
        now = self.clock()
        since = now - g.body["period_s"]
        worst = None
        for vm in g.members("high"):
            m = g.body["members"][vm]
            y = self._measured(vm, since, now)
            if y is None:
                continue
            measure = MEASURES[m["measure"]]
            shortfall = measure.shortfall(y, m["target"])
            if worst is None or shortfall > worst[0]:
                worst = (shortfall, y, m["target"], measure)
        used = [u for u in (self._mean(vm, since) for vm in g.members("best-effort")) if u is not None]
        target = worst[2] if worst else next(m["target"] for m in g.body["members"].values() if m["class"] == "high")
        st = g.pi.step(worst[1] if worst else None, target, max(used) if used else None,
                       error=worst[3].error(worst[1], worst[2]) if worst else None)
        released = st.actuation >= g.body["max_limit"]
        for vm in g.members("best-effort"):
            try:
                self.resources.limit_cpu(vm, None if released else st.actuation)
            except Exception as exc:  # a VM that went meanwhile; the others still get the limit
                log.warning("controller %s: cannot limit %s: %s", name, vm, exc)
        row = {"at": now, "control": name, "measurement": st.measurement, "target": st.target, "error": st.error,
               "integral": st.integral, "actuation": st.actuation, "note": st.note}
        self.history.add_step(row)
        return row

    async def _loop(self, name: str) -> None:
        period = self.groups[name].body["period_s"]
        loop = asyncio.get_running_loop()
        next_at = loop.time() + period
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += period
            try:
                self.step(name)
            except Exception:
                log.exception("controller %s: step failed", name)
