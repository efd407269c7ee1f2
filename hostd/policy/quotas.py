"""Per-family limits, so that one tenant (a family: a parent VM and its clones)
cannot starve the others on a shared host.

- tickets: clone tickets a family may hold at once (granted, cloning or cloned
  and not yet joined): a guest asking in a loop is refused, not queued;
- checkpoints: checkpoints it may hold (each holds RAM and a disk layer);
- mem_share: the part of the host's memory budget its VMs and its tickets'
  reservations may take together.
The defaults leave one family most of the host (a single-tenant host loses
little) and always leave room for others. Each can be set per host with
SFMPI_FAMILY_TICKETS, SFMPI_FAMILY_CHECKPOINTS, SFMPI_FAMILY_MEM_SHARE.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from sfmpi.errors import CapacityError, UsageError

from .admission import Budget, Usage


@dataclass(frozen=True)
class FamilyQuota:
    tickets: int = 8
    checkpoints: int = 32
    mem_share: float = 0.75

    @classmethod
    def from_env(cls) -> "FamilyQuota":
        try:
            q = cls(tickets=int(os.environ.get("SFMPI_FAMILY_TICKETS", cls.tickets)),
                    checkpoints=int(os.environ.get("SFMPI_FAMILY_CHECKPOINTS", cls.checkpoints)),
                    mem_share=float(os.environ.get("SFMPI_FAMILY_MEM_SHARE", cls.mem_share)))
        except ValueError as exc:
            raise UsageError(f"a family quota in the environment is not a number: {exc}") from None
        if q.tickets < 1 or q.checkpoints < 1 or not 0 < q.mem_share <= 1:
            raise UsageError(f"family quotas must be positive and the memory share in (0, 1]: {q}")
        return q


class Quotas:
    def __init__(self, quota: FamilyQuota, budget: Budget, family_usage: Callable[[str], Usage],
                 family_checkpoints: Callable[[str], int], family_tickets: Callable[[str], int]):
        self.quota = quota
        self.budget = budget
        self.family_usage = family_usage
        self.family_checkpoints = family_checkpoints
        self.family_tickets = family_tickets

    def room(self, family: str, mem_mb: int, cpus: int) -> int:
        """How many more VMs of this size the family's share of the budget holds."""
        used = self.family_usage(family)
        mem = int(self.budget.mem_mb * self.quota.mem_share) - used.mem_mb
        vcpus = int(self.budget.vcpus * self.quota.mem_share) - used.vcpus
        return max(0, min(mem // mem_mb, vcpus // cpus))

    def check_ticket(self, family: str) -> None:
        held = self.family_tickets(family)
        if held >= self.quota.tickets:
            raise CapacityError(f"family {family} holds {held} clone tickets (its limit is {self.quota.tickets}): "
                                "join or kill one first")

    def check_checkpoint(self, family: str) -> None:
        held = self.family_checkpoints(family)
        if held >= self.quota.checkpoints:
            raise CapacityError(f"family {family} holds {held} checkpoints (its limit is "
                                f"{self.quota.checkpoints}): remove some with `sfmpi checkpoint rm`")
