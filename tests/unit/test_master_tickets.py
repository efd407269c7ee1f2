"""The master holds a ticket's room on every host it placed clones on, from
the grant until its clones run (then their hosts' heartbeats count them) or it
ends; a hostd holds only its own share. No VMs, no network: the master's
operations are called as its wire server would."""
from __future__ import annotations

import asyncio
import time

import pytest

from sfmpi.errors import CapacityError, TicketError, UsageError
from sfmpi.hostd.guestapi.tickets import TicketBook, TicketState
from sfmpi.hostd.master import daemon
from sfmpi.hostd.master.daemon import Master
from sfmpi.hostd.master.store import MasterStore

GiB = 1024


@pytest.fixture
def master(tmp_path, monkeypatch):
    monkeypatch.setattr(daemon, "DOWN_AFTER_S", 5.0)
    m = Master(tmp_path / "m", tmp_path / "keys", "127.0.0.1", 0)
    m.store = MasterStore(tmp_path / "master.db")
    for i, name in enumerate(("lab1", "lab2", "lab3"), 1):
        run(m.op_register(name, {"name": name, "address": f"172.31.254.{i}", "peer_port": 7441,
                                 "mem_mb": GiB, "vcpus": 16}))
    return m


def run(coro):
    return asyncio.run(coro)


def place(m, peer="lab1", n=6, ticket=None, room_here=None, allow_fewer=True):
    args = {"family": "p", "n": n, "mem_mb": 256, "cpus": 1, "allow_fewer": allow_fewer}
    if ticket:
        args.update(ticket=ticket, room_here=4 if room_here is None else room_here)
    return run(m.op_place(peer, args))["placement"]


def test_a_ticket_holds_its_room_on_every_host_until_its_clones_run(master):
    assert place(master, n=9, ticket="p-t1") == {"lab1": 3, "lab2": 3, "lab3": 3}
    # 4 clones of 256 MiB fit a 1 GiB host; the ticket holds 3 on each.
    assert place(master, n=3, allow_fewer=True) == {"lab1": 1, "lab2": 1, "lab3": 1}
    with pytest.raises(CapacityError):
        place(master, n=4, allow_fewer=False)
    # Its clones run: the hosts' heartbeats count them now, the reservation goes.
    assert run(master.op_ticket_state("lab1", {"ticket": "p-t1", "state": "running"})) == {"state": "running"}
    for name in ("lab1", "lab2", "lab3"):
        run(master.op_heartbeat(name, {"name": name, "used_mem_mb": 3 * 256, "used_vcpus": 3}))
    assert place(master, n=3, allow_fewer=False) == {"lab1": 1, "lab2": 1, "lab3": 1}
    assert run(master.op_ticket_state("lab1", {"ticket": "p-t1", "state": "ended"})) == {"state": "ended"}
    # An ended ticket stays ended.
    assert run(master.op_ticket_state("lab1", {"ticket": "p-t1", "state": "running"})) == {"state": "ended"}


def test_the_asking_host_has_the_last_word_on_its_share(master):
    assert place(master, n=6, ticket="p-t1", room_here=0) == {"lab2": 3, "lab3": 3}
    assert place(master, n=2, ticket="p-t2", room_here=1) == {"lab1": 1, "lab2": 1}


def test_a_host_names_only_its_own_tickets(master):
    place(master, n=2, ticket="p-t1")
    with pytest.raises(TicketError, match="no ticket lab2/p-t1"):
        run(master.op_ticket_state("lab2", {"ticket": "p-t1", "state": "ended"}))
    for bad in ("", "a/b", "x" * 101, 7, None):
        with pytest.raises(UsageError):
            run(master.op_ticket_state("lab1", {"ticket": bad, "state": "ended"}))
    with pytest.raises(UsageError):
        run(master.op_ticket_state("lab1", {"ticket": "p-t1", "state": "granted"}))
    with pytest.raises(Exception, match="exists already"):
        place(master, n=2, ticket="p-t1")


def test_the_sweep_frees_tickets_no_one_will_end(master):
    place(master, n=3, ticket="p-t1")
    place(master, peer="lab2", n=3, ticket="q-t1")
    now = time.time()
    for name in ("lab1", "lab3"):
        master.store.heartbeat(name, 0, 0, now + 6)
    assert master.sweep(now + 6) == ["lab2"]
    assert master.store.ticket("lab2/q-t1")["state"] == "failed"     # its parent's host is down
    assert master.store.ticket("lab1/p-t1")["state"] == "granted"
    master.store.heartbeat("lab1", 0, 0, now + daemon.TICKET_UNUSED_S + 10)
    master.store.heartbeat("lab3", 0, 0, now + daemon.TICKET_UNUSED_S + 10)
    master.sweep(now + daemon.TICKET_UNUSED_S + 10)
    assert master.store.ticket("lab1/p-t1")["state"] == "failed"     # never used, never ended


def test_a_hostd_holds_only_its_share_and_tells_of_each_change():
    book = TicketBook(host="lab1")
    heard = []
    book.on_change = lambda t: heard.append(t.state)
    t = book.grant("p", "p", 6, host_room=6, mem_mb=256, cpus=1, timeout=None)
    assert book.reserved() == (6 * 256, 6)
    t = book.placed(t, {"lab1": 2, "lab2": 2, "lab3": 1})
    assert t.granted == 5 and book.reserved() == (2 * 256, 2)
    t = book.start_use(t.id, "p")
    book.cloned(t, book.register_slots(t, ["p-1", "p-2", "p-3", "p-4", "p-5"]))
    assert book.reserved() == (0, 0)
    book.forget(book.tickets[t.id])
    assert heard == [TicketState.CLONING, TicketState.CLONED, TicketState.KILLED]
