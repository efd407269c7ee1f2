"""Where a ticket's clones go: pure functions over each host's free room, no I/O.

The master calls place() with a snapshot of every registered host (store.room())
and records the answer as the ticket's slots. Two policies:

* pack: fill the parent's host first, then the others by name, so a family
  stays on as few hosts as possible (clones near their parent share its memory
  server and network without a tunnel);
* spread: one clone per host in turn, starting with the parent's host, so a
  family's load (and its loss when one host dies) is shared evenly.

Either way a request gets all its clones or, only when the caller allows
fewer, as many as fit; never a placement that overfills a host.
"""
from __future__ import annotations

from dataclasses import dataclass

from sfmpi.errors import CapacityError, UsageError

POLICIES = ("pack", "spread")


@dataclass(frozen=True)
class HostRoom:
    """What one host can still take: its capacity less what it runs and what
    the master has promised to tickets it has not started yet."""

    name: str
    free_mem_mb: int
    free_vcpus: int
    up: bool = True


def place(hosts: list[HostRoom], n: int, mem_mb: int, cpus: int, policy: str,
          allow_fewer: bool = False, first: str | None = None, family_limit: int | None = None,
          family_held: dict[str, int] | None = None) -> dict[str, int]:
    """Host name -> how many of the n clones (each mem_mb, cpus) it gets.

    Only hosts that get clones appear, `first` (the parent's host) before the
    others by name. `cpus` is taken as given: a caller that overcommits vCPUs
    passes the overcommitted budget in free_vcpus. family_limit caps how many
    clones the family may hold at once; family_held is what it holds now
    (per host; only the sum matters). Raises CapacityError when fewer than n
    fit (or none, with allow_fewer), UsageError on bad input.
    """
    _check_count("n", n, minimum=1)
    _check_count("mem_mb", mem_mb, minimum=1)
    _check_count("cpus", cpus, minimum=1)
    if policy not in POLICIES:
        raise UsageError(f"unknown placement policy {policy!r} (use one of {', '.join(POLICIES)})")
    ordered = _ordered(hosts, first)
    room = {h.name: _clones_that_fit(h, mem_mb, cpus) for h in ordered}

    wanted = n
    held = 0
    if family_limit is not None:
        _check_count("family_limit", family_limit, minimum=0)
        for host, count in (family_held or {}).items():
            _check_count(f"family_held[{host!r}]", count, minimum=0)
        held = sum((family_held or {}).values())
        wanted = min(n, max(0, family_limit - held))

    spread = _spread if policy == "spread" else _pack
    counts = spread([h.name for h in ordered], room, wanted)
    placed = sum(counts.values())
    what = f"{mem_mb} MB, {_vcpus(cpus)}"
    if placed == 0 and allow_fewer:
        if family_limit is not None and wanted == 0:
            raise CapacityError(f"the family already holds {held} clones, its limit is {family_limit}: "
                                f"no room for one more clone of {what}")
        raise CapacityError(f"no host has room for one clone of {what}")
    if placed < n and not allow_fewer:
        fit = f"only {placed} fit" if placed else "none fit"
        why = [f"family limit {family_limit}, {held} held"] if wanted < n else []
        where = [f"{h.name}: {room[h.name] if h.up else 'down'}" for h in ordered] or ["no hosts registered"]
        raise CapacityError(f"asked for {n} {'clone' if n == 1 else 'clones'} of {what}: {fit} "
                            f"({'; '.join(why + [', '.join(where)])})")
    return {name: count for name, count in counts.items() if count > 0}


def _pack(names: list[str], room: dict[str, int], wanted: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        take = min(room[name], wanted - sum(counts.values()))
        counts[name] = take
    return counts


def _spread(names: list[str], room: dict[str, int], wanted: int) -> dict[str, int]:
    # Whole rounds at once (one clone to every host with room left), then the
    # last partial round in order: the same answer as one clone at a time,
    # without looping n times for a large request.
    counts = dict.fromkeys(names, 0)
    left = wanted
    while left > 0:
        open_hosts = [name for name in names if counts[name] < room[name]]
        if not open_hosts:
            break
        rounds = min(left // len(open_hosts), min(room[name] - counts[name] for name in open_hosts))
        if rounds == 0:
            for name in open_hosts[:left]:
                counts[name] += 1
            break
        for name in open_hosts:
            counts[name] += rounds
        left -= rounds * len(open_hosts)
    return counts


def _ordered(hosts: list[HostRoom], first: str | None) -> list[HostRoom]:
    """first, then the rest by name; a name twice is a caller bug, not two hosts."""
    names = [h.name for h in hosts]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UsageError(f"host listed twice in a placement request: {', '.join(duplicates)}")
    return sorted(hosts, key=lambda h: (h.name != first, h.name))


def _clones_that_fit(host: HostRoom, mem_mb: int, cpus: int) -> int:
    if not host.up:
        return 0
    return max(0, min(host.free_mem_mb // mem_mb, host.free_vcpus // cpus))


def _check_count(what: str, value: object, minimum: int) -> None:
    # bool is an int to Python; True clones is a caller bug, not one clone.
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{what} must be a whole number, not {value!r}")
    if value < minimum:
        raise UsageError(f"{what} must be at least {minimum}, not {value}")


def _vcpus(cpus: int) -> str:
    return f"{cpus} vCPU" if cpus == 1 else f"{cpus} vCPUs"
