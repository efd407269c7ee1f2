"""A pool's database: the service design's tables, a load history, events.

system_params(key, value), vmachine(id_vmachine, id_ip, cpu, ram, free_count,
last_connect) and ip_pool(id_ip, ip, port, reserve, last_reserve) keep the
names and meaning of the design; times are Unix milliseconds, since the
parameters that bound them are in milliseconds. Version 2 adds what the console
graphs (load_sample, pool_event) and what an operator reads in `pool status`
(pool_info; vmachine's name, state and start). One writer, the controller;
`pool set`, `pool status` and the console open it too (WAL, so readers never
block the writer).
"""
from __future__ import annotations

import time
from pathlib import Path

from ..state.sqlite import VersionedDb

from .latency import percentile
from .params import PARAMS, check_together

SCHEMA_V1 = """
CREATE TABLE system_params (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE ip_pool (id_ip INTEGER PRIMARY KEY, ip TEXT NOT NULL DEFAULT '', port INTEGER NOT NULL,
                      reserve INTEGER NOT NULL DEFAULT 0, last_reserve INTEGER);
CREATE TABLE vmachine (id_vmachine INTEGER PRIMARY KEY, id_ip INTEGER REFERENCES ip_pool(id_ip),
                       cpu REAL, ram INTEGER, free_count INTEGER NOT NULL DEFAULT 0, last_connect INTEGER)
"""
SCHEMA_V2 = """
ALTER TABLE vmachine ADD COLUMN name TEXT;
ALTER TABLE vmachine ADD COLUMN state TEXT NOT NULL DEFAULT 'serving';
ALTER TABLE vmachine ADD COLUMN started INTEGER;
CREATE UNIQUE INDEX vmachine_name ON vmachine(name);
CREATE TABLE pool_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE load_sample (id INTEGER PRIMARY KEY, at INTEGER NOT NULL, vm TEXT NOT NULL, cpu REAL, ram INTEGER);
CREATE INDEX load_sample_at ON load_sample(at);
CREATE TABLE pool_event (id INTEGER PRIMARY KEY, at INTEGER NOT NULL, kind TEXT NOT NULL, vm TEXT,
                         detail TEXT NOT NULL DEFAULT '', vm_count INTEGER NOT NULL)
"""
# Version 3: each request's response time (latency.py), for the pool's percentiles.
SCHEMA_V3 = """
CREATE TABLE request_time (at INTEGER NOT NULL, ms INTEGER NOT NULL, status INTEGER NOT NULL);
CREATE INDEX request_time_at ON request_time(at)
"""
# Samples older than this go (the console shows the last hour at most).
HISTORY_MS = 3600_000
# Request times are many: ten minutes of them (a controller looks at seconds).
REQUEST_HISTORY_MS = 600_000


def now_ms() -> int:
    return int(time.time() * 1000)


class PoolDb(VersionedDb):
    MIGRATIONS = (SCHEMA_V1, SCHEMA_V2, SCHEMA_V3)
    WHAT = "pool database"

    def __init__(self, path: Path | str):
        super().__init__(path, foreign_keys=True)
        self.db.execute("PRAGMA busy_timeout = 5000")
        self.db.row_factory = None

    # -- parameters -------------------------------------------------------
    def init_params(self, overrides: dict[str, float]) -> None:
        values = {name: p.default for name, p in PARAMS.items()} | overrides
        check_together(values)
        with self._transaction():
            for key, value in values.items():
                self.db.execute("INSERT OR IGNORE INTO system_params(key, value) VALUES (?, ?)", (key, str(value)))

    def params(self) -> dict[str, int | float]:
        rows = dict(self.db.execute("SELECT key, value FROM system_params"))
        return {name: p.parse(rows[name]) if name in rows else p.kind(p.default) for name, p in PARAMS.items()}

    def set_param(self, key: str, value: int | float) -> None:
        check_together(self.params() | {key: value})
        self.db.execute("INSERT INTO system_params(key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, str(value)))

    # -- pool_info ----------------------------------------------------------
    def set_info(self, **values: object) -> None:
        with self._transaction():
            for key, value in values.items():
                self.db.execute("INSERT INTO pool_info(key, value) VALUES (?, ?) "
                                "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, str(value)))

    def info(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM pool_info"))

    # -- ip_pool ----------------------------------------------------------------
    def size_ip_pool(self, slots: int, port: int) -> None:
        """One row per worker the pool may have: rows are added up to max_vm_count
        and unreserved rows above it dropped."""
        with self._transaction():
            have = self.db.execute("SELECT COUNT(*) FROM ip_pool").fetchone()[0]
            for id_ip in range(have + 1, slots + 1):
                self.db.execute("INSERT INTO ip_pool(id_ip, port) VALUES (?, ?)", (id_ip, port))
            self.db.execute("DELETE FROM ip_pool WHERE id_ip > ? AND reserve = 0 AND id_ip NOT IN "
                            "(SELECT id_ip FROM vmachine WHERE id_ip IS NOT NULL)", (slots,))

    def reserve_ip(self, limit: int) -> int | None:
        """The first free row at or below limit, reserved now; None if there is none."""
        with self._transaction():
            row = self.db.execute("SELECT id_ip FROM ip_pool WHERE reserve = 0 AND id_ip <= ? ORDER BY id_ip "
                                  "LIMIT 1", (limit,)).fetchone()
            if row is None:
                return None
            self.db.execute("UPDATE ip_pool SET reserve = 1, last_reserve = ? WHERE id_ip = ?", (now_ms(), row[0]))
            return row[0]

    def release_ip(self, id_ip: int) -> None:
        self.db.execute("UPDATE ip_pool SET reserve = 0, ip = '' WHERE id_ip = ?", (id_ip,))

    def stale_reservations(self, older_than_ms: int) -> list[int]:
        """Rows reserved longer than ip_reserve_ms that no vmachine row took."""
        return [r[0] for r in self.db.execute(
            "SELECT id_ip FROM ip_pool WHERE reserve = 1 AND last_reserve < ? AND id_ip NOT IN "
            "(SELECT id_ip FROM vmachine WHERE id_ip IS NOT NULL)", (now_ms() - older_than_ms,))]

    def is_reserved(self, id_ip: int) -> bool:
        row = self.db.execute("SELECT reserve FROM ip_pool WHERE id_ip = ?", (id_ip,)).fetchone()
        return bool(row and row[0])

    def ip_pool(self) -> list[dict]:
        return [dict(zip(("id_ip", "ip", "port", "reserve", "last_reserve"), r)) for r in
                self.db.execute("SELECT id_ip, ip, port, reserve, last_reserve FROM ip_pool ORDER BY id_ip")]

    # -- vmachine -----------------------------------------------------------------
    def add_vm(self, name: str, id_ip: int, ip: str) -> int:
        t = now_ms()
        with self._transaction():
            self.db.execute("UPDATE ip_pool SET ip = ? WHERE id_ip = ?", (ip, id_ip))
            cur = self.db.execute("INSERT INTO vmachine(id_ip, cpu, ram, free_count, last_connect, name, state, "
                                  "started) VALUES (?, 0, 0, 0, ?, ?, 'serving', ?)", (id_ip, t, name, t))
            return cur.lastrowid

    def report(self, name: str, cpu: float, ram: int, idle: bool, at: int) -> int:
        """A worker's load report; returns its free_count after it."""
        with self._transaction():
            self.db.execute("UPDATE vmachine SET cpu = ?, ram = ?, last_connect = ?, "
                            "free_count = CASE WHEN ? THEN free_count + 1 ELSE 0 END WHERE name = ?",
                            (cpu, ram, at, 1 if idle else 0, name))
            self.db.execute("INSERT INTO load_sample(at, vm, cpu, ram) VALUES (?, ?, ?, ?)", (at, name, cpu, ram))
            row = self.db.execute("SELECT free_count FROM vmachine WHERE name = ?", (name,)).fetchone()
        return row[0] if row else 0

    def set_vm_state(self, name: str, state: str) -> None:
        self.db.execute("UPDATE vmachine SET state = ? WHERE name = ?", (state, name))

    def remove_vm(self, name: str) -> None:
        with self._transaction():
            row = self.db.execute("SELECT id_ip FROM vmachine WHERE name = ?", (name,)).fetchone()
            self.db.execute("DELETE FROM vmachine WHERE name = ?", (name,))
            if row and row[0] is not None:
                self.db.execute("UPDATE ip_pool SET reserve = 0, ip = '' WHERE id_ip = ?", (row[0],))

    VM_FIELDS = ("id_vmachine", "id_ip", "cpu", "ram", "free_count", "last_connect", "name", "state", "started")

    def vms(self) -> list[dict]:
        rows = self.db.execute(f"SELECT v.{', v.'.join(self.VM_FIELDS)}, p.ip, p.port FROM vmachine v "
                               "LEFT JOIN ip_pool p ON p.id_ip = v.id_ip ORDER BY v.id_vmachine")
        return [dict(zip((*self.VM_FIELDS, "ip", "port"), r)) for r in rows]

    # -- history ------------------------------------------------------------------
    def event(self, kind: str, vm: str | None, detail: str = "") -> None:
        count = self.db.execute("SELECT COUNT(*) FROM vmachine WHERE state != 'starting'").fetchone()[0]
        self.db.execute("INSERT INTO pool_event(at, kind, vm, detail, vm_count) VALUES (?, ?, ?, ?, ?)",
                        (now_ms(), kind, vm, detail, count))

    def events(self, since_ms: int = 0) -> list[dict]:
        return [dict(zip(("id", "at", "kind", "vm", "detail", "vm_count"), r)) for r in self.db.execute(
            "SELECT id, at, kind, vm, detail, vm_count FROM pool_event WHERE at >= ? ORDER BY id", (since_ms,))]

    def samples(self, since_ms: int = 0) -> list[dict]:
        return [dict(zip(("id", "at", "vm", "cpu", "ram"), r)) for r in self.db.execute(
            "SELECT id, at, vm, cpu, ram FROM load_sample WHERE at >= ? ORDER BY id", (since_ms,))]

    def add_requests(self, rows: list[tuple[int, int, int]]) -> None:
        """(at ms, response ms, status) per request, as the request log read them."""
        if rows:
            with self._transaction():
                self.db.executemany("INSERT INTO request_time(at, ms, status) VALUES (?, ?, ?)", rows)

    def latency(self, since_ms: int, until_ms: int | None = None) -> dict:
        """Response times of the requests that ended in [since, until): count, errors (5xx), p50/p95/p99/max ms."""
        until_ms = now_ms() + 1 if until_ms is None else until_ms
        rows = self.db.execute("SELECT ms, status FROM request_time WHERE at >= ? AND at < ?",
                               (since_ms, until_ms)).fetchall()
        times = [ms for ms, _ in rows]
        return {"count": len(rows), "errors": sum(1 for _, st in rows if st >= 500 or st < 0),
                "p50_ms": percentile(times, 50), "p95_ms": percentile(times, 95),
                "p99_ms": percentile(times, 99), "max_ms": float(max(times)) if times else None}

    def trim_history(self) -> None:
        self.db.execute("DELETE FROM request_time WHERE at < ?", (now_ms() - REQUEST_HISTORY_MS,))
        cutoff = now_ms() - HISTORY_MS
        self.db.execute("DELETE FROM load_sample WHERE at < ?", (cutoff,))
        self.db.execute("DELETE FROM pool_event WHERE at < ?", (cutoff,))
