"""The controller's rules (pure: a snapshot in, actions out; unit-tested).

The service design's rules, with its parameter names:
- a request finds no free worker (it waits in the balancer's queue) and
  ip_pool has a free row: start workers, as many as the queue needs at
  `maxconn` each, counting those already starting;
- a worker that reported idle `free_count` times in a row is drained (the
  balancer sends it nothing new, requests in flight finish), then stopped
  once it serves none; never below `min_vm_count`;
- a worker whose last report is older than `last_connect_ms` is dead: out of
  rotation, destroyed; the floor brings a replacement;
- (ip_reserve_ms is applied to the database: PoolDb.stale_reservations).
No flapping: a worker serves at least `hold_ms` before it may be retired,
nothing is retired while requests wait or workers start, and a start only ever
follows a queued request or a pool below its floor, never a timer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Worker:
    name: str
    state: str            # serving | draining
    started_ms: int
    last_connect_ms: int  # the time of its last load report (its start before the first)
    free_count: int
    in_flight: int        # the balancer's current sessions on it (scur)


@dataclass(frozen=True)
class Snapshot:
    now_ms: int
    params: dict
    workers: tuple[Worker, ...]
    queued: int           # requests waiting in the backend's queue (qcur)
    starting: int         # workers asked for and not yet serving
    free_ips: int         # unreserved ip_pool rows at or below max_vm_count


@dataclass
class Actions:
    start: int = 0
    ready: list[str] = field(default_factory=list)   # draining workers put back: cheaper than a clone
    drain: list[str] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)    # drained, nothing in flight
    dead: list[str] = field(default_factory=list)


def decide(s: Snapshot) -> Actions:
    p, act = s.params, Actions()
    alive = []
    for w in s.workers:
        if s.now_ms - w.last_connect_ms > p["last_connect_ms"]:
            act.dead.append(w.name)
        else:
            alive.append(w)
    serving = [w for w in alive if w.state == "serving"]
    draining = [w for w in alive if w.state == "draining"]

    # Demand: the queue at maxconn per worker, less what is already starting.
    need = math.ceil(s.queued / p["maxconn"]) - s.starting if s.queued > 0 else 0
    # A draining worker is put back before anything is cloned.
    for w in sorted(draining, key=lambda w: w.started_ms):
        if need <= 0:
            break
        act.ready.append(w.name)
        need -= 1
    floor_gap = p["min_vm_count"] - (len(serving) + len(act.ready) + s.starting)
    room = p["max_vm_count"] - (len(alive) + s.starting)
    act.start = max(0, min(max(need, floor_gap), room, s.free_ips))

    draining_left = [w for w in draining if w.name not in act.ready]
    act.stop = [w.name for w in draining_left if w.in_flight == 0]
    if s.queued == 0 and s.starting == 0 and act.start == 0:
        spare = len(serving) - p["min_vm_count"]
        idle = [w for w in serving if w.free_count >= p["free_count"] and s.now_ms - w.started_ms >= p["hold_ms"]]
        # The newest first: `balance first` fills the oldest, so the newest idle first.
        for w in sorted(idle, key=lambda w: w.started_ms, reverse=True)[:max(0, spare)]:
            act.drain.append(w.name)
    return act
