"""A pool's controller: one tick reads the balancer, the workers' reports and
the parameters, asks the rules (rules.py) what to do, and does it.

Starting a worker takes seconds (a clone) to minutes (a cold boot), so
launches run in a thread pool and land on a later tick; everything else in a
tick is quick, so dead workers are noticed and reports taken while a clone is
on its way. The database has one writer, this thread.
"""
from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from sfmpi.errors import SfmpiError

from .db import PoolDb, now_ms
from .haproxy import RuntimeApi
from .rules import Snapshot, Worker, decide
from .workers import Hostd, Started

log = logging.getLogger("sfmpi.pool.controller")


@dataclass
class Launch:
    future: Future
    id_ips: list[int]
    asked_ms: int
    queued_since_ms: int | None


class Controller:
    def __init__(self, db: PoolDb, balancer: RuntimeApi, workers, hostd: Hostd, port: int,
                 requests: Callable[[], list] = list):
        self.db, self.balancer, self.workers, self.hostd, self.port = db, balancer, workers, hostd, port
        self.requests = requests   # what the request log read since the last tick (latency.RequestLog.drain)
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pool-launch")
        self.launches: list[Launch] = []
        self.queued_since_ms: int | None = None
        self.seen_report: dict[str, float] = {}
        self.served_before: dict[str, int] = {}
        self.maxconn: int | None = None
        self.ticks = 0

    # -- one tick -------------------------------------------------------------
    def tick(self) -> None:
        params = self.db.params()
        self.db.size_ip_pool(params["max_vm_count"], self.port)
        stat = self.balancer.stat()
        queued = int(stat.get("BACKEND", {}).get("qcur") or 0)
        now = now_ms()
        if queued and self.queued_since_ms is None:
            self.queued_since_ms = now
        elif not queued:
            self.queued_since_ms = None
        self.db.add_requests(self.requests())
        self._land_launches(params)
        self._apply_maxconn(params)
        self._take_reports(params, stat, queued)
        for id_ip in self.db.stale_reservations(params["ip_reserve_ms"]):
            if not any(id_ip in launch.id_ips for launch in self.launches):
                self.db.release_ip(id_ip)
                self.db.event("release", None, f"ip_pool row {id_ip} reserved over ip_reserve_ms with no worker")
        workers = tuple(Worker(v["name"], v["state"], v["started"], v["last_connect"], v["free_count"],
                               int(stat.get(v["name"], {}).get("scur") or 0)) for v in self.db.vms())
        free = sum(1 for row in self.db.ip_pool() if not row["reserve"] and row["id_ip"] <= params["max_vm_count"])
        act = decide(Snapshot(now, params, workers, queued, sum(len(l.id_ips) for l in self.launches), free))
        for name in act.dead:
            self._remove(name, "dead", "no load report for over last_connect_ms")
        for name in act.ready:
            self.balancer.set_state(name, "ready")
            self.db.set_vm_state(name, "serving")
            self.db.event("serving", name, "put back in rotation: requests are waiting")
        for name in act.drain:
            self.balancer.set_state(name, "drain")
            self.db.set_vm_state(name, "draining")
            self.db.event("drain", name, f"idle for {params['free_count']} reports")
        for name in act.stop:
            self._remove(name, "scale-in", "drained")
        if act.start:
            self._launch(act.start, queued)
        self.ticks += 1
        if self.ticks % 240 == 0:
            self.db.trim_history()

    # -- starting workers ---------------------------------------------------------
    def _launch(self, count: int, queued: int) -> None:
        ids = [i for i in (self.db.reserve_ip(self.db.params()["max_vm_count"]) for _ in range(count)) if i]
        if not ids:
            return
        why = f"{queued} requests queued" if queued else "below min_vm_count"
        self.db.event("scale-out", None, f"starting {len(ids)} worker(s) by {self.workers.kind}: {why}")
        future = self.pool.submit(self.workers.launch, len(ids))
        self.launches.append(Launch(future, ids, now_ms(), self.queued_since_ms))

    def adopt(self, started: list[Started]) -> None:
        """The pool's first workers, started before the balancer was."""
        params = self.db.params()
        for worker in started:
            id_ip = self.db.reserve_ip(params["max_vm_count"])
            self._join(worker, id_ip, params, Launch(None, [], now_ms(), None))  # type: ignore[arg-type]

    def _land_launches(self, params: dict) -> None:
        for launch in [l for l in self.launches if l.future.done()]:
            self.launches.remove(launch)
            try:
                started: list[Started] = launch.future.result()
            except SfmpiError as exc:
                for id_ip in launch.id_ips:
                    self.db.release_ip(id_ip)
                self.db.event("error", None, f"starting workers failed: {exc}")
                log.error("starting workers failed: %s", exc)
                continue
            ids = list(launch.id_ips)
            for worker in started:
                id_ip = ids.pop(0) if ids else None
                if id_ip is None or not self.db.is_reserved(id_ip):
                    # Its reservation ran out (ip_reserve_ms) while it started.
                    self.pool.submit(self.workers.stop, worker.name)
                    self.db.event("release", worker.name, "started after its ip_pool reservation expired")
                    continue
                try:
                    self._join(worker, id_ip, params, launch)
                except SfmpiError as exc:
                    self.db.release_ip(id_ip)
                    self.pool.submit(self.workers.stop, worker.name)
                    self.db.event("error", worker.name, f"could not join the balancer: {exc}")
            for id_ip in ids:  # fewer granted than asked (the host's room)
                self.db.release_ip(id_ip)

    def _join(self, worker: Started, id_ip: int, params: dict, launch: Launch) -> None:
        self.hostd.call("vm.report_load", names=[worker.name], interval=params["report_ms"] / 1000.0)
        self.db.add_vm(worker.name, id_ip, worker.ip)
        self.balancer.add_server(worker.name, worker.ip, self.port, params["maxconn"])
        self.balancer.set_state(worker.name, "ready")
        t = now_ms()
        since = launch.queued_since_ms
        detail = (f"serving {(t - since) / 1000:.2f} s after the first queued request" if since
                  else f"serving {(t - launch.asked_ms) / 1000:.2f} s after it was asked for")
        self.db.event("serving", worker.name, detail)
        log.info("%s (%s) %s", worker.name, worker.ip, detail)

    def _apply_maxconn(self, params: dict) -> None:
        if self.maxconn is not None and params["maxconn"] != self.maxconn:
            for vm in self.db.vms():
                self.balancer.set_maxconn(vm["name"], params["maxconn"])
            self.db.event("param", None, f"maxconn {self.maxconn} -> {params['maxconn']}")
        self.maxconn = params["maxconn"]

    # -- reports ------------------------------------------------------------------
    def _take_reports(self, params: dict, stat: dict, queued: int) -> None:
        loads = self.hostd.call("vm.loads")
        for vm in self.db.vms():
            name, load = vm["name"], loads.get(vm["name"])
            if load is None or load["at"] <= self.seen_report.get(name, 0):
                continue
            self.seen_report[name] = load["at"]
            row = stat.get(name, {})
            served = int(row.get("stot") or 0)
            idle = (load["cpu"] < params["idle_cpu_percent"] and served == self.served_before.get(name, served)
                    and int(row.get("scur") or 0) == 0 and queued == 0)
            self.served_before[name] = served
            self.db.report(name, load["cpu"], load["ram"], idle, int(load["at"] * 1000))

    # -- stopping workers -----------------------------------------------------------
    def _remove(self, name: str, kind: str, why: str) -> None:
        """Out of the balancer (nothing in flight is cut for a drained one), then the VM."""
        for step in (lambda: self.balancer.set_state(name, "maint"), lambda: self.balancer.shutdown_sessions(name),
                     lambda: self.balancer.del_server(name)):
            try:
                step()
            except SfmpiError as exc:
                log.warning("%s: %s", name, exc)
        self.db.remove_vm(name)
        self.seen_report.pop(name, None)
        self.served_before.pop(name, None)
        self.db.event(kind, name, why)
        self.pool.submit(self.workers.stop, name)

    def shutdown(self) -> None:
        """Every worker out and stopped, launches in flight included."""
        for launch in self.launches:
            try:
                for worker in launch.future.result():
                    self.workers.stop(worker.name)
            except SfmpiError:
                pass
            for id_ip in launch.id_ips:
                self.db.release_ip(id_ip)
        self.launches.clear()
        for vm in self.db.vms():
            self._remove(vm["name"], "down", "the pool is going down")
        self.pool.shutdown(wait=True)
