"""What `pool status`, `pool set` and the console read: a pool's directory and its database."""
from __future__ import annotations

import os
import re
from pathlib import Path

from sfmpi.errors import NotFound, UsageError

from .db import PoolDb, now_ms

LATENCY_WINDOW_MS = 10_000
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,23}$")


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise UsageError(f"pool name {name!r}: use 1-24 lowercase letters, digits and '-', starting with a letter")
    return name


def pools_root(home: Path) -> Path:
    return Path(home) / "pools"


def pool_dir(home: Path, name: str) -> Path:
    return pools_root(home) / check_name(name)


def pool_names(home: Path) -> list[str]:
    root = pools_root(home)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if (d / "pool.db").is_file() and NAME_RE.match(d.name))


def open_pool(home: Path, name: str) -> PoolDb:
    path = pool_dir(home, name) / "pool.db"
    if not path.is_file():
        known = ", ".join(pool_names(home)) or "none"
        raise NotFound(f"no pool named {name!r} (pools: {known})")
    return PoolDb(path)


def controller_alive(info: dict) -> bool:
    try:
        pid = int(info.get("pid", "0"))
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError, PermissionError):
        return False
    # The pid must still be our controller, not a process that reused it.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"serve" in cmdline and info.get("name", "").encode() in cmdline


def pool_status(home: Path, name: str, events: int = 20) -> dict:
    db = open_pool(home, name)
    try:
        info = db.info()
        state = info.get("state", "unknown")
        if state not in ("stopped", "failed") and not controller_alive(info):
            state = "controller-dead"
        vms = db.vms()
        t = now_ms()
        for vm in vms:
            vm["report_age_ms"] = t - vm["last_connect"] if vm["last_connect"] else None
        return {
            "name": name, "state": state, "frontend": info.get("frontend", ""),
            "checkpoint": info.get("checkpoint", ""), "service": info.get("service", ""),
            "port": int(info.get("port", "0") or 0), "error": info.get("error", ""),
            "params": db.params(), "vm_count": sum(1 for v in vms if v["state"] == "serving"),
            "vms": vms, "ip_pool": db.ip_pool(), "events": db.events()[-events:],
            # Response times at the balancer, over the last LATENCY_WINDOW_MS.
            "latency": {"window_ms": LATENCY_WINDOW_MS, **db.latency(t - LATENCY_WINDOW_MS)},
        }
    finally:
        db.close()


class PoolLatency:
    """What hostd's controllers read of this state directory's pools (control/loops.py):
    each pool's database, opened for one query at a time (WAL: never in the controller's way)."""

    def __init__(self, home: Path):
        self.home = Path(home)

    def exists(self, name: str) -> bool:
        return name in pool_names(self.home)   # the names of well-formed pool directories only

    def p95_ms(self, name: str, since: float, until: float) -> float | None:
        """The p95 of the requests that ended in [since, until) (Unix seconds); None: no request, no pool."""
        try:
            db = open_pool(self.home, name)
        except NotFound:
            return None
        try:
            return db.latency(int(since * 1000), int(until * 1000))["p95_ms"]
        finally:
            db.close()
