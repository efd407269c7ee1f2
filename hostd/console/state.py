"""What the console shows, read from the pools' databases and from hostd's.

A snapshot of every pool and VM (/api/state, and the first message of each
/events stream) and, once a second, what changed since (/events' later
messages); for the page of one VM the same pair (/api/vm, /events/vm). The
console only reads: a pool's controller (hostd/pool/db.py) and hostd (its
state database, and stats.db of hostd/monitor/history.py) are the writers,
and WAL keeps a reader from ever blocking them.
"""
from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path
from urllib.parse import quote

from sfmpi.errors import NotFound, SfmpiError, UsageError
from sfmpi.paths import Paths

from ..pool.db import HISTORY_MS, now_ms
from ..pool.params import PARAMS
from ..pool.status import open_pool, pool_names, pool_status
from ..vm.parents import NAME_RE as PARENT_NAME_RE

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
    """Every pool with its last `minutes` of samples and events, and every VM (/api/state)."""
    now = now_ms()
    since = now - minutes * 60_000
    return {"now": now, "window_ms": minutes * 60_000, "param_meanings": PARAM_MEANINGS,
            "pools": [pool_view(home, name, since, full=True) for name in pool_names(home)],
            **_vms(home)}


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
                "pools": pools, **_vms(self.home)}


# -- VMs (docs/console.md, "The page of a VM") ----------------------------------
# hostd's state database (hostd/state/store.py: the table vms) says what a VM is
# and its resource settings; stats.db (hostd/monitor/history.py) holds its
# samples and the feedback controllers with their steps. Both are read-only
# here; a database or table that is not there yet reads as nothing to show.

STATS_DB = "stats.db"
# Gauges are charted as sampled; the cumulative counters as rates in bytes/s.
RATES = {"disk_read": "disk_read_bytes", "disk_write": "disk_write_bytes",
         "net_rx": "net_rx_bytes", "net_tx": "net_tx_bytes"}
SAMPLE_COLUMNS = ("at", "cpu_percent", "vcpu_percent", "mem_pss_bytes", *RATES.values())
# The index shows a VM's latest sample while it is this fresh (the sampler takes one every few seconds).
LATEST_S = 30.0

# A parent's name is what hostd/vm/parents.py allows; its clones are PARENT-K
# (hostd/net/netplan.py hostname) and a pre-copy's receiver is PARENT-rx.
_CLONE = re.compile(r"(.+)-([0-9]{1,3}|rx)")

# The keys of a VM's `resources` (hostd/resources/settings.py), in the order the page lists them.
SETTING_MEANINGS = {
    "priority": "CPU shares as vSphere gives them: low, normal, high weigh 1:2:4",
    "cpu_shares": "relative CPU weight under contention (cgroup cpu.shares, cpu.weight)",
    "cpu_limit": "CPU ceiling, in percent of one host core",
    "mem_limit": "host memory ceiling",
    "disk_iops": "disk I/O operations per second (QEMU block throttling)",
    "disk_bps": "disk bytes per second (QEMU block throttling)",
    "net_rate": "network rate, each direction",
}


def check_vm_name(name) -> str:
    if isinstance(name, str) and (PARENT_NAME_RE.fullmatch(name) or (
            (m := _CLONE.fullmatch(name)) is not None and PARENT_NAME_RE.fullmatch(m[1]))):
        return name
    raise UsageError(f"bad VM name {name!r}: a VM's name is 1-40 of a-z, 0-9 and '-' (a clone's: "
                     f"its parent's and -N)")


class _ReadOnly:
    """One of hostd's databases, opened read-only (so never created): a missing
    file or table reads as no rows. Any other error is the caller's to show."""

    def __init__(self, path: Path):
        self.db = None
        if path.is_file():
            self.db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=2.0)

    def rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        if self.db is None:
            return []
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if str(exc).startswith("no such table"):
                return []
            raise

    def __enter__(self) -> "_ReadOnly":
        return self

    def __exit__(self, *exc) -> None:
        if self.db is not None:
            self.db.close()


def _stats(home: Path) -> _ReadOnly:
    return _ReadOnly(Path(home) / STATS_DB)


def _records(home: Path) -> dict[str, dict]:
    """The VMs of hostd's state database by name, oldest first."""
    with _ReadOnly(Paths(Path(home)).db) as db:
        rows = db.rows("SELECT name, body FROM vms")
    records = []
    for name, body in rows:
        try:
            rec = json.loads(body)
        except ValueError:
            rec = {}
        records.append((rec.get("created") or 0, name, rec if isinstance(rec, dict) else {}))
    return {name: rec for _, name, rec in sorted(records)}


def _sampled(db: _ReadOnly) -> list[str]:
    """Every VM with samples: a walk of the (vm, at) index from one name to the next,
    rather than a scan of an hour of samples once a second."""
    rows = db.rows("WITH RECURSIVE v(name) AS (SELECT min(vm) FROM vm_sample UNION ALL "
                   "SELECT (SELECT min(vm) FROM vm_sample WHERE vm > v.name) FROM v WHERE v.name IS NOT NULL) "
                   "SELECT name FROM v WHERE name IS NOT NULL")
    return [r[0] for r in rows]


def vm_names(home: Path) -> list[str]:
    """hostd's VMs (oldest first), then those gone whose statistics are still kept."""
    names = list(_records(home))
    with _stats(home) as db:
        return names + sorted(set(_sampled(db)) - set(names))


def _summary(name: str, rec: dict | None) -> dict:
    rec = rec or {}
    spec = rec.get("spec") if isinstance(rec.get("spec"), dict) else {}
    return {"name": name, "role": rec.get("role", ""), "state": rec.get("state", "gone") if rec else "gone",
            "family": rec.get("family", ""), "cpus": spec.get("cpus"), "mem_mb": spec.get("mem_mb"),
            "image": rec.get("image", ""), "checkpoint": rec.get("checkpoint", ""), "error": rec.get("error", ""),
            "created": rec.get("created")}


def vm_list(home: Path) -> list[dict]:
    """What the index lists of each VM: vm_names' order, each with its latest sample if a fresh one."""
    records = _records(home)
    with _stats(home) as db:
        gone = sorted(set(_sampled(db)) - set(records))
        # SQLite takes the bare columns of a max() aggregate from the row that has the max.
        latest = {r[0]: r[1:] for r in db.rows("SELECT vm, max(at), cpu_percent, mem_pss_bytes FROM vm_sample "
                                                "WHERE at >= ? GROUP BY vm", (time.time() - LATEST_S,))}
    out = []
    for name in [*records, *gone]:
        at, cpu, pss = latest.get(name, (None, None, None))
        out.append(_summary(name, records.get(name)) | {"cpu_percent": cpu, "pss_mib": _mib(pss)})
    return out


def _vms(home: Path) -> dict:
    """The VM list of a snapshot or update; one that cannot be read says so instead of ending the stream."""
    try:
        return {"vms": vm_list(home), "vms_error": ""}
    except (SfmpiError, sqlite3.Error) as exc:
        return {"vms": [], "vms_error": str(exc)}


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.4g} {unit}"
        n /= 1024
    return ""  # not reached


def _bits(n: float) -> str:
    for unit in ("bit/s", "kbit/s", "Mbit/s", "Gbit/s"):
        if abs(n) < 1000 or unit == "Gbit/s":
            return f"{n:.4g} {unit}"
        n /= 1000
    return ""  # not reached


def setting_text(key: str, value) -> str:
    """A resource setting as the page shows it: 50.0 -> '50 % of one core', 536870912 -> '512 MiB'."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return {"cpu_limit": lambda v: f"{v:g} % of one core", "mem_limit": _size,
            "disk_bps": lambda v: f"{_size(v)}/s", "disk_iops": lambda v: f"{v:g} IO/s",
            "net_rate": _bits}.get(key, lambda v: f"{v:g}")(value)


def _settings(rec: dict | None) -> list[dict]:
    given = (rec or {}).get("resources") or {}
    if not isinstance(given, dict):
        return []
    keys = [k for k in SETTING_MEANINGS if k in given] + sorted(set(given) - set(SETTING_MEANINGS))
    return [{"key": k, "value": given[k], "text": setting_text(k, given[k]), "meaning": SETTING_MEANINGS.get(k, "")}
            for k in keys if given[k] is not None]


def _point(at: float, y) -> dict:
    return {"x": round(at * 1000), "y": y}


def _series(base: tuple | None, rows: list[tuple]) -> dict:
    """Chart series of the samples `rows` (oldest first); `base` is the sample
    before them, so that the first of them has a rate too. A counter that went
    down means the VM restarted: that point has no rate."""
    series = {"cpu": [], "vcpu": [], "pss_mib": [], **{key: [] for key in RATES}}
    prev = base
    for row in rows:
        at, cpu, vcpus, pss, *counters = row
        series["cpu"].append(_point(at, cpu))
        try:
            vcpus = json.loads(vcpus)
        except (TypeError, ValueError):
            vcpus = []
        for i, v in enumerate(vcpus if isinstance(vcpus, list) else []):
            while len(series["vcpu"]) <= i:
                series["vcpu"].append([])
            series["vcpu"][i].append(_point(at, v))
        series["pss_mib"].append(_point(at, _mib(pss)))
        if prev is not None and at > prev[0]:
            for key, now, before in zip(RATES, counters, prev[4:]):
                if now >= before:
                    series[key].append(_point(at, round((now - before) / (at - prev[0]), 1)))
        prev = row
    return series


def _samples(db: _ReadOnly, name: str, since: float, after: float | None) -> tuple[dict, float | None]:
    """The series of the window from `since`, or with `after` only the points of
    samples newer than it; and the time of the newest sample read."""
    cols = ", ".join(SAMPLE_COLUMNS)
    start, newer = (since, ">=") if after is None else (max(since, after), ">")
    older = "<" if after is None else "<="
    base = db.rows(f"SELECT {cols} FROM vm_sample WHERE vm = ? AND at {older} ? ORDER BY at DESC LIMIT 1",
                   (name, start))
    rows = db.rows(f"SELECT {cols} FROM vm_sample WHERE vm = ? AND at {newer} ? ORDER BY at", (name, start))
    return _series(base[0] if base else None, rows), rows[-1][0] if rows else after


def _controllers(db: _ReadOnly, name: str, since: float, after: dict[str, float] | None) -> list[dict]:
    """Every feedback controller that has this VM as a member: its definition and its steps
    of the window (with `after`: only those newer than the last one sent, per controller)."""
    out = []
    for cname, body in db.rows("SELECT name, body FROM control ORDER BY created, name"):
        try:
            body = json.loads(body)
        except ValueError:
            continue
        members = body.get("members") if isinstance(body, dict) else None
        if not isinstance(members, dict) or name not in members:
            continue
        last = (after or {}).get(cname)
        start, newer = (since, ">=") if last is None else (max(since, last), ">")
        steps = db.rows("SELECT at, measurement, target, error, integral, actuation, note FROM control_step "
                        f"WHERE control = ? AND at {newer} ? ORDER BY at", (cname, start))
        member = members[name] if isinstance(members[name], dict) else {}
        out.append({
            "name": cname, "definition": body, "class": member.get("class", ""),
            "measurement": [_point(s[0], s[1]) for s in steps if s[1] is not None],
            "target": [_point(s[0], s[2]) for s in steps],
            "actuation": [_point(s[0], s[5]) for s in steps],
            "last_step": dict(zip(("at", "measurement", "target", "error", "integral", "actuation", "note"),
                                  steps[-1])) if steps else None,
            "last_step_at": steps[-1][0] if steps else last,
        })
    return out


def vm_view(home: Path, name: str, since: float, after: float | None = None,
            after_steps: dict[str, float] | None = None) -> dict:
    """One VM as its page draws it: what hostd's record says, its resource
    settings, its samples from `since` (unix seconds) as chart series, and the
    controllers it is a member of with their steps. With `after` (the time of
    the newest sample already sent) and `after_steps` (the same per controller),
    only what is newer. A VM that hostd no longer has but whose statistics are
    kept is shown as gone; one of neither is NotFound."""
    check_vm_name(name)
    rec = _records(home).get(name)
    with _stats(home) as db:
        if rec is None and not db.rows("SELECT 1 FROM vm_sample WHERE vm = ? LIMIT 1", (name,)):
            known = ", ".join(vm_names(home)) or "none"
            raise NotFound(f"no VM named {name!r} on this host (VMs: {known})")
        series, last_at = _samples(db, name, since, after)
        controllers = _controllers(db, name, since, after_steps)
    return {"name": name, "vm": _summary(name, rec), "settings": _settings(rec), "series": series,
            "last_at": last_at, "controllers": controllers}


def vm_snapshot(home: Path, name: str, minutes: int = DEFAULT_MINUTES) -> dict:
    """/api/vm: a VM with its last `minutes` of samples and controller steps."""
    now = now_ms()
    return {"now": now, "window_ms": minutes * 60_000} | vm_view(home, name, now / 1000 - minutes * 60)


class VmFeed:
    """One /events/vm client: a snapshot first, then only the samples and steps
    newer than those already sent (the rate of the first new sample is from the
    last one sent). A VM that hostd lets go of and whose statistics age out is
    sent as `known: false` with the error, and its page says so."""

    def __init__(self, home: Path, name: str, minutes: int = DEFAULT_MINUTES):
        self.home = Path(home)
        self.name = check_vm_name(name)
        self.minutes = minutes
        self.last_at: float | None = None
        self.last_steps: dict[str, float] = {}

    def _remember(self, view: dict) -> dict:
        self.last_at = view["last_at"]
        self.last_steps = {c["name"]: c["last_step_at"] for c in view["controllers"] if c["last_step_at"] is not None}
        return view | {"known": True}

    def snapshot(self) -> dict:
        return self._remember(vm_snapshot(self.home, self.name, self.minutes))

    def update(self) -> dict:
        now = now_ms()
        head = {"now": now, "window_ms": self.minutes * 60_000, "name": self.name}
        try:
            view = vm_view(self.home, self.name, now / 1000 - self.minutes * 60, self.last_at or 0.0,
                           self.last_steps)
        except (SfmpiError, sqlite3.Error) as exc:
            return head | {"known": False, "error": str(exc)}
        return self._remember(head | view)
