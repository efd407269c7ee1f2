"""hostd's state in SQLite, so a restarted hostd finds its VMs again or reaps them.

One row per VM that hostd started and has not yet cleaned up, and one per
clone API ticket still in play (granted, or used and not yet joined), so that
a restarted hostd can still join the clones of a ticket. Checkpoints live
on disk as directories with a manifest (they outlive hostd and `sfmpi down`);
the table indexes them and says who holds each (hostd/fork/retention.py). A
family's network options (hostd/net/families.py) outlive the family, like its
checkpoints: a clone of one re-makes the family with them; the next parent of
that name replaces them.

The schema has a version (SQLite's user_version). Opening a database runs the
migrations it lacks, in order, each in one transaction; a database newer than
this code is refused rather than misread. VM rows are JSON whose newer fields
have defaults.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from .records import VmRecord, VmRole, VmState
from .sqlite import VersionedDb

# Each entry takes the schema from version i to i + 1.
MIGRATIONS: tuple[str, ...] = (
    # 1: the tables of the one-host core.
    """
    CREATE TABLE IF NOT EXISTS vms (name TEXT PRIMARY KEY, body TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS checkpoints (id TEXT PRIMARY KEY, vm TEXT NOT NULL, path TEXT NOT NULL,
                                            created REAL NOT NULL);
    CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    CREATE TABLE IF NOT EXISTS families (name TEXT PRIMARY KEY, options TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS tickets (id TEXT PRIMARY KEY, body TEXT NOT NULL);
    """,
    # 2: checkpoint lifecycle: whose it is, and what holds it.
    """
    ALTER TABLE checkpoints ADD COLUMN family TEXT NOT NULL DEFAULT '';
    ALTER TABLE checkpoints ADD COLUMN ticket TEXT NOT NULL DEFAULT '';
    ALTER TABLE checkpoints ADD COLUMN kept INTEGER NOT NULL DEFAULT 1;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class Store(VersionedDb):
    MIGRATIONS = MIGRATIONS
    WHAT = "state database"

    def __init__(self, path: Path):
        super().__init__(path)

    def _found_version(self) -> int:
        version = self.version
        if version == 0 and self.db.execute(
                "SELECT 1 FROM sqlite_master WHERE name = 'vms'").fetchone() is not None:
            version = 1  # a database from before versions: the tables of migration 1
        return version

    # -- VMs (hostd/vm/registry.py is the only writer) -------------------
    def put_vm(self, rec: VmRecord) -> None:
        body = asdict(rec)
        body["role"] = rec.role.value
        body["state"] = rec.state.value
        self.db.execute("INSERT OR REPLACE INTO vms (name, body) VALUES (?, ?)",
                        (rec.name, json.dumps(body)))

    def get_vm(self, name: str) -> VmRecord | None:
        row = self.db.execute("SELECT body FROM vms WHERE name = ?", (name,)).fetchone()
        return _vm(row[0]) if row else None

    def vms(self) -> list[VmRecord]:
        rows = self.db.execute("SELECT body FROM vms").fetchall()
        return sorted((_vm(r[0]) for r in rows), key=lambda r: (r.created, r.name))

    def delete_vm(self, name: str) -> None:
        self.db.execute("DELETE FROM vms WHERE name = ?", (name,))

    # -- checkpoints -----------------------------------------------------
    def add_checkpoint(self, ckpt_id: str, vm: str, path: str, family: str = "", ticket: str = "",
                       kept: bool = True) -> None:
        """ticket: the clone ticket it was taken for, freed with it unless kept."""
        self.db.execute("INSERT OR REPLACE INTO checkpoints (id, vm, path, created, family, ticket, kept) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (ckpt_id, vm, path, time.time(), family, ticket, int(kept)))

    def checkpoint_path(self, ckpt_id: str) -> str | None:
        row = self.db.execute("SELECT path FROM checkpoints WHERE id = ?", (ckpt_id,)).fetchone()
        return row[0] if row else None

    def checkpoint_rows(self) -> list[dict]:
        rows = self.db.execute("SELECT id, vm, path, created, family, ticket, kept FROM checkpoints "
                               "ORDER BY created, rowid").fetchall()
        return [dict(id=r[0], vm=r[1], path=r[2], created=r[3], family=r[4], ticket=r[5], kept=bool(r[6]))
                for r in rows]

    def delete_checkpoint(self, ckpt_id: str) -> None:
        self.db.execute("DELETE FROM checkpoints WHERE id = ?", (ckpt_id,))

    # -- family network options ------------------------------------------
    def put_family_options(self, family: str, options: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO families (name, options) VALUES (?, ?)",
                        (family, json.dumps(options)))

    def family_options(self, family: str) -> dict | None:
        row = self.db.execute("SELECT options FROM families WHERE name = ?", (family,)).fetchone()
        return json.loads(row[0]) if row else None

    # -- clone API tickets (hostd/guestapi/tickets.py) -------------------
    def put_ticket(self, ticket_id: str, body: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO tickets (id, body) VALUES (?, ?)", (ticket_id, json.dumps(body)))

    def tickets(self) -> list[dict]:
        return [json.loads(r[0]) for r in self.db.execute("SELECT body FROM tickets").fetchall()]

    def delete_ticket(self, ticket_id: str) -> None:
        self.db.execute("DELETE FROM tickets WHERE id = ?", (ticket_id,))

    # -- counters --------------------------------------------------------
    def next(self, name: str, count: int = 1) -> int:
        """The first of `count` numbers never handed out before under this name
        (survives restarts)."""
        self.db.execute("INSERT OR IGNORE INTO counters VALUES (?, 0)", (name,))
        self.db.execute("UPDATE counters SET value = value + ? WHERE name = ?", (count, name))
        last = self.db.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()[0]
        return last - count + 1


def _vm(body: str) -> VmRecord:
    d = json.loads(body)
    d["role"] = VmRole(d["role"])
    d["state"] = VmState(d["state"])
    d["backing"] = tuple(d.get("backing", ()))
    return VmRecord(**{k: v for k, v in d.items() if k in VmRecord.__dataclass_fields__})
