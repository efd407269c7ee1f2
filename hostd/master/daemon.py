"""The master daemon (`sfmpi master`): the cluster's registry of hosts and its placement.

hostds register with their capacity and send a heartbeat every HEARTBEAT_S
with what they use; a host silent for DOWN_AFTER_S is marked down and gets no
clone. A hostd forking across hosts asks `place` where its clones go (policy
pack or spread, per-family limits); `hosts` and `vms` are for the CLI (the
`admin` certificate). Every connection is mutual TLS with the cluster's keys
(hostd/cluster/keys.py): a caller is who its certificate says, and a host may
only speak for itself.

State (hosts, tickets) is in SQLite (store.py), so a restarted master knows
its hosts at once; they are up again with their next heartbeat.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

from sfmpi.errors import NotFound, RoleError, TicketError, UsageError

from ..cluster import keys, wire
from ..cluster.config import ADMIN_NAME, MASTER_NAME, PEER_PORT
from .placement import POLICIES, place
from .store import MasterStore

log = logging.getLogger("sfmpi.master")

HEARTBEAT_S = float(os.environ.get("SFMPI_HEARTBEAT_S", "1"))
DOWN_AFTER_S = float(os.environ.get("SFMPI_DOWN_AFTER_S", "5"))
FAMILY_CLONE_LIMIT = int(os.environ.get("SFMPI_MASTER_FAMILY_LIMIT", "64"))
# Longer than a hostd keeps an unused ticket (guestapi/tickets.py): its
# reservation here outlives the hostd's copy only when the end was not heard.
TICKET_UNUSED_S = 900.0


def _int(args: dict, key: str, low: int = 0) -> int:
    v = args.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise UsageError(f"{key} must be an integer >= {low} (got {v!r})")
    return v


def _str(args: dict, key: str, limit: int = 200) -> str:
    v = args.get(key)
    if not isinstance(v, str) or not v or len(v) > limit:
        raise UsageError(f"{key} must be a non-empty string (got {v!r})")
    return v


class Master:
    def __init__(self, directory: Path, keys_dir: Path, listen: str, port: int, policy: str = "spread"):
        if policy not in POLICIES:
            raise UsageError(f"policy is one of {', '.join(POLICIES)} (got {policy!r})")
        self.dir, self.keys_dir, self.listen, self.port, self.policy = Path(directory), Path(keys_dir), \
            listen, port, policy
        self.store: MasterStore | None = None
        self.server: wire.WireServer | None = None
        self.shutdown = asyncio.Event()
        self._client = None
        # Heartbeats sent while this master was not running were heard by
        # nobody: a host counts as silent only from this master's start on,
        # else a restart after DOWN_AFTER_S would fail every host's clones.
        self.started = time.time()

    def _handlers(self) -> dict:
        return {"ping": self.op_ping, "register": self.op_register, "heartbeat": self.op_heartbeat, "leave": self.op_leave,
                "place": self.op_place, "ticket.state": self.op_ticket_state, "hosts": self.op_hosts, "vms": self.op_vms, "stats": self.op_stats, "policy": self.op_policy,
                "vm.set": self.op_vm_set}

    async def run(self) -> None:
        os.umask(0o077)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.store = MasterStore(self.dir / "master.db")
        self._client = keys.client_context(self.keys_dir, MASTER_NAME)
        self.server = wire.WireServer(keys.server_context(self.keys_dir, MASTER_NAME), self._handlers())
        port = await self.server.start(self.listen, self.port)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.shutdown.set)
        log.info("master %d on %s:%d (policy %s)", os.getpid(), self.listen, port, self.policy)
        print(f"listening {port}", flush=True)
        self.started = time.time()
        watcher = asyncio.ensure_future(self._watch())
        try:
            await self.shutdown.wait()
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await self.server.close()
            self.store.close()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                self.sweep(time.time())
            except Exception:  # a bug or a sick disk: logged, and the watch goes on
                log.exception("marking silent hosts down")

    def sweep(self, now: float) -> list[str]:
        """Hosts that stopped answering are marked down (no clone goes there)
        and their tickets' slots there fail; the names of those hosts."""
        assert self.store is not None
        down = self.store.mark_stale(now, DOWN_AFTER_S, heard_since=self.started)
        for name in down:
            failed = self.store.fail_host_slots(name)
            log.warning("host %s missed its heartbeats for %g s: down (tickets with clones there: %s)",
                        name, DOWN_AFTER_S, ", ".join(failed) or "none")
        # No one is left to use or end these: their room goes back.
        for key in self.store.fail_tickets_of_down_hosts(now):
            log.warning("ticket %s failed: its parent's host is down", key)
        for key in self.store.expire_granted(now, TICKET_UNUSED_S):
            log.info("ticket %s expired unused (or its host's word that it ended was lost)", key)
        self.store.prune(now, 3600)
        return down

    def _rooms(self) -> list:
        assert self.store is not None
        return self.store.room(time.time(), DOWN_AFTER_S, heard_since=self.started)

    # -- operations ------------------------------------------------------
    @staticmethod
    def _as_host(peer: str, args: dict) -> str:
        name = _str(args, "name", 64)
        if name != peer:
            raise RoleError(f"{peer} may not speak for host {name}")
        return name

    async def op_ping(self, peer: str, _args: dict) -> dict:
        return {"pid": os.getpid(), "policy": self.policy, "you": peer}

    async def op_register(self, peer: str, args: dict) -> dict:
        name = self._as_host(peer, args)
        address = _str(args, "address", 64)
        wire_port = _int(args, "peer_port", 1)
        assert self.store is not None
        self.store.register(name, f"{address}:{wire_port}", _int(args, "mem_mb", 1), _int(args, "vcpus", 1),
                            time.time())
        log.info("host %s registered at %s:%d (%d MiB, %d vCPUs)", name, address, wire_port,
                 args["mem_mb"], args["vcpus"])
        return {"heartbeat_s": HEARTBEAT_S, "policy": self.policy}

    async def op_heartbeat(self, peer: str, args: dict) -> dict:
        name = self._as_host(peer, args)
        assert self.store is not None
        known = self.store.heartbeat(name, _int(args, "used_mem_mb"), _int(args, "used_vcpus"), time.time())
        # Every host's room, so a hostd can grant a guest's ticket without a round trip.
        rooms = [{"name": r.name, "free_mem_mb": r.free_mem_mb, "free_vcpus": r.free_vcpus, "up": r.up}
                 for r in self._rooms()]
        return {"registered": known, "rooms": rooms}

    async def op_leave(self, peer: str, args: dict) -> dict:
        """A hostd stopping cleanly: down at once, not DOWN_AFTER_S later."""
        name = self._as_host(peer, args)
        assert self.store is not None
        left = self.store.mark_down(name)
        if left:
            failed = self.store.fail_host_slots(name)
            log.info("host %s left (tickets with clones there: %s)", name, ", ".join(failed) or "none")
        return {"left": left}

    async def op_place(self, peer: str, args: dict) -> dict:
        """Where n clones of (mem_mb, cpus) go: {host: count}, with the hosts' addresses."""
        assert self.store is not None
        policy = args.get("policy") or self.policy
        rooms = self._rooms()
        family = _str(args, "family")
        mem_mb, cpus = _int(args, "mem_mb", 1), _int(args, "cpus", 1)
        ticket = args.get("ticket")
        if ticket is not None:
            # The asking host's own admission has the last word on its share.
            here = _int(args, "room_here")
            rooms = [replace(r, free_mem_mb=min(r.free_mem_mb, here * mem_mb), free_vcpus=min(r.free_vcpus, here * cpus))
                     if r.name == peer else r for r in rooms]
        placement = place(rooms, _int(args, "n", 1), mem_mb, cpus, policy,
                          allow_fewer=bool(args.get("allow_fewer")), first=peer,
                          family_limit=FAMILY_CLONE_LIMIT, family_held={family: self.store.held_by_family(family)})
        if ticket is not None:
            self.store.add_ticket(self._ticket_key(peer, ticket), family, peer, mem_mb, cpus, placement, time.time())
        addresses = {h["name"]: h["address"] for h in self.store.hosts()}
        log.info("placed %s for %s (family %s, policy %s%s; free vCPUs %s)", placement, peer, family, policy,
                 f", ticket {ticket}" if ticket else "",
                 ", ".join(f"{r.name} {r.free_vcpus}" for r in rooms))
        return {"placement": placement, "addresses": {h: addresses[h] for h in placement}}

    @staticmethod
    def _ticket_key(peer: str, ticket) -> str:
        """Ticket ids are a hostd's own: the master's key is host/id, and a host names only its own."""
        if not isinstance(ticket, str) or not 0 < len(ticket) <= 100 or "/" in ticket:
            raise UsageError(f"ticket must be a short id (got {ticket!r:.120})")
        return f"{peer}/{ticket}"

    async def op_ticket_state(self, peer: str, args: dict) -> dict:
        """The parent's host says a placed ticket's clones run (their hosts'
        heartbeats count them from now on) or that it ended (its room is free)."""
        assert self.store is not None
        key, state = self._ticket_key(peer, args.get("ticket")), args.get("state")
        if state not in ("running", "ended"):
            raise UsageError(f"ticket.state: state is running or ended (got {state!r:.40})")
        t = self.store.ticket(key)
        if t is None:
            raise TicketError(f"the master has no ticket {key}")
        if t["state"] in ("granted", "cloning", "running"):
            self.store.set_ticket_state(key, state)
        return {"state": self.store.ticket(key)["state"]}

    async def op_policy(self, peer: str, args: dict) -> dict:
        """The default placement from now on (admin only): `sfmpi lab policy pack|spread`."""
        if peer != ADMIN_NAME:
            raise RoleError(f"only {ADMIN_NAME} sets the placement policy (not {peer})")
        policy = args.get("policy")
        if policy not in POLICIES:
            raise UsageError(f"policy is one of {', '.join(POLICIES)} (got {policy!r})")
        self.policy = policy
        log.info("placement policy now %s", policy)
        return {"policy": policy}

    async def op_hosts(self, _peer: str, _args: dict) -> list[dict]:
        assert self.store is not None
        return self.store.hosts()

    async def op_vms(self, peer: str, _args: dict) -> list[dict]:
        """Every up host's VMs, each with its host (what `vm list` shows through the master)."""
        return await self._every_host(peer, "vm.list", "lists the cluster's VMs")

    async def op_stats(self, peer: str, _args: dict) -> list[dict]:
        """Every up host's latest statistics sample of each VM, with its host (`sfmpi stats latest --all`)."""
        return await self._every_host(peer, "stats.latest", "reads the cluster's statistics")

    async def op_vm_set(self, peer: str, args: dict) -> dict:
        """A VM's resource settings, on whichever up host runs it (`sfmpi vm set NAME --all`)."""
        name, settings = _str(args, "name"), args.get("settings")
        if not isinstance(settings, dict):
            raise UsageError("vm.set: settings must be an object")
        rows = await self._every_host(peer, "vm.list", "sets a VM's resources")
        on = [r["host"] for r in rows if r.get("name") == name]
        if not on:
            silent = sorted({r["host"] for r in rows if "error" in r})
            raise NotFound(f"no VM named {name} on any up host of the lab"
                           + (f" ({', '.join(silent)} did not answer)" if silent else ""))
        h = next(h for h in self.store.hosts() if h["name"] == on[0])
        res = await self._call_host(h, "vm.set", 30, name=name, settings=settings)
        log.info("vm set %s on %s: %s", name, h["name"], settings)
        return {**res, "host": h["name"]}

    async def _call_host(self, h: dict, op: str, timeout: float, **args):
        """Peer operation OP on host h (a row of the store's hosts), as the master."""
        host, _, port = h["address"].rpartition(":")
        return await wire.call(host, int(port or PEER_PORT), self._client, h["name"], op, timeout=timeout, **args)

    async def _every_host(self, peer: str, op: str, what: str) -> list[dict]:
        if peer != ADMIN_NAME:
            raise RoleError(f"only {ADMIN_NAME} {what} (not {peer})")
        assert self.store is not None
        hosts = [h for h in self.store.hosts() if h["state"] == "up"]

        async def of(h: dict) -> list[dict]:
            try:
                rows = await self._call_host(h, op, 15)
            except Exception as exc:  # one host's trouble does not hide the others
                return [{"host": h["name"], "error": str(exc)}]
            if not isinstance(rows, list):
                return [{"host": h["name"], "error": f"{op}: not a list"}]
            return [{**row, "host": h["name"]} for row in rows if isinstance(row, dict)]
        rows: list[dict] = []
        for part in await asyncio.gather(*(of(h) for h in hosts)):
            rows += part
        return rows


def serve(directory: Path, keys_dir: Path, listen: str, port: int, policy: str) -> None:
    asyncio.run(Master(directory, keys_dir, listen, port, policy).run())
