"""Admission control: a host has a memory and a vCPU budget; requests beyond it
are refused (or trimmed when the caller allows fewer), never half-done.

Every VM is counted at its full configured RAM even though clones share their
parent's pages copy-on-write: a clone may touch all of its memory, and a host
that overcommits and then OOM-kills guests loses user work.
"""
from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from typing import Callable

from sfmpi.errors import CapacityError, UsageError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)


def parse_size_mb(text: str | int) -> int:
    """'512M', '1G', '1.5GiB', 512 -> MiB."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise UsageError(f"cannot read {text!r} as a size (use e.g. 512M or 1G)")
    value, unit = float(m.group(1)), (m.group(2) or "M").upper()
    mb = value * {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}[unit]
    if mb < 1:
        raise UsageError(f"size {text!r} is too small")
    return int(mb)


def ram_dir_free_mb(directory) -> int:
    """MiB a new RAM file in `directory` (a tmpfs) can still take: the file
    system's free space less what the sparse files already there may still
    claim (a file's size beyond its allocated blocks). Without the second part
    a VM whose RAM is not all touched yet would lose pages to the newcomer and
    die of SIGBUS later, long after both were admitted."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    with os.scandir(directory) as entries:
        for e in entries:
            if e.is_file(follow_symlinks=False):
                f = e.stat(follow_symlinks=False)
                free -= max(0, f.st_size - f.st_blocks * 512)
    return max(0, free) >> 20


def check_ram_dir(directory, mem_mb: int, what: str, pending_mb: int = 0) -> None:
    """CapacityError unless a RAM file of mem_mb MiB fits in directory, besides
    pending_mb of RAM files admitted but not made yet."""
    free = max(0, ram_dir_free_mb(directory) - pending_mb)
    if free < mem_mb:
        raise CapacityError(f"{what} refused: its RAM directory {directory} has {free} MiB free, "
                            f"the VM needs {mem_mb} MiB (free space there, or give the tmpfs more)")


def host_mem_mb() -> int:
    import psutil
    return psutil.virtual_memory().total >> 20


@dataclass(frozen=True)
class Budget:
    mem_mb: int
    vcpus: int

    @classmethod
    def default(cls) -> "Budget":
        """75% of host RAM; 8 vCPUs per host core (guests mostly wait, TCG or not)."""
        mem = os.environ.get("SFMPI_MEM_BUDGET")
        cpus = os.environ.get("SFMPI_VCPU_BUDGET")
        return cls(
            mem_mb=parse_size_mb(mem) if mem else host_mem_mb() * 3 // 4,
            vcpus=int(cpus) if cpus else 8 * (os.cpu_count() or 1),
        )


@dataclass(frozen=True)
class Usage:
    mem_mb: int
    vcpus: int


def admit(budget: Budget, used: Usage, n: int, mem_mb: int, cpus: int,
          allow_fewer: bool = False, what: str = "clone") -> int:
    """How many of n VMs of (mem_mb, cpus) to start. Raises CapacityError if none or
    (without allow_fewer) not all fit."""
    if n <= 0:
        raise UsageError(f"{what}: the number of VMs must be at least 1 (got {n})")
    fit_mem = max(0, budget.mem_mb - used.mem_mb) // mem_mb
    fit_cpu = max(0, budget.vcpus - used.vcpus) // cpus
    fit = min(fit_mem, fit_cpu)
    if fit >= n:
        return n
    why = (f"host budget has room for {fit} more VM(s) of {mem_mb} MiB/{cpus} vCPU "
           f"(memory {used.mem_mb}/{budget.mem_mb} MiB used, vCPUs {used.vcpus}/{budget.vcpus} used)")
    if fit == 0 or not allow_fewer:
        hint = "" if fit == 0 else "; pass --allow-fewer to take what fits"
        raise CapacityError(f"{what} of {n} refused: {why}{hint}")
    return fit


class Admission:
    """The host's budget and what is using it, behind one lock: a request is
    admitted and its records reserved under the lock, so two requests never
    both take the last room.

    usage(): what live VMs and granted tickets hold now (the composition root
    knows both)."""

    def __init__(self, budget: Budget, usage: Callable[[], Usage]):
        self.budget = budget
        self.usage = usage
        self.lock = asyncio.Lock()

    def admit(self, n: int, mem_mb: int, cpus: int, allow_fewer: bool = False, what: str = "clone") -> int:
        return admit(self.budget, self.usage(), n, mem_mb, cpus, allow_fewer, what)

    def room(self, mem_mb: int, cpus: int) -> int:
        """How many more VMs of this size the budget holds."""
        try:
            return admit(self.budget, self.usage(), 1 << 16, mem_mb, cpus, allow_fewer=True)
        except CapacityError:
            return 0
