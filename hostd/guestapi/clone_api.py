"""hostd's side of the clone API: requests from programs inside VMs.

The agent in a VM forwards ticket/clone/checkpoint/create_clones/exit/join/kill
(docs/clone-api.md) as {"req": R, "op": ...}; each is answered with
{"re": R, ...}. A clone call is answered in every copy of the VM: the parent
gets ID 0 after all clones have re-identified themselves and returned from
their own copy of the same call.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Protocol

from sfmpi.errors import (BusyError, CapacityError, CloneError, RoleError, SfmpiError, TicketError,
                          UsageError)

from ..resources.settings import merged
from ..state.records import VmRecord, VmRole
from .channel import AgentChannel
from .tickets import Ticket, TicketBook, TicketState

if TYPE_CHECKING:  # types only: the clone API reaches VMs through CloneHost
    from ..fork.manifest import Checkpoint
    from ..vm.registry import Vm


class CloneHost(Protocol):
    """What the clone API needs of the rest of hostd, and nothing more
    (hostd/daemon/host.py implements it; unit tests fake it)."""

    def vm(self, name: str) -> "Vm | None": ...
    def room(self, family: str, mem_mb: int, cpus: int) -> int: ...
    def room_here(self, family: str, mem_mb: int, cpus: int) -> int: ...

    async def place_ticket(self, family: str, n: int, mem_mb: int, cpus: int,
                           ticket: str, room_here: int) -> dict[str, int] | None: ...
    def check_ticket_quota(self, family: str) -> None: ...
    def check_checkpoint_quota(self, family: str) -> None: ...
    async def checkpoint(self, name: str, mode: str, guest_req: int | None, ticket: str) -> "Checkpoint": ...
    def checkpoint_of_family(self, ckpt_id: str, family: str) -> "Checkpoint": ...
    async def clone_for_ticket(self, ckpt: "Checkpoint", count: int, ticket: str, greeting: dict,
                               on_reserved: Callable[[list[str]], None]) -> dict: ...
    def is_member(self, name: str) -> bool: ...
    async def forward_exit(self, name: str, status: int) -> bool: ...
    def identity_of(self, name: str) -> dict: ...
    def family_hosts(self, name: str) -> list[list[str]]: ...
    async def stop_vm(self, name: str) -> None: ...
    def ticket_ended(self, ticket: str) -> None: ...

log = logging.getLogger("sfmpi.hostd.clone_api")

# In-guest clone: the parent is stopped while its RAM is copied (~0.2 s for
# 512 MiB). Its caller waits for the clones anyway, and this is the fastest
# consistent snapshot end to end (the background snapshot streams for seconds).
GUEST_CLONE_MODE = "paused"


class CloneApi:
    def __init__(self, host: CloneHost, tickets: TicketBook):
        self.host = host
        self.tickets = tickets
        self._timeouts: dict[str, asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()   # referenced until done

    def _spawn_task(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def attach(self, vm: "Vm") -> None:
        assert vm.agent is not None
        vm.agent.on_request = self.handle

    # -- dispatch --------------------------------------------------------
    async def handle(self, channel: AgentChannel, msg: dict) -> None:
        req_id, op = msg.get("req"), msg.get("op")
        vm = self.host.vm(channel.vm_name)
        if vm is None:
            return
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            await channel.answer(req_id, error=("UsageError", f"unknown clone-API op {op!r}"))
            return
        log.info("VM %s: %s (request %s)", vm.rec.name, op, req_id)
        try:
            result = await handler(vm, req_id, msg)
        except SfmpiError as exc:
            log.info("VM %s: %s (request %s) failed: %s", vm.rec.name, op, req_id, exc)
            await channel.answer(req_id, error=(type(exc).__name__, str(exc)))
            return
        except Exception as exc:  # a bug must reach the caller, not hang it
            log.exception("VM %s: %s failed", vm.rec.name, op)
            await channel.answer(req_id, error=("HostdError", f"{op} failed in hostd: {exc}"))
            return
        log.info("VM %s: %s (request %s) done", vm.rec.name, op, req_id)
        if result is not None:
            await channel.answer(req_id, result)

    def _clone_slot(self, vm: "Vm"):
        return self.tickets.slot_of(vm.rec.name)

    def _require_parent_role(self, vm: "Vm", op: str) -> None:
        if vm.rec.role == VmRole.RECEIVER:
            raise RoleError(f"{op}: VM {vm.rec.name} is a checkpoint receiver")

    # -- ops -------------------------------------------------------------
    async def op_ticket(self, vm: "Vm", _req, msg: dict) -> dict:
        spec = vm.rec.spec
        family = vm.rec.family or vm.rec.name
        self.host.check_ticket_quota(family)
        room = self.host.room(family, spec["mem_mb"], spec["cpus"])
        # Before the grant: once granted, the ticket holds its room here (all of
        # it, its remote share too, until the master places it), and this
        # host's share would be counted as taken by the ticket itself.
        here = self.host.room_here(family, spec["mem_mb"], spec["cpus"])
        t = self.tickets.grant(vm.rec.name, family, msg.get("n"), room,
                               spec["mem_mb"], spec["cpus"], msg.get("timeout"), msg.get("resources"))
        try:
            placement = await self.host.place_ticket(family, t.granted, spec["mem_mb"], spec["cpus"], t.id, here)
        except BaseException:
            self.tickets.forget(t)
            raise
        if placement is not None:
            t = self.tickets.placed(t, placement)
        log.info("VM %s: ticket %s grants %d of %d", vm.rec.name, t.id, t.granted, t.requested)
        return {"ticket": t.to_wire()}

    async def op_clone(self, vm: "Vm", req_id, msg: dict) -> dict:
        t0 = time.monotonic()
        t = self.tickets.start_use(msg.get("ticket"), vm.rec.name)
        try:
            self.host.check_checkpoint_quota(vm.rec.family or vm.rec.name)
            ckpt = await self.host.checkpoint(vm.rec.name, GUEST_CLONE_MODE, None, t.id)
        except BaseException:
            self.tickets.give_back(t)
            raise
        return await self._spawn(vm, t, ckpt, req_id, t_request=t0)

    async def op_checkpoint(self, vm: "Vm", req_id, _msg: dict) -> dict:
        if self._clone_slot(vm) is not None:
            raise RoleError(f"checkpoint_parent: VM {vm.rec.name} is a clone")
        self.host.check_checkpoint_quota(vm.rec.family or vm.rec.name)
        res = await self.host.checkpoint(vm.rec.name, GUEST_CLONE_MODE, req_id, "")
        return {"checkpoint": {"id": res.id, "family": res.family}, "id": 0}

    async def op_create_clones(self, vm: "Vm", _req, msg: dict) -> dict:
        ckpt_id = msg.get("checkpoint")
        if not isinstance(ckpt_id, str):
            raise UsageError(f"create_clones: checkpoint must be an id (got {ckpt_id!r})")
        ckpt = self.host.checkpoint_of_family(ckpt_id, vm.rec.family or vm.rec.name)
        if ckpt.vm != vm.rec.name:
            raise RoleError(f"checkpoint {ckpt_id} is of VM {ckpt.vm}, not of VM {vm.rec.name}")
        t = self.tickets.start_use(msg.get("ticket"), vm.rec.name)
        # The clones resume inside the parent's checkpoint call: that call's
        # request id (recorded in the checkpoint) is what they are answered on.
        req = ckpt.guest_req
        if req is None:
            self.tickets.give_back(t)
            raise UsageError(f"checkpoint {ckpt_id} was not taken by checkpoint_parent() in the guest")
        res = await self._spawn(vm, t, ckpt, req)
        return {"clones": list(range(1, res["size"] + 1))}

    async def op_exit(self, vm: "Vm", _req, msg: dict) -> None:
        found = self._clone_slot(vm)
        status = msg.get("status", 0)
        if not isinstance(status, int) or isinstance(status, bool) or not 0 <= status <= 255:
            raise UsageError(f"exit: status must be an integer 0..255 (got {status!r})")
        if found is None and await self.host.forward_exit(vm.rec.name, status):
            return None      # a clone of another host's ticket: that host has its slot
        if found is None:
            raise RoleError(f"exit: VM {vm.rec.name} is not a clone (only clones call exit)")
        _t, slot = found
        slot.finish(status=status)
        # Not inside this request's task: stopping the VM cancels its requests.
        self._spawn_task(self._destroy(vm.rec.name))
        return None

    async def op_join(self, vm: "Vm", _req, msg: dict) -> dict:
        t = self._owned_used_ticket(vm, msg.get("ticket"), "join")
        slots = self.tickets.slots.get(t.id, [])
        timeout = msg.get("timeout")
        waits = [s.ended.wait() for s in slots]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), timeout if timeout else None)
        except asyncio.TimeoutError:
            raise TicketError(f"join({t.id}): clones still running after {timeout} s") from None
        self.tickets.set_state(t, TicketState.JOINED)
        self._cancel_timeout(t)
        self.host.ticket_ended(t.id)
        return {"statuses": {str(s.index): s.status for s in slots if s.failure is None},
                "failures": {str(s.index): s.failure for s in slots if s.failure is not None}}

    async def op_members(self, vm: "Vm", _req, msg: dict) -> dict:
        """Who the ticket's clones are and how they stand: what a launcher needs to
        address them (clone IDs and network IDs differ once a family had tickets)."""
        t = self._owned_used_ticket(vm, msg.get("ticket"), "members")
        out = []
        for s in self.tickets.slots.get(t.id, []):
            # A VM stopped a moment ago may be gone before its slot is finished.
            gone = not s.ended.is_set() and not self.host.is_member(s.vm)
            ident = self.host.identity_of(s.vm) if not (s.ended.is_set() or gone) else {}
            state = ("failed" if gone else "running" if not s.ended.is_set()
                     else "exited" if s.failure is None else "failed")
            failure = f"its VM {s.vm} is gone" if gone else s.failure
            out.append({"id": s.index, "vm": s.vm, "state": state, "ip": ident.get("ip"),
                        "hostname": ident.get("hostname"), "status": s.status, "failure": failure})
        return {"members": out}

    async def op_kill(self, vm: "Vm", _req, msg: dict) -> dict:
        t = self._owned_used_ticket(vm, msg.get("ticket"), "kill", allow_granted=True)
        killed = await self.kill_ticket(t, "killed by the parent")
        return {"killed": killed}

    def _owned_used_ticket(self, vm: "Vm", ticket_id, op: str, allow_granted: bool = False) -> Ticket:
        t = self.tickets.get(ticket_id, vm.rec.name)  # RoleError in a clone: the parent owns it
        if t.state == TicketState.GRANTED and not allow_granted:
            raise TicketError(f"{op}: ticket {t.id} has not been used for a clone yet")
        if t.state == TicketState.CLONING and op in ("join", "kill"):
            # (from another thread of the parent) Its clones are not all registered
            # yet: a join would return at once, a kill miss the ones still to come.
            raise BusyError(f"{op}: ticket {t.id} is being cloned (its clone call has not returned)")
        if t.state == TicketState.JOINED and op == "join":
            raise TicketError(f"join: ticket {t.id} was already {t.state.value}")
        return t

    # -- clones ----------------------------------------------------------
    async def _spawn(self, parent: "Vm", t: Ticket, ckpt, req_id, t_request: float | None = None) -> dict:
        t0 = time.monotonic()
        t_request = t0 if t_request is None else t_request
        if t.resources is not None:
            # The ticket says otherwise: its clones start with the parent's
            # settings changed by the ticket's (and the checkpoint travels so to other hosts).
            ckpt = replace(ckpt, resources=merged(ckpt.resources, t.resources))
        def register(names: list[str]) -> None:
            # Before any clone runs: one may call exit the moment it resumes.
            self.tickets.register_slots(t, names)
        try:
            res = await self.host.clone_for_ticket(
                ckpt, count=t.granted, ticket=t.id, on_reserved=register, placement=t.placement,
                # A description, not a function: it may travel to the clone hosts of a fork across hosts.
                greeting={"kind": "ticket", "re": req_id, "size": t.granted, "ticket": t.id})
        except BaseException as exc:
            # Whatever failed (a bug too), the ticket is spent, not left cloning
            # with its room held, and no clone of it runs on.
            live = [s.vm for s in self.tickets.slots.get(t.id, []) if not s.ended.is_set()]
            for slot in self.tickets.slots.get(t.id, []):
                slot.finish(failure=f"clone failed: {exc}")
            self.tickets.give_back(t)
            await self._stop_all([name for name in live if self.host.vm(name) is not None])
            self.host.ticket_ended(t.id)
            if isinstance(exc, CapacityError) or not isinstance(exc, SfmpiError):
                raise
            raise CloneError(f"clone with ticket {t.id}: {exc}") from exc
        slots = self.tickets.slots[t.id]
        self.tickets.cloned(t, slots)
        if t.timeout:
            self._timeouts[t.id] = self._spawn_task(self._expire(t, t.timeout))
        log.info("VM %s: ticket %s cloned %d in %.0f ms", parent.rec.name, t.id, len(slots),
                 (time.monotonic() - t0) * 1000.0)
        me = self.host.identity_of(parent.rec.name)
        return {"id": 0, "size": t.granted, "ticket": t.id, "family": me.get("family"),
                "ip": me.get("ip"), "hostname": me.get("hostname"),
                "hosts": self.host.family_hosts(parent.rec.name),
                # From the call reaching hostd: checkpoint, then all clones resumed,
                # then all returned from their call (re-identified).
                "timings": {"checkpoint_ms": (t0 - t_request) * 1000.0, "clones_ms": res["total_ms"],
                            "resumed_ms": (t0 - t_request) * 1000.0 + res["resumed_ms"],
                            "total_ms": (time.monotonic() - t_request) * 1000.0}}

    def member_ended(self, name: str, status: int | None = None, reason: str | None = None) -> None:
        """A clone of a ticket on another host exited (status) or is gone (reason)."""
        found = self.tickets.slot_of(name)
        if found is not None:
            found[1].finish(status=status, failure=None if status is not None else reason or "gone")

    def vm_gone(self, rec: VmRecord, reason: str) -> None:
        """A VM ended (stopped, crashed): finish its slot; a parent takes its clones along."""
        name = rec.name
        found = self.tickets.slot_of(name)
        if found is not None:
            found[1].finish(failure=reason)
        for t in self.tickets.owned_by(name):
            if t.state in (TicketState.CLONED, TicketState.CLONING):
                self._spawn_task(self._kill_and_forget(t, f"parent {name} is gone"))
            else:
                self.tickets.forget(t)

    async def _kill_and_forget(self, t: Ticket, reason: str) -> None:
        """No one is left to join these clones: end them and drop the ticket."""
        await self.kill_ticket(t, reason)
        self.tickets.forget(t)

    async def kill_ticket(self, t: Ticket, reason: str) -> list[int]:
        slots = self.tickets.slots.get(t.id, [])
        live = [s for s in slots if not s.ended.is_set()]
        for s in live:
            s.finish(failure=reason)
        await self._stop_all([s.vm for s in live])
        now = self.tickets.tickets.get(t.id)   # a join may have returned meanwhile: it stays joined
        if now is not None and now.state != TicketState.JOINED:
            self.tickets.set_state(now, TicketState.KILLED)
        self._cancel_timeout(t)
        self.host.ticket_ended(t.id)
        return [s.index for s in live]

    def restored(self, orphans: list[Ticket]) -> None:
        """After hostd restarted (TicketBook.restore): clones of a parent that is
        gone go too, and the timeouts of running tickets run on from where they were."""
        for t in orphans:
            self._spawn_task(self._kill_and_forget(t, f"parent {t.owner} is gone"))
        for t in self.tickets.tickets.values():
            if t.state == TicketState.CLONED and t.timeout and t not in orphans:
                left = max(0.0, t.timeout - (time.time() - (t.cloned_at or t.created)))
                self._timeouts[t.id] = self._spawn_task(self._expire(t, left))

    async def _expire(self, t: Ticket, after: float) -> None:
        await asyncio.sleep(after)
        # From here on nothing may cancel it: a kill or join that comes while it
        # stops the clones finds their slots ended already and stops none itself.
        if self._timeouts.get(t.id) is asyncio.current_task():
            del self._timeouts[t.id]
        slots = self.tickets.slots.get(t.id, [])
        late = [s for s in slots if not s.ended.is_set()]
        for s in late:
            s.finish(failure=f"timeout: still running after {t.timeout:g} s")
        await asyncio.gather(*(self._destroy(s.vm) for s in late), return_exceptions=True)
        if late:
            log.warning("ticket %s: killed %d clone(s) past the %g s timeout", t.id, len(late), t.timeout)

    def _cancel_timeout(self, t: Ticket) -> None:
        task = self._timeouts.pop(t.id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _stop_all(self, names: list[str]) -> None:
        """Stop clones whose slots are ended already, in a task of the clone API's
        own: the request that asks may be cancelled meanwhile (stopping the parent
        ends its calls in progress), and nobody else would stop them then."""
        if names:
            await asyncio.shield(self._spawn_task(
                asyncio.gather(*(self._destroy(name) for name in names), return_exceptions=True)))

    async def _destroy(self, name: str) -> None:
        with contextlib.suppress(SfmpiError):
            await self.host.stop_vm(name)
