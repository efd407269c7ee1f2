"""Per-VM statistics over time: a sampler that turns cumulative readings into
rates, and their history in SQLite ($SFMPI_HOME/stats.db), bounded by age.
The same database keeps the feedback controllers (hostd/control/) and every
step they took, so the console can plot measurement, target and actuation.

A sample's fields are what `sfmpi stats vm NAME --json` will print:
cpu_percent (of one host core, the whole QEMU process), vcpu_percent (per vCPU
thread), mem_pss_bytes, and the cumulative disk_read_bytes, disk_write_bytes,
net_rx_bytes, net_tx_bytes.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..state.sqlite import VersionedDb
from .procfs import ProcessSample, cpu_percent, read_process

SCHEMA_V1 = """
CREATE TABLE vm_sample (id INTEGER PRIMARY KEY, at REAL NOT NULL, vm TEXT NOT NULL, cpu_percent REAL NOT NULL,
                        vcpu_percent TEXT NOT NULL, mem_pss_bytes INTEGER NOT NULL,
                        disk_read_bytes INTEGER NOT NULL, disk_write_bytes INTEGER NOT NULL,
                        net_rx_bytes INTEGER NOT NULL, net_tx_bytes INTEGER NOT NULL);
CREATE INDEX vm_sample_vm_at ON vm_sample(vm, at)
"""
# v2: feedback controllers. `control` holds each one's definition (JSON, see
# hostd/control/spec.py); `control_step` every period's measurement, error,
# integral and the actuation applied to the best-effort class.
SCHEMA_V2 = """
CREATE TABLE control (name TEXT PRIMARY KEY, body TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE control_step (id INTEGER PRIMARY KEY, at REAL NOT NULL, control TEXT NOT NULL,
                           measurement REAL, target REAL NOT NULL, error REAL, integral REAL NOT NULL,
                           actuation REAL NOT NULL, note TEXT NOT NULL DEFAULT '');
CREATE INDEX control_step_at ON control_step(control, at)
"""
# v3: the age trim each tick (DELETE ... WHERE at < cutoff) found its rows by
# a scan of the whole table: an hour of 16 VMs is 57,600 rows a second. By time alone, an index finds them.
SCHEMA_V3 = """
CREATE INDEX vm_sample_time ON vm_sample(at);
CREATE INDEX control_step_time ON control_step(at)
"""
STEP_FIELDS = ("at", "control", "measurement", "target", "error", "integral", "actuation", "note")
FIELDS = ("at", "vm", "cpu_percent", "vcpu_percent", "mem_pss_bytes", "disk_read_bytes", "disk_write_bytes",
          "net_rx_bytes", "net_tx_bytes")


@dataclass(frozen=True)
class Target:
    """One VM to sample: its QEMU, its vCPU threads, and the counters hostd read
    elsewhere (QMP query-blockstats, the tap's statistics)."""
    vm: str
    pid: int
    vcpu_threads: tuple[int, ...] = ()
    counters: dict = field(default_factory=dict)


# PSS is read every this many seconds, and the last value carried in between:
# reading it costs the kernel a walk of every mapping (procfs.read_process), a
# hundred times the rest of a sample, and a VM's memory changes slowly
# (vSphere's real-time charts sample every 20 s).
PSS_EVERY_S = 10.0


class Sampler:
    """Rates need two readings: the first reading of a VM gives no sample."""

    def __init__(self, clock=time.time, pss_every_s: float = PSS_EVERY_S):
        self.clock = clock
        self.pss_every_s = pss_every_s
        self.last: dict[str, tuple[float, int, ProcessSample]] = {}
        self._pss: dict[str, tuple[float, int, int]] = {}   # vm -> (when, pid, bytes)

    def sample(self, targets: list[Target]) -> list[dict]:
        out, seen = [], set()
        for t in targets:
            now = self.clock()
            known = self._pss.get(t.vm)
            fresh = known is None or known[1] != t.pid or now - known[0] >= self.pss_every_s
            try:
                reading = read_process(t.pid, list(t.vcpu_threads), with_pss=fresh)
            except OSError:  # the VM ended between listing and reading
                continue
            if fresh:
                self._pss[t.vm] = (now, t.pid, reading.pss_bytes)
            seen.add(t.vm)
            prev = self.last.get(t.vm)
            self.last[t.vm] = (now, t.pid, reading)
            if prev is None or prev[1] != t.pid:
                continue
            dt = now - prev[0]
            out.append({
                "at": now, "vm": t.vm, "cpu_percent": round(cpu_percent(prev[2].ticks, reading.ticks, dt), 2),
                "vcpu_percent": [round(cpu_percent(prev[2].thread_ticks.get(tid, ticks), ticks, dt), 2)
                                 for tid, ticks in reading.thread_ticks.items()],
                "mem_pss_bytes": self._pss[t.vm][2],
                **{k: int(t.counters.get(k, 0)) for k in FIELDS[5:]},
            })
        for gone in set(self.last) - seen:
            del self.last[gone]
            self._pss.pop(gone, None)
        return out


class StatsHistory(VersionedDb):
    MIGRATIONS = (SCHEMA_V1, SCHEMA_V2, SCHEMA_V3)
    WHAT = "statistics database"

    def __init__(self, path: Path | str, max_age_s: float = 3600.0):
        super().__init__(path)
        # A write every second: in WAL mode NORMAL syncs at checkpoints, not at
        # each commit, and stays consistent; a power cut may lose the last
        # seconds of samples, which is all it risks.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.max_age_s = max_age_s

    def add(self, samples: list[dict]) -> None:
        with self._transaction():
            for s in samples:
                self.db.execute(f"INSERT INTO vm_sample({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))})",
                                tuple(json.dumps(s[k]) if k == "vcpu_percent" else s[k] for k in FIELDS))
            cutoff = time.time() - self.max_age_s
            self.db.execute("DELETE FROM vm_sample WHERE at < ?", (cutoff,))
            # A controller's log is read as a whole step response: kept at least a day.
            self.db.execute("DELETE FROM control_step WHERE at < ?", (min(cutoff, time.time() - 86400.0),))

    def since(self, vm: str, t: float = 0.0) -> list[dict]:
        rows = self.db.execute(f"SELECT {', '.join(FIELDS)} FROM vm_sample WHERE vm = ? AND at >= ? ORDER BY at",
                               (vm, t))
        return [{k: json.loads(v) if k == "vcpu_percent" else v for k, v in zip(FIELDS, row)} for row in rows]

    def latest(self, vm: str) -> dict | None:
        rows = self.since_last(vm, 1)
        return rows[0] if rows else None

    def since_last(self, vm: str, count: int) -> list[dict]:
        rows = self.db.execute(f"SELECT {', '.join(FIELDS)} FROM vm_sample WHERE vm = ? ORDER BY at DESC LIMIT ?",
                               (vm, count)).fetchall()
        return [{k: json.loads(v) if k == "vcpu_percent" else v for k, v in zip(FIELDS, row)} for row in rows[::-1]]

    # -- feedback controllers (hostd/control/) ---------------------------
    def put_control(self, name: str, body: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO control (name, body, created) VALUES (?, ?, ?)",
                        (name, json.dumps(body), time.time()))

    def controls(self) -> dict[str, dict]:
        return {r[0]: json.loads(r[1]) for r in self.db.execute("SELECT name, body FROM control ORDER BY created")}

    def delete_control(self, name: str) -> None:
        with self._transaction():
            self.db.execute("DELETE FROM control WHERE name = ?", (name,))
            self.db.execute("DELETE FROM control_step WHERE control = ?", (name,))

    def add_step(self, step: dict) -> None:
        self.db.execute(f"INSERT INTO control_step({', '.join(STEP_FIELDS)}) VALUES "
                        f"({', '.join('?' * len(STEP_FIELDS))})", tuple(step.get(k, "") if k == "note" else step[k]
                                                                  for k in STEP_FIELDS))

    def steps(self, control: str, t: float = 0.0) -> list[dict]:
        rows = self.db.execute(f"SELECT {', '.join(STEP_FIELDS)} FROM control_step WHERE control = ? AND at >= ? "
                               "ORDER BY at", (control, t))
        return [dict(zip(STEP_FIELDS, row)) for row in rows]
