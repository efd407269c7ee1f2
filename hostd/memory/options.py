"""How a fork's served clones get their memory (docs/memory.md), chosen per fork.

push: after the clones resume, their hosts' memtaps bring in every non-zero
page left, so the clones stop depending on the memory server (`clone --push`;
on by default for a ticket's clones, SFMPI_PUSH_TICKETS=0 to go without).
multicast: the memory server answers by the checkpoint's multicast group
(`clone --no-multicast`, or a host with multicast off, for unicast only).
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ServedOptions:
    push: bool = False
    multicast: bool = True

    @classmethod
    def from_json(cls, d: object) -> "ServedOptions":
        """From a request or another host's descriptor: only booleans are taken."""
        d = d if isinstance(d, dict) else {}
        return cls(push=d.get("push") is True, multicast=d.get("multicast", True) is not False)

    def to_json(self) -> dict:
        return {"push": self.push, "multicast": self.multicast}


def for_tickets() -> ServedOptions:
    """A ticket's clones (sfmpirun's, a section's) run for a while: with the
    push they stop depending on the parent's host soon after they start."""
    return ServedOptions(push=os.environ.get("SFMPI_PUSH_TICKETS", "1") != "0")
