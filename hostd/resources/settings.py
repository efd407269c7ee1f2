"""A VM's resource settings, as `sfmpi vm set` takes them and the store keeps
them (pure: parsing, bounds, merging; no I/O).

Keys of the JSON form (any subset; absent = no setting):
    cpu_shares  int       relative weight under contention (cgroup v1 cpu.shares; v2 cpu.weight)
    cpu_limit   float     a ceiling in percent of one host core (v1 cfs quota; v2 cpu.max)
    mem_limit   int       bytes of host memory (v1 memory.limit_in_bytes; v2 memory.max)
    disk_iops   int       I/O operations per second (QEMU block_set_io_throttle)
    disk_bps    int       bytes per second (QEMU block_set_io_throttle)
    net_rate    int       bits per second, each direction (tc tbf to the guest, nftables from it)
    priority    str       low | normal | high: shares as vSphere gives them, 1:2:4
"""
from __future__ import annotations

import math
import re

from sfmpi.errors import UsageError

KEYS = ("cpu_shares", "cpu_limit", "mem_limit", "disk_iops", "disk_bps", "net_rate", "priority")
PRIORITIES = {"low": 500, "normal": 1000, "high": 2000}   # shares per vCPU, as vSphere's
CLEAR = "none"

# Bounds: cpu.shares takes 2..262144; a CFS quota under 1 ms per 100 ms period is refused by the kernel.
BOUNDS = {"cpu_shares": (2, 262144), "disk_iops": (1, 10 ** 7), "disk_bps": (4096, 1 << 40),
          "net_rate": (8000, 100 * 10 ** 9), "mem_limit": (64 << 20, 1 << 44)}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.I)
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)(bit|bps|b/s)?\s*$")
_BYTE_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGkmg]?)(?:iB|B)/s\s*$")


def priority_shares(priority: str, cpus: int) -> int:
    return PRIORITIES[priority] * max(1, cpus)


def _int_in(key: str, value: float, flag: str) -> int:
    low, high = BOUNDS[key]
    if not low <= value <= high:
        raise UsageError(f"{flag} must be {low}-{high} (got {value:g})")
    return int(value)


def parse_size(text: str, flag: str = "--mem-limit") -> int:
    """'512M', '1G', '1.5GiB', '268435456' -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise UsageError(f"{flag}: cannot read {text!r} as a size (use e.g. 512M or 1G)")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def parse_rate(text: str, flag: str = "--net-rate") -> int:
    """A network rate -> bits per second: '10mbit', '500kbit', '1gbit', '2MB/s' (bytes), '8000' (bits)."""
    text = str(text)
    m = _BYTE_RATE.match(text)
    if m:
        return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()] * 8)
    m = _RATE.match(text)
    if not m:
        raise UsageError(f"{flag}: cannot read {text!r} as a rate (use e.g. 10mbit, 500kbit or 2MB/s)")
    return int(float(m.group(1)) * {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9}[m.group(2)])


def _number(text, flag: str) -> float:
    if isinstance(text, bool):
        raise UsageError(f"{flag}: not a number ({text!r})")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UsageError(f"{flag}: not a number ({text!r})") from None
    if not math.isfinite(value):
        raise UsageError(f"{flag}: not a number ({text!r})")
    return value


def parse_changes(given: dict, cpus: int) -> dict:
    """{key: text or None} from the command line (or the wire) -> {key: value or None to clear}.
    Only the keys given; every value checked against its bounds."""
    unknown = set(given) - set(KEYS)
    if unknown:
        raise UsageError(f"vm set: unknown setting(s) {', '.join(sorted(unknown))} (known: {', '.join(KEYS)})")
    out: dict = {}
    for key, text in given.items():
        flag = "--" + key.replace("_", "-")
        if text is None or (isinstance(text, str) and text.strip().lower() == CLEAR):
            out[key] = None
        elif key == "priority":
            if text not in PRIORITIES:
                raise UsageError(f"--priority must be low, normal or high (got {text!r})")
            out[key] = text
        elif key == "cpu_limit":
            value = _number(text, flag)
            if not 1 <= value <= 100 * cpus:
                raise UsageError(f"--cpu-limit is in percent of one host core: 1-{100 * cpus} for a VM of "
                                 f"{cpus} vCPU(s) (got {value:g})")
            out[key] = round(value, 2)
        elif key == "mem_limit":
            out[key] = _int_in(key, text if isinstance(text, int) and not isinstance(text, bool)
                               else parse_size(text, flag), flag)
        elif key == "net_rate":
            out[key] = _int_in(key, text if isinstance(text, int) and not isinstance(text, bool)
                               else parse_rate(text, flag), flag)
        else:
            value = _number(text, flag)
            if value != int(value):
                raise UsageError(f"{flag} must be a whole number (got {text!r})")
            out[key] = _int_in(key, value, flag)
    return out


def merged(current: dict, changes: dict) -> dict:
    out = {k: v for k, v in (current or {}).items() if k in KEYS}
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def effective_shares(settings: dict, cpus: int) -> int | None:
    """Explicit shares win over a priority; neither: the host's default."""
    if "cpu_shares" in settings:
        return int(settings["cpu_shares"])
    if "priority" in settings:
        return priority_shares(settings["priority"], cpus)
    return None


def validate_stored(settings: object, cpus: int) -> dict:
    """Settings read back (a record, a checkpoint's manifest, a ticket): well-formed or refused."""
    if not isinstance(settings, dict):
        raise UsageError("resource settings must be an object")
    return {k: v for k, v in parse_changes(dict(settings), cpus).items() if v is not None}
