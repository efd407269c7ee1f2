"""The master's state in SQLite: which hosts exist and how full they are, and
which tickets hold clone slots where, so a restarted master neither forgets a
host nor hands out room it already promised.

Hosts register with their capacity and then heartbeat their usage; a host
silent for longer than the timeout is marked down (mark_stale) and the live
tickets with slots on it learn of it (fail_host_slots). A ticket is live while
granted, cloning or running; ended and failed ones stay for a while as history
and are pruned, so the file does not grow without bound.

The schema is versioned and migrated as hostd's own (hostd/state/sqlite.py).
"""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from sfmpi.errors import AlreadyExists, TicketError, UsageError

from ..state.sqlite import VersionedDb
from .placement import HostRoom

# Each entry takes the schema from version i to i + 1.
MIGRATIONS: tuple[str, ...] = (
    # 1: hosts, tickets and where each ticket's clones are.
    """
    CREATE TABLE IF NOT EXISTS hosts (name TEXT PRIMARY KEY, address TEXT NOT NULL,
                                      mem_mb INTEGER NOT NULL, vcpus INTEGER NOT NULL,
                                      used_mem_mb INTEGER NOT NULL DEFAULT 0,
                                      used_vcpus INTEGER NOT NULL DEFAULT 0,
                                      state TEXT NOT NULL, last_seen REAL NOT NULL,
                                      registered_at REAL NOT NULL);
    CREATE TABLE IF NOT EXISTS tickets (id TEXT PRIMARY KEY, family TEXT NOT NULL, parent_host TEXT NOT NULL,
                                        mem_mb INTEGER NOT NULL, cpus INTEGER NOT NULL, state TEXT NOT NULL,
                                        created_at REAL NOT NULL, finished_at REAL);
    CREATE TABLE IF NOT EXISTS ticket_slots (ticket TEXT NOT NULL REFERENCES tickets(id) ON DELETE CASCADE,
                                             host TEXT NOT NULL, count INTEGER NOT NULL,
                                             failed INTEGER NOT NULL DEFAULT 0,
                                             PRIMARY KEY (ticket, host));
    CREATE INDEX IF NOT EXISTS ticket_slots_by_host ON ticket_slots (host);
    CREATE INDEX IF NOT EXISTS tickets_by_family ON tickets (family, state);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)

TICKET_STATES = ("granted", "cloning", "running", "ended", "failed")
LIVE_STATES = ("granted", "cloning", "running")
# A running ticket's clones are in its hosts' heartbeat usage already; counting
# their reservation too would lose that room twice (see room()).
NOT_YET_RUNNING = ("granted", "cloning")


class MasterStore(VersionedDb):
    MIGRATIONS = MIGRATIONS
    WHAT = "master database"

    def __init__(self, path: Path | str):
        super().__init__(path, foreign_keys=True)  # slots go with their ticket

    # -- hosts -----------------------------------------------------------
    def register(self, name: str, address: str, mem_mb: int, vcpus: int, now: float) -> None:
        """A hostd (re)started: record its capacity and mark it up. Its usage
        stays as last heard until its first heartbeat; registered_at is this
        registration's time (the hostd's current run)."""
        if not name or not address:
            raise UsageError(f"a host registers with a name and an address, not {name!r} at {address!r}")
        for what, value in (("mem_mb", mem_mb), ("vcpus", vcpus)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"host {name}: {what} must be a whole number of at least 1, not {value!r}")
        self.db.execute(
            "INSERT INTO hosts (name, address, mem_mb, vcpus, state, last_seen, registered_at) "
            "VALUES (?, ?, ?, ?, 'up', ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET address = excluded.address, mem_mb = excluded.mem_mb, "
            "vcpus = excluded.vcpus, state = 'up', last_seen = excluded.last_seen, "
            "registered_at = excluded.registered_at",
            (name, address, mem_mb, vcpus, now, now))

    def heartbeat(self, name: str, used_mem_mb: int, used_vcpus: int, now: float) -> bool:
        """Record a host's usage; a down host that speaks again is up. False
        when the host is not registered (it must register first)."""
        cur = self.db.execute("UPDATE hosts SET used_mem_mb = ?, used_vcpus = ?, last_seen = ?, state = 'up' "
                              "WHERE name = ?", (used_mem_mb, used_vcpus, now, name))
        return cur.rowcount > 0

    def hosts(self) -> list[dict]:
        cur = self.db.execute("SELECT name, address, mem_mb, vcpus, used_mem_mb, used_vcpus, state, last_seen, "
                              "registered_at FROM hosts ORDER BY name")
        columns = [c[0] for c in cur.description]
        return [dict(zip(columns, row)) for row in cur.fetchall()]

    def mark_stale(self, now: float, timeout: float, heard_since: float = 0.0) -> list[str]:
        """Hosts up but silent since before now - timeout become down; their
        names. heard_since: when the master started listening (a host is not
        silent for the time nobody could hear it)."""
        if heard_since > now - timeout:
            return []
        with self._transaction():
            names = [r[0] for r in self.db.execute(
                "SELECT name FROM hosts WHERE state = 'up' AND last_seen < ? ORDER BY name", (now - timeout,))]
            self.db.executemany("UPDATE hosts SET state = 'down' WHERE name = ?", [(n,) for n in names])
        return names

    def mark_down(self, name: str) -> bool:
        """A host that said it is leaving; False if it was not up."""
        return self.db.execute("UPDATE hosts SET state = 'down' WHERE name = ? AND state = 'up'",
                               (name,)).rowcount > 0

    def remove(self, name: str) -> bool:
        """Forget a host (its tickets' slots stay: fail_host_slots first)."""
        return self.db.execute("DELETE FROM hosts WHERE name = ?", (name,)).rowcount > 0

    # -- tickets ---------------------------------------------------------
    def add_ticket(self, ticket_id: str, family: str, parent_host: str, mem_mb: int, cpus: int,
                   placement: dict[str, int], now: float) -> None:
        """A granted ticket and its slots (placement.place()'s answer), together."""
        if not placement or any(count < 1 for count in placement.values()):
            raise UsageError(f"ticket {ticket_id}: a placement gives each host at least one clone, not {placement}")
        try:
            with self._transaction():
                self.db.execute("INSERT INTO tickets (id, family, parent_host, mem_mb, cpus, state, created_at) "
                                "VALUES (?, ?, ?, ?, ?, 'granted', ?)",
                                (ticket_id, family, parent_host, mem_mb, cpus, now))
                self.db.executemany("INSERT INTO ticket_slots (ticket, host, count) VALUES (?, ?, ?)",
                                    [(ticket_id, host, count) for host, count in placement.items()])
        except sqlite3.IntegrityError:
            raise AlreadyExists(f"ticket {ticket_id} exists already") from None

    def ticket(self, ticket_id: str) -> dict | None:
        """The ticket with placement (host -> clones, in placement order) and
        failed (host -> how many of them failed)."""
        cur = self.db.execute("SELECT id, family, parent_host, mem_mb, cpus, state, created_at, finished_at "
                              "FROM tickets WHERE id = ?", (ticket_id,))
        row = cur.fetchone()
        if row is None:
            return None
        ticket = dict(zip([c[0] for c in cur.description], row))
        slots = self.db.execute("SELECT host, count, failed FROM ticket_slots WHERE ticket = ? ORDER BY rowid",
                                (ticket_id,)).fetchall()
        ticket["placement"] = {host: count for host, count, _ in slots}
        ticket["failed"] = {host: failed for host, _, failed in slots}
        return ticket

    def set_ticket_state(self, ticket_id: str, state: str, now: float | None = None) -> None:
        """Move a ticket on; ending or failing it stamps finished_at (now, or
        the clock), from which prune() counts."""
        if state not in TICKET_STATES:
            raise UsageError(f"unknown ticket state {state!r} (one of {', '.join(TICKET_STATES)})")
        finished = (time.time() if now is None else now) if state not in LIVE_STATES else None
        cur = self.db.execute("UPDATE tickets SET state = ?, finished_at = ? WHERE id = ?",
                              (state, finished, ticket_id))
        if cur.rowcount == 0:
            raise TicketError(f"unknown ticket {ticket_id}")

    def end_ticket(self, ticket_id: str, now: float | None = None) -> None:
        self.set_ticket_state(ticket_id, "ended", now)

    def fail_host_slots(self, host: str) -> list[str]:
        """A host went down: every clone of a live ticket on it counts as
        failed. Returns the tickets that had clones there not already failed
        (so a second call for the same outage reports nothing new)."""
        live = ",".join("?" * len(LIVE_STATES))
        with self._transaction():
            ids = [r[0] for r in self.db.execute(
                f"SELECT s.ticket FROM ticket_slots s JOIN tickets t ON t.id = s.ticket "
                f"WHERE s.host = ? AND s.failed < s.count AND t.state IN ({live}) ORDER BY s.ticket",
                (host, *LIVE_STATES))]
            self.db.executemany("UPDATE ticket_slots SET failed = count WHERE ticket = ? AND host = ?",
                                [(ticket_id, host) for ticket_id in ids])
        return ids

    def fail_tickets_of_down_hosts(self, now: float) -> list[str]:
        """Live tickets whose parent's host is down fail (no one will end them)."""
        live = ",".join("?" * len(LIVE_STATES))
        with self._transaction():
            ids = [r[0] for r in self.db.execute(
                f"SELECT t.id FROM tickets t JOIN hosts h ON h.name = t.parent_host "
                f"WHERE h.state = 'down' AND t.state IN ({live}) ORDER BY t.id", LIVE_STATES)]
            for ticket_id in ids:
                self.set_ticket_state(ticket_id, "failed", now)
        return ids

    def expire_granted(self, now: float, older_than: float) -> list[str]:
        """Tickets granted or cloning for longer than older_than fail: unused,
        or the word of what became of them was lost."""
        with self._transaction():
            ids = [r[0] for r in self.db.execute(
                "SELECT id FROM tickets WHERE state IN ('granted', 'cloning') AND created_at < ? ORDER BY id",
                (now - older_than,))]
            for ticket_id in ids:
                self.set_ticket_state(ticket_id, "failed", now)
        return ids

    def held_by_family(self, family: str) -> int:
        """Clones the family's live tickets hold, failed ones not counted (a
        failed clone holds no room)."""
        live = ",".join("?" * len(LIVE_STATES))
        return self.db.execute(
            f"SELECT COALESCE(SUM(s.count - s.failed), 0) FROM ticket_slots s JOIN tickets t ON t.id = s.ticket "
            f"WHERE t.family = ? AND t.state IN ({live})", (family, *LIVE_STATES)).fetchone()[0]

    def reserved_on(self, host: str) -> tuple[int, int]:
        """(mem_mb, vcpus) that live tickets hold on the host, failed clones not counted."""
        return self._reserved(host, LIVE_STATES)

    def _reserved(self, host: str, states: tuple[str, ...]) -> tuple[int, int]:
        marks = ",".join("?" * len(states))
        mem, cpus = self.db.execute(
            f"SELECT COALESCE(SUM((s.count - s.failed) * t.mem_mb), 0), "
            f"COALESCE(SUM((s.count - s.failed) * t.cpus), 0) FROM ticket_slots s JOIN tickets t ON t.id = s.ticket "
            f"WHERE s.host = ? AND t.state IN ({marks})", (host, *states)).fetchone()
        return mem, cpus

    def prune(self, now: float, keep_seconds: float) -> int:
        """Delete ended and failed tickets finished before now - keep_seconds
        (their slots go with them); how many went."""
        done = "state IN ('ended', 'failed') AND finished_at < ?"
        with self._transaction():
            # Slots first and by hand: the foreign-key cascade is only a backstop.
            self.db.execute(f"DELETE FROM ticket_slots WHERE ticket IN (SELECT id FROM tickets WHERE {done})",
                            (now - keep_seconds,))
            return self.db.execute(f"DELETE FROM tickets WHERE {done}", (now - keep_seconds,)).rowcount

    # -- placement input -------------------------------------------------
    def room(self, now: float, timeout: float, heard_since: float = 0.0) -> list[HostRoom]:
        """Every host's free room for placement.place(), by name.

        free = capacity - heartbeat usage - reservations of live tickets not
        yet running. The heartbeat counts the VMs a host runs; a granted or
        cloning ticket's clones are not there yet, so its reservation stands in
        for them. A host silent past the timeout is not up, even before
        mark_stale() writes it down, unless the master started listening
        (heard_since) less than the timeout ago. Between a ticket becoming running and the
        next heartbeat its clones are counted by neither: callers that set
        'running' only once the clones show in a heartbeat avoid that gap.
        """
        rooms = []
        for host in self.hosts():
            mem, cpus = self._reserved(host["name"], NOT_YET_RUNNING)
            up = host["state"] == "up" and max(host["last_seen"], heard_since) >= now - timeout
            rooms.append(HostRoom(name=host["name"],
                                  free_mem_mb=max(0, host["mem_mb"] - host["used_mem_mb"] - mem),
                                  free_vcpus=max(0, host["vcpus"] - host["used_vcpus"] - cpus),
                                  up=up))
        return rooms
