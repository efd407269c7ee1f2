"""What the console shows, read from the pools' databases.

A snapshot of every pool (/api/state, and the first message of each /events
stream) and, once a second, what changed since (/events' later messages). The
console only reads: the controller is the one writer (hostd/pool/db.py), and
WAL keeps a reader from ever blocking it.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

from sfmpi.errors import SfmpiError

from ..pool.db import HISTORY_MS, now_ms
from ..pool.params import PARAMS
from ..pool.status import open_pool, pool_names, pool_status

# The guest agent reports memory in bytes (sfmpi/guest/load.py); the page graphs MiB.
MIB = 1 << 20
DEFAULT_MINUTES = 15
# The controller trims the history to HISTORY_MS: a longer window would show nothing more.
MAX_MINUTES = HISTORY_MS // 60_000

# What a page needs to explain the params table, sent once with each snapshot.
PARAM_MEANINGS = {name: p.meaning for name, p in PARAMS.items()}


def window_minutes(text: str | None) -> int:
    """?minutes=N of a request, kept within what the history holds (bad input: the default)."""
    try:
        return max(1, min(int(text), MAX_MINUTES)) if text else DEFAULT_MINUTES
    except ValueError:
        return DEFAULT_MINUTES


def _mib(ram: int | None) -> float | None:
    return None if ram is None else round(ram / MIB, 1)


def _vm_view(vm: dict) -> dict:
    return {"name": vm["name"], "state": vm["state"], "cpu": vm["cpu"], "ram_mib": _mib(vm["ram"]),
            "ip": vm["ip"], "port": vm["port"], "started": vm["started"], "report_age_ms": vm["report_age_ms"]}


def _history(home: Path, name: str, since_ms: int, after: tuple[int, int]) -> tuple[list, list]:
    """Samples and events of the window with ids above after=(sample id, event id).
    The window, not the last id, bounds the query: a late report (an older `at`,
    a newer id) still arrives, and nothing older than the window is drawn anyway."""
    db = open_pool(home, name)
    try:
        samples = [s | {"ram_mib": _mib(s["ram"])} for s in db.samples(since_ms) if s["id"] > after[0]]
        events = [e for e in db.events(since_ms) if e["id"] > after[1]]
    finally:
        db.close()
    return samples, events


def pool_view(home: Path, name: str, since_ms: int, after: tuple[int, int] = (0, 0), full: bool = False) -> dict:
    """One pool as the page draws it. With full, also what only a snapshot carries
    (service, checkpoint, ip_pool). A pool that cannot be read is shown as such
    rather than ending the console: its database may be mid-creation, gone, or
    of a newer sfmpi."""
    try:
        st = pool_status(home, name)
        samples, events = _history(home, name, since_ms, after)
    except (SfmpiError, sqlite3.Error) as exc:
        return {"name": name, "state": "unreadable", "error": str(exc), "frontend": "", "params": {},
                "vm_count": 0, "vms": [], "samples": [], "events": [], "last_sample_id": after[0],
                "last_event_id": after[1]}
    view = {
        "name": name, "state": st["state"], "error": st["error"], "frontend": st["frontend"],
        "params": st["params"], "vm_count": st["vm_count"], "vms": [_vm_view(v) for v in st["vms"]],
        "samples": samples, "events": events,
        "last_sample_id": max([after[0], *(s["id"] for s in samples)]),
        "last_event_id": max([after[1], *(e["id"] for e in events)]),
    }
    if full:
        view |= {"service": st["service"], "checkpoint": st["checkpoint"], "port": st["port"],
                 "ip_pool": st["ip_pool"]}
    return view


def snapshot(home: Path, minutes: int = DEFAULT_MINUTES) -> dict:
    """Every pool with its last `minutes` of samples and events (/api/state)."""
    now = now_ms()
    since = now - minutes * 60_000
    return {"now": now, "window_ms": minutes * 60_000, "param_meanings": PARAM_MEANINGS,
            "pools": [pool_view(home, name, since, full=True) for name in pool_names(home)]}


class Feed:
    """One /events client: a snapshot first, then per pool only the samples and
    events with ids above those it was already sent. A pool that appears later
    comes whole in its first update; one that went is left out of `names`."""

    def __init__(self, home: Path, minutes: int = DEFAULT_MINUTES):
        self.home = Path(home)
        self.minutes = minutes
        self.sent: dict[str, tuple[int, int]] = {}

    def _remember(self, pools: list[dict]) -> None:
        self.sent = {p["name"]: (p["last_sample_id"], p["last_event_id"]) for p in pools}

    def snapshot(self) -> dict:
        snap = snapshot(self.home, self.minutes)
        self._remember(snap["pools"])
        return snap

    def update(self) -> dict:
        now = now_ms()
        since = now - self.minutes * 60_000
        pools = [pool_view(self.home, name, since, self.sent.get(name, (0, 0))) for name in pool_names(self.home)]
        self._remember(pools)
        return {"now": now, "window_ms": self.minutes * 60_000, "names": [p["name"] for p in pools],
                "pools": pools}
