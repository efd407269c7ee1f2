"""Tickets: SnowFlock's reservation of clone slots, and what became of each clone.

request_ticket(n) grants m <= n slots by policy (a per-family limit and the
host's budget); the slots stay reserved until the ticket is used and its clones
are gone. States: granted -> cloned -> joined | killed (or expired while
granted). A ticket belongs to the VM that asked for it; only that VM may use,
join or kill it.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import Callable

from sfmpi.errors import CapacityError, RoleError, TicketError, UsageError

from ..resources.settings import parse_changes

DEFAULT_FAMILY_LIMIT = 32
# A ticket never used holds its slots this long, then expires: a program that
# asked and then crashed must not keep the host's room forever.
UNUSED_TICKET_EXPIRY = 600.0


class TicketState(str, Enum):
    GRANTED = "granted"
    CLONING = "cloning"
    CLONED = "cloned"
    JOINED = "joined"
    KILLED = "killed"


@dataclass(frozen=True)
class Ticket:
    id: str
    owner: str                 # the VM that requested it (the parent of its clones)
    family: str
    requested: int
    granted: int
    mem_mb: int
    cpus: int
    timeout: float | None = None
    state: TicketState = TicketState.GRANTED
    created: float = field(default_factory=time.time)
    cloned_at: float | None = None   # when its clones were up: the timeout runs from here
    # In a cluster: where the master placed its clones (host -> count); this
    # host holds only its own share of them. None: all on this host.
    placement: dict[str, int] | None = None
    # Resource settings its clones get instead of the parent's ({key: value, or
    # None to drop the parent's}); None: they inherit the parent's as they are.
    resources: dict | None = None

    def with_(self, **changes) -> "Ticket":
        return replace(self, **changes)

    def to_wire(self) -> dict:
        return {"id": self.id, "requested": self.requested, "granted": self.granted,
                "family": self.family, "timeout": self.timeout, "resources": self.resources}


@dataclass
class CloneSlot:
    """One clone of a used ticket: index i (what clone() returned), its VM."""
    index: int
    vm: str
    status: int | None = None      # exit status, once it called exit
    failure: str | None = None     # why it ended without exit
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    on_end: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def finish(self, status: int | None = None, failure: str | None = None) -> None:
        if self.ended.is_set():
            return
        self.status, self.failure = status, failure
        self.ended.set()
        if self.on_end is not None:
            self.on_end()

    def to_json(self) -> dict:
        return {"index": self.index, "vm": self.vm, "status": self.status, "failure": self.failure,
                "ended": self.ended.is_set()}


class TicketBook:
    """All tickets of this hostd; with a store, each change is written through."""

    def __init__(self, family_limit: int = DEFAULT_FAMILY_LIMIT, store=None, host: str = ""):
        self.family_limit = family_limit
        self.store = store
        self.host = host            # this host's name in a cluster (a placement's key)
        self.tickets: dict[str, Ticket] = {}
        self.slots: dict[str, list[CloneSlot]] = {}
        self._seq = 0
        # Told of every change of state (and of a ticket forgotten): the master's copy follows.
        self.on_change: Callable[[Ticket], None] = lambda t: None

    # -- persistence -------------------------------------------------------
    def _save(self, ticket_id: str) -> None:
        t = self.tickets.get(ticket_id)
        if self.store is None or t is None:
            return
        if t.state == TicketState.JOINED:   # nothing left to answer for
            self.store.delete_ticket(t.id)
            return
        body = {**asdict(t), "state": t.state.value, "seq": self._seq,
                "slots": [s.to_json() for s in self.slots.get(t.id, [])]}
        self.store.put_ticket(t.id, body)

    def restore(self, alive: set[str]) -> list[Ticket]:
        """After a restart, from the store. `alive`: the VMs re-attached. A clone
        that did not survive ends as failed; a ticket caught mid-clone is spent
        (its half-started clones were reaped). Returns the used tickets whose
        owner is gone: their clones must go too."""
        orphans = []
        for body in self.store.tickets() if self.store is not None else []:
            slots_json = body.pop("slots", [])
            self._seq = max(self._seq, int(body.pop("seq", 0)))
            t = Ticket(**{**body, "state": TicketState(body["state"])})
            if t.state == TicketState.CLONING:
                t = t.with_(state=TicketState.KILLED)
            slots = []
            for sj in slots_json:
                slot = CloneSlot(index=sj["index"], vm=sj["vm"], on_end=self._saver(t.id))
                if sj["ended"]:
                    slot.status, slot.failure = sj["status"], sj["failure"]
                    slot.ended.set()
                slots.append(slot)
            self.tickets[t.id] = t
            self.slots[t.id] = slots
            for slot in slots:
                if not slot.ended.is_set() and slot.vm not in alive:
                    slot.finish(failure="lost while hostd was down")
            if t.owner not in alive and t.state in (TicketState.CLONED, TicketState.KILLED):
                orphans.append(t)
            elif t.owner not in alive:
                self.forget(t)
                continue
            self._save(t.id)
        return orphans

    def _saver(self, ticket_id: str) -> Callable[[], None]:
        return lambda: self._save(ticket_id)

    # -- reservations ----------------------------------------------------
    def reserved(self, family: str | None = None) -> tuple[int, int]:
        """(MiB, vCPUs) held by granted tickets (of one family) whose clones do not run yet."""
        self.expire_unused()
        held = [t for t in self.tickets.values() if t.state in (TicketState.GRANTED, TicketState.CLONING)
                and (family is None or t.family == family)]
        return sum(self._here(t) * t.mem_mb for t in held), sum(self._here(t) * t.cpus for t in held)

    def _here(self, t: Ticket) -> int:
        """Clones of the ticket this host holds room for."""
        return t.granted if t.placement is None else t.placement.get(self.host, 0)

    def expire_unused(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for t in list(self.tickets.values()):
            if t.state == TicketState.GRANTED and now - t.created > UNUSED_TICKET_EXPIRY:
                self.set_state(t, TicketState.KILLED)

    def outstanding(self, family: str) -> int:
        """Tickets of a family not yet joined, killed or expired."""
        self.expire_unused()
        return sum(1 for t in self.tickets.values() if t.family == family
                   and t.state in (TicketState.GRANTED, TicketState.CLONING, TicketState.CLONED))

    def family_load(self, family: str) -> int:
        """Clone slots of a family in use or reserved."""
        total = 0
        for t in self.tickets.values():
            if t.family != family:
                continue
            if t.state in (TicketState.GRANTED, TicketState.CLONING):
                total += t.granted
            elif t.state == TicketState.CLONED:
                total += sum(1 for s in self.slots.get(t.id, []) if not s.ended.is_set())
        return total

    def grant(self, owner: str, family: str, n: int, host_room: int, mem_mb: int, cpus: int,
              timeout: float | None, resources: dict | None = None) -> Ticket:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UsageError(f"request_ticket: n must be an integer >= 1 (got {n!r})")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise UsageError(f"request_ticket: timeout must be a positive number of seconds (got {timeout!r})")
        if resources is not None:
            if not isinstance(resources, dict):
                raise UsageError(f"request_ticket: resources must be an object of settings (got {resources!r})")
            try:
                resources = parse_changes(resources, cpus)
            except UsageError as exc:
                raise UsageError(f"request_ticket: resources: {exc}") from None
        family_room = max(0, self.family_limit - self.family_load(family))
        granted = min(n, family_room, host_room)
        if granted < 1:
            why = (f"family {family} already has {self.family_limit} clones (its limit)"
                   if family_room < 1 else "the host has no memory or CPU left for a clone")
            raise CapacityError(f"request_ticket({n}) in VM {owner}: {why}")
        self._seq += 1
        ticket = Ticket(id=f"{owner}-t{self._seq}", owner=owner, family=family, requested=n,
                        granted=granted, mem_mb=mem_mb, cpus=cpus,
                        timeout=float(timeout) if timeout else None, resources=resources)
        self.tickets[ticket.id] = ticket
        self._save(ticket.id)
        return ticket

    def placed(self, t: Ticket, placement: dict[str, int]) -> Ticket:
        """The master placed the ticket's clones (it may grant fewer)."""
        t = t.with_(placement=dict(placement), granted=sum(placement.values()))
        self.tickets[t.id] = t
        self._save(t.id)
        return t

    # -- use -------------------------------------------------------------
    def get(self, ticket_id: object, caller: str) -> Ticket:
        if not isinstance(ticket_id, str) or not ticket_id:
            raise UsageError(f"a ticket id is a string (got {ticket_id!r})")
        self.expire_unused()
        t = self.tickets.get(ticket_id)
        if t is None:
            raise TicketError(f"no ticket {ticket_id} (tickets come from request_ticket in the parent)")
        if t.owner != caller:
            raise RoleError(f"ticket {ticket_id} belongs to VM {t.owner}, not to VM {caller} "
                            "(join, kill and clone are for the VM that requested the ticket)")
        return t

    def start_use(self, ticket_id: object, caller: str) -> Ticket:
        t = self.get(ticket_id, caller)
        if t.state != TicketState.GRANTED:
            raise TicketError(f"ticket {t.id} was already used or expired ({t.state.value}); "
                              "request a new one")
        t = self.set_state(t, TicketState.CLONING)
        return t

    def set_state(self, t: Ticket, state: TicketState, **changes) -> Ticket:
        t = t.with_(state=state, **changes)
        self.tickets[t.id] = t
        self._save(t.id)
        self.on_change(t)
        return t

    def register_slots(self, t: Ticket, vms: list[str]) -> list[CloneSlot]:
        """The clones a ticket is about to start, by clone ID (1..m)."""
        slots = [CloneSlot(index=i + 1, vm=name, on_end=self._saver(t.id)) for i, name in enumerate(vms)]
        self.slots[t.id] = slots
        self._save(t.id)
        return slots

    def cloned(self, t: Ticket, slots: list[CloneSlot]) -> Ticket:
        self.slots[t.id] = slots
        return self.set_state(t, TicketState.CLONED, cloned_at=time.time())

    def give_back(self, t: Ticket) -> None:
        """A clone attempt failed before any clone ran: the ticket is spent."""
        self.set_state(t, TicketState.KILLED)

    def slot_of(self, vm: str) -> tuple[Ticket, CloneSlot] | None:
        """The live clone slot VM `vm` fills (a name comes back with its ID, so
        ended slots of earlier tickets may carry the same name)."""
        for tid, slots in self.slots.items():
            for s in slots:
                if s.vm == vm and not s.ended.is_set():
                    return self.tickets[tid], s
        return None

    def owned_by(self, owner: str) -> list[Ticket]:
        return [t for t in self.tickets.values() if t.owner == owner]

    def forget(self, t: Ticket) -> None:
        gone = self.tickets.pop(t.id, None)
        self.slots.pop(t.id, None)
        if gone is not None and gone.state in (TicketState.GRANTED, TicketState.CLONING, TicketState.CLONED):
            self.on_change(gone.with_(state=TicketState.KILLED))
        if self.store is not None:
            self.store.delete_ticket(t.id)
