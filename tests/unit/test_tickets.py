"""Tickets: what request_ticket grants, and who may use, join or kill them."""
from __future__ import annotations

import pytest

from sfmpi.errors import CapacityError, RoleError, TicketError, UsageError
from sfmpi.hostd.guestapi.tickets import CloneSlot, TicketBook, TicketState


def grant(book, n=4, room=100, owner="p", family="p", timeout=None):
    return book.grant(owner, family, n, room, 512, 1, timeout)


def test_grants_at_most_what_host_and_family_hold():
    book = TicketBook(family_limit=6)
    assert grant(book, n=4).granted == 4
    assert grant(book, n=4).granted == 2          # family limit 6, 4 reserved
    with pytest.raises(CapacityError, match="family p already has 6"):
        grant(book, n=1)
    assert grant(book, n=5, family="q", owner="q", room=3).granted == 3   # host room


def test_no_host_room_is_a_capacity_error():
    with pytest.raises(CapacityError, match="no memory or CPU left"):
        grant(TicketBook(), room=0)


@pytest.mark.parametrize("n", [0, -1, "4", 2.5, True, None])
def test_bad_n(n):
    with pytest.raises(UsageError, match="n must be an integer"):
        grant(TicketBook(), n=n)


@pytest.mark.parametrize("timeout", [0, -5, "x"])
def test_bad_timeout(timeout):
    with pytest.raises(UsageError, match="timeout"):
        grant(TicketBook(), timeout=timeout)


def test_a_ticket_carries_checked_settings_for_its_clones():
    book = TicketBook()
    t = book.grant("p", "p", 2, 100, 512, 2, None, {"priority": "low", "cpu_limit": "50",
                                                    "net_rate": "10mbit", "cpu_shares": None})
    assert t.resources == {"priority": "low", "cpu_limit": 50.0, "net_rate": 10_000_000, "cpu_shares": None}
    assert t.to_wire()["resources"] == t.resources
    assert grant(book).resources is None and grant(book).to_wire()["resources"] is None


@pytest.mark.parametrize("resources, says", [
    ({"cpu_speed": 5}, "unknown setting"),
    ({"cpu_limit": 500}, "--cpu-limit is in percent"),       # 2 vCPUs: at most 200
    ({"priority": "urgent"}, "--priority must be"),
    ({"net_rate": "fast"}, "as a rate"),
    (["priority", "low"], "resources must be an object"),
])
def test_bad_ticket_settings_are_refused_and_grant_nothing(resources, says):
    book = TicketBook()
    with pytest.raises(UsageError, match=f"request_ticket: .*{says}"):
        book.grant("p", "p", 2, 100, 512, 2, None, resources)
    assert book.tickets == {} and book.reserved() == (0, 0)


def test_reservations_count_until_clones_run():
    book = TicketBook()
    t = grant(book, n=3)
    assert book.reserved() == (3 * 512, 3)
    t = book.start_use(t.id, "p")
    assert book.reserved() == (3 * 512, 3)        # cloning: still held
    book.cloned(t, [CloneSlot(i, f"p-{i}") for i in (1, 2, 3)])
    assert book.reserved() == (0, 0)               # now they are VMs


def test_a_ticket_is_used_once():
    book = TicketBook()
    t = grant(book)
    book.start_use(t.id, "p")
    with pytest.raises(TicketError, match="already used"):
        book.start_use(t.id, "p")


def test_unknown_ticket_and_wrong_owner():
    book = TicketBook()
    t = grant(book)
    with pytest.raises(TicketError, match="no ticket nope"):
        book.start_use("nope", "p")
    with pytest.raises(RoleError, match="belongs to VM p, not to VM p-1"):
        book.start_use(t.id, "p-1")
    with pytest.raises(UsageError):
        book.get(42, "p")


def test_family_load_counts_live_clones_only():
    book = TicketBook(family_limit=4)
    t = book.start_use(grant(book, n=3).id, "p")
    slots = [CloneSlot(i, f"p-{i}") for i in (1, 2, 3)]
    book.cloned(t, slots)
    assert book.family_load("p") == 3
    slots[0].finish(status=0)
    slots[1].finish(failure="crashed")
    assert book.family_load("p") == 1
    assert grant(book, n=9).granted == 3
    assert book.slot_of("p-3") == (book.tickets[t.id], slots[2])
    assert book.tickets[t.id].state == TicketState.CLONED


def test_slot_finishes_once():
    s = CloneSlot(1, "p-1")
    s.finish(status=3)
    s.finish(failure="killed")
    assert (s.status, s.failure) == (3, None)


def test_unused_ticket_expires_and_frees_its_room():
    book = TicketBook()
    t = grant(book, n=2)
    book.expire_unused(now=t.created + 10)
    assert book.reserved() == (2 * 512, 2)
    book.expire_unused(now=t.created + 10_000)
    assert book.reserved() == (0, 0)
    with pytest.raises(TicketError, match="expired"):
        book.start_use(t.id, "p")


def test_slot_of_finds_the_live_slot_when_a_name_comes_back():
    book = TicketBook()
    t1 = book.start_use(grant(book, n=1).id, "p")
    old = CloneSlot(1, "p-1")
    book.cloned(t1, [old])
    old.finish(status=0)
    t2 = book.start_use(grant(book, n=1).id, "p")
    new = CloneSlot(1, "p-1")
    book.cloned(t2, [new])
    assert book.slot_of("p-1") == (book.tickets[t2.id], new)
    new.finish(status=1)
    assert book.slot_of("p-1") is None


# -- kept in the store across a hostd restart ---------------------------------

def _used(book, owner="p", vms=("p-1", "p-2", "p-3"), timeout=None):
    t = book.start_use(grant(book, n=len(vms), owner=owner, family=owner, timeout=timeout).id, owner)
    slots = book.register_slots(t, list(vms))
    return book.cloned(t, slots), slots


def test_a_restarted_book_knows_its_tickets_and_what_became_of_each_clone(tmp_path):
    from sfmpi.hostd.state.store import Store
    store = Store(tmp_path / "state.db")
    book = TicketBook(store=store)
    t, slots = _used(book, timeout=30)
    slots[0].finish(status=7)                       # exited before the restart
    spare = grant(book, n=1)                        # granted, not used yet
    # hostd restarts; p-2 survived, p-3 did not.
    again = TicketBook(store=Store(tmp_path / "state.db"))
    assert again.restore(alive={"p", "p-2"}) == []
    t2 = again.get(t.id, "p")
    assert t2.state == TicketState.CLONED and t2.timeout == 30 and t2.cloned_at == t.cloned_at
    s1, s2, s3 = again.slots[t.id]
    assert (s1.ended.is_set(), s1.status) == (True, 7)
    assert not s2.ended.is_set() and again.slot_of("p-2") == (t2, s2)
    assert s3.failure == "lost while hostd was down"
    assert again.get(spare.id, "p").state == TicketState.GRANTED
    # ... and ticket numbers go on from where they were.
    assert grant(again, n=1).id not in (t.id, spare.id)
    # A ticket's settings for its clones survive too.
    low = again.grant("p", "p", 1, 100, 512, 1, None, {"priority": "low"})
    fourth = TicketBook(store=Store(tmp_path / "state.db"))
    fourth.restore(alive={"p", "p-2"})
    assert fourth.get(low.id, "p").resources == {"priority": "low"}
    # What the restarted hostd learns is written through too.
    s2.finish(status=0)
    third = TicketBook(store=Store(tmp_path / "state.db"))
    third.restore(alive={"p"})
    assert [s.status for s in third.slots[t.id]] == [7, 0, None]


def test_a_joined_ticket_leaves_the_store_and_one_caught_mid_clone_is_spent(tmp_path):
    from sfmpi.hostd.state.store import Store
    store = Store(tmp_path / "state.db")
    book = TicketBook(store=store)
    t, slots = _used(book, vms=("p-1",))
    slots[0].finish(status=0)
    book.set_state(t, TicketState.JOINED)
    mid = book.start_use(grant(book, n=1).id, "p")   # hostd dies while cloning
    again = TicketBook(store=store)
    again.restore(alive={"p"})
    with pytest.raises(TicketError):
        again.get(t.id, "p")
    assert again.get(mid.id, "p").state == TicketState.KILLED


def test_clones_of_a_parent_that_did_not_survive_are_orphans(tmp_path):
    from sfmpi.hostd.state.store import Store
    store = Store(tmp_path / "state.db")
    book = TicketBook(store=store)
    t, _ = _used(book, vms=("p-1",))
    spare = grant(book, n=1)
    again = TicketBook(store=store)
    orphans = again.restore(alive={"p-1"})           # the parent is gone, its clone runs
    assert [o.id for o in orphans] == [t.id]
    with pytest.raises(TicketError):
        again.get(spare.id, "p")                     # an unused ticket of a gone parent is dropped
