"""The pool's parameters (system_params): names, defaults and bounds.

The first four names and their meaning are the service's design (free_count,
min_vm_count, last_connect_ms, ip_reserve_ms); the rest are what an operator of
an autoscaled service also sets: the ceiling, how idle "idle" is, how often a
worker reports, how long a worker lives at least, and the balancer's
per-worker concurrency ("a free VM" in HAProxy's terms).
"""
from __future__ import annotations

from dataclasses import dataclass

from sfmpi.errors import UsageError


@dataclass(frozen=True)
class Param:
    name: str
    default: float
    low: float
    high: float
    kind: type
    meaning: str

    def parse(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise UsageError(f"pool parameter {self.name} must be {'an integer' if self.kind is int else 'a number'}"
                             f" (got {text!r})") from None
        if value != value or not self.low <= value <= self.high:  # (NaN fails the first test)
            raise UsageError(f"pool parameter {self.name} must be between {self.low:g} and {self.high:g} "
                             f"(got {text})")
        return value


PARAMS = {p.name: p for p in (
    Param("free_count", 3, 1, 1000, int, "idle reports in a row before a worker is drained and stopped"),
    Param("min_vm_count", 1, 1, 64, int, "workers the pool never goes below"),
    Param("last_connect_ms", 5000, 500, 3_600_000, int, "a worker silent this long is dead"),
    Param("ip_reserve_ms", 60_000, 1000, 3_600_000, int, "an address reserved this long with no worker is freed"),
    Param("max_vm_count", 8, 1, 64, int, "workers the pool never goes above (the size of ip_pool)"),
    Param("idle_cpu_percent", 25, 0, 100, float, "a report below this CPU use, with no request served, is idle"),
    Param("report_ms", 1000, 200, 60_000, int, "how often each worker's agent reports its load"),
    Param("hold_ms", 10_000, 0, 3_600_000, int, "a worker serves at least this long before it may be retired"),
    Param("maxconn", 2, 1, 10_000, int, "requests one worker serves at once (more wait in the balancer's queue)"),
)}


def parse_assignment(text: str) -> tuple[str, int | float]:
    """KEY=VALUE of `pool set`, checked against PARAMS."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep:
        raise UsageError(f"pool set takes KEY=VALUE (got {text!r})")
    if key not in PARAMS:
        raise UsageError(f"unknown pool parameter {key!r}; known: {', '.join(PARAMS)}")
    return key, PARAMS[key].parse(value.strip())


def check_together(values: dict[str, float]) -> None:
    """What no single bound says: the floor is not above the ceiling."""
    if values["min_vm_count"] > values["max_vm_count"]:
        raise UsageError(f"min_vm_count ({values['min_vm_count']}) is above max_vm_count "
                         f"({values['max_vm_count']})")
