"""hostd's state in SQLite, so a restarted hostd finds its VMs again or reaps them.

One row per VM that hostd started and has not yet cleaned up, and one per
clone API ticket still in play (granted, or used and not yet joined), so that
a restarted hostd can still join the clones of a ticket. Checkpoints live
on disk as directories with a manifest (they outlive hostd and `sfmpi down`);
the table only indexes them. A family's network options (hostd/families.py)
outlive the family, like its checkpoints: a clone of one re-makes the family
with them; the next parent of that name replaces them.

There is no schema version: tables are created if missing (an older database
gains them when opened) and VM rows are JSON whose newer fields have defaults.
"""
from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path


class VmState(str, Enum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    CRASHED = "crashed"


class VmRole(str, Enum):
    PARENT = "parent"      # booted from an image
    CLONE = "clone"        # resumed from a checkpoint
    RECEIVER = "receiver"  # transient: takes the pre-copy of a checkpoint


@dataclass(frozen=True)
class VmRecord:
    name: str
    role: VmRole
    state: VmState
    spec: dict                 # MachineSpec.to_json()
    overlay: str               # the VM's own writable disk layer
    ram_path: str
    qmp_path: str
    agent_path: str
    log_path: str
    serial_log: str
    pid: int | None = None
    image: str = ""
    checkpoint: str = ""       # clones: the checkpoint they came from
    error: str = ""
    family: str = ""           # the family (parent VM's name) this VM belongs to
    family_no: int = 0         # its number: bridge, subnet, MACs (hostd/netplan.py)
    netid: int = 0             # the VM's ID in the family: 0 parent, 1.. clones
    ticket: str = ""           # clones made for a ticket of the clone API
    created: float = field(default_factory=time.time)

    def with_(self, **changes) -> "VmRecord":
        return replace(self, **changes)


SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY,
    vm TEXT NOT NULL,
    path TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS families (
    name TEXT PRIMARY KEY,
    options TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tickets (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
"""


class Store:
    def __init__(self, path: Path):
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- VMs -------------------------------------------------------------
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
    def add_checkpoint(self, ckpt_id: str, vm: str, path: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?)",
                        (ckpt_id, vm, path, time.time()))

    def checkpoint_path(self, ckpt_id: str) -> str | None:
        row = self.db.execute("SELECT path FROM checkpoints WHERE id = ?", (ckpt_id,)).fetchone()
        return row[0] if row else None

    def checkpoints(self) -> list[tuple[str, str, str]]:
        return self.db.execute("SELECT id, vm, path FROM checkpoints ORDER BY created").fetchall()

    def delete_checkpoint(self, ckpt_id: str) -> None:
        self.db.execute("DELETE FROM checkpoints WHERE id = ?", (ckpt_id,))

    # -- family network options ------------------------------------------
    def put_family_options(self, family: str, options: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO families (name, options) VALUES (?, ?)",
                        (family, json.dumps(options)))

    def family_options(self, family: str) -> dict | None:
        row = self.db.execute("SELECT options FROM families WHERE name = ?", (family,)).fetchone()
        return json.loads(row[0]) if row else None

    # -- clone API tickets (hostd/tickets.py) ----------------------------
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
    return VmRecord(**d)
