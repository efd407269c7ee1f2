"""The master's SQLite store: hosts, heartbeats, tickets and their slots."""
from __future__ import annotations

import sqlite3

import pytest

from sfmpi.errors import AlreadyExists, HostdError, TicketError, UsageError
from sfmpi.hostd.master.placement import HostRoom
from sfmpi.hostd.master.store import SCHEMA_VERSION, MasterStore


@pytest.fixture
def store(tmp_path):
    s = MasterStore(tmp_path / "master.db")
    yield s
    s.close()


def test_schema_version_recorded_and_wal(tmp_path):
    s = MasterStore(tmp_path / "master.db")
    assert s.version == SCHEMA_VERSION >= 1
    assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()


def test_a_newer_database_is_refused(tmp_path):
    path = tmp_path / "master.db"
    MasterStore(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(HostdError, match="newer sfmpi"):
        MasterStore(path)


def test_register_heartbeat_and_mark_stale(store):
    store.register("lab2", "10.0.0.2:7000", 8192, 16, now=100.0)
    store.register("lab1", "10.0.0.1:7000", 4096, 8, now=100.0)
    assert store.heartbeat("lab1", 1024, 2, now=130.0)
    assert not store.heartbeat("ghost", 0, 0, now=130.0)
    hosts = store.hosts()
    assert [h["name"] for h in hosts] == ["lab1", "lab2"]
    assert hosts[0] | {} == dict(name="lab1", address="10.0.0.1:7000", mem_mb=4096, vcpus=8, used_mem_mb=1024,
                                 used_vcpus=2, state="up", last_seen=130.0, registered_at=100.0)

    assert store.mark_stale(now=145.0, timeout=30.0) == ["lab2"]
    assert store.mark_stale(now=145.0, timeout=30.0) == []  # already down
    assert {h["name"]: h["state"] for h in store.hosts()} == {"lab1": "up", "lab2": "down"}

    assert store.heartbeat("lab2", 0, 0, now=150.0)  # it speaks again: up
    assert store.hosts()[1]["state"] == "up"


def test_register_again_updates_and_keeps_usage(store):
    store.register("lab1", "10.0.0.1:7000", 4096, 8, now=100.0)
    store.heartbeat("lab1", 512, 1, now=110.0)
    store.mark_stale(now=500.0, timeout=30.0)
    store.register("lab1", "10.0.0.9:7001", 2048, 4, now=600.0)
    (host,) = store.hosts()
    assert (host["address"], host["mem_mb"], host["vcpus"], host["state"]) == ("10.0.0.9:7001", 2048, 4, "up")
    assert (host["used_mem_mb"], host["registered_at"], host["last_seen"]) == (512, 600.0, 600.0)


@pytest.mark.parametrize("args", [("", "a:1", 1, 1), ("h", "", 1, 1), ("h", "a:1", 0, 1), ("h", "a:1", 1, True)])
def test_register_refuses_bad_input(store, args):
    with pytest.raises(UsageError):
        store.register(*args, now=1.0)


def test_remove(store):
    store.register("lab1", "a:1", 1024, 2, now=1.0)
    assert store.remove("lab1") and not store.remove("lab1")
    assert store.hosts() == []


def test_ticket_round_trip_and_states(store):
    store.add_ticket("t1", "fam", "lab2", 256, 1, {"lab2": 3, "lab1": 2}, now=10.0)
    t = store.ticket("t1")
    assert t["state"] == "granted" and t["family"] == "fam" and t["parent_host"] == "lab2"
    assert (t["mem_mb"], t["cpus"], t["created_at"], t["finished_at"]) == (256, 1, 10.0, None)
    assert list(t["placement"].items()) == [("lab2", 3), ("lab1", 2)]
    assert t["failed"] == {"lab2": 0, "lab1": 0}
    store.set_ticket_state("t1", "running")
    assert store.ticket("t1")["state"] == "running"
    store.end_ticket("t1", now=20.0)
    assert (store.ticket("t1")["state"], store.ticket("t1")["finished_at"]) == ("ended", 20.0)
    assert store.ticket("nope") is None


def test_ticket_errors(store):
    store.add_ticket("t1", "fam", "lab1", 256, 1, {"lab1": 1}, now=1.0)
    with pytest.raises(AlreadyExists):
        store.add_ticket("t1", "fam", "lab1", 256, 1, {"lab1": 1}, now=2.0)
    assert store.ticket("t1")["created_at"] == 1.0  # the failed add left nothing behind
    with pytest.raises(UsageError):
        store.add_ticket("t2", "fam", "lab1", 256, 1, {}, now=1.0)
    with pytest.raises(UsageError):
        store.set_ticket_state("t1", "sleeping")
    with pytest.raises(TicketError):
        store.set_ticket_state("nope", "ended")
    with pytest.raises(TicketError):
        store.end_ticket("nope")


def test_fail_host_slots_only_touches_live_tickets_once(store):
    store.add_ticket("t1", "fam", "lab1", 256, 1, {"lab1": 2, "lab2": 2}, now=1.0)
    store.add_ticket("t2", "fam", "lab2", 256, 1, {"lab2": 1}, now=1.0)
    store.add_ticket("t3", "other", "lab2", 256, 1, {"lab2": 4}, now=1.0)
    store.add_ticket("t4", "fam", "lab1", 256, 1, {"lab1": 1}, now=1.0)
    store.end_ticket("t3", now=2.0)
    assert store.fail_host_slots("lab2") == ["t1", "t2"]
    assert store.ticket("t1")["failed"] == {"lab1": 0, "lab2": 2}
    assert store.ticket("t3")["failed"] == {"lab2": 0}
    assert store.fail_host_slots("lab2") == []


def test_held_by_family_and_reserved_on(store):
    store.add_ticket("t1", "fam", "lab1", 256, 1, {"lab1": 2, "lab2": 3}, now=1.0)
    store.add_ticket("t2", "fam", "lab1", 512, 2, {"lab1": 1}, now=1.0)
    store.add_ticket("t3", "other", "lab1", 128, 1, {"lab1": 4}, now=1.0)
    assert store.held_by_family("fam") == 6
    assert store.reserved_on("lab1") == (2 * 256 + 512 + 4 * 128, 2 + 2 + 4)
    store.fail_host_slots("lab2")
    assert store.held_by_family("fam") == 3  # failed clones hold nothing
    store.end_ticket("t2")
    assert store.held_by_family("fam") == 2
    assert store.reserved_on("lab1") == (2 * 256 + 4 * 128, 6)
    assert store.held_by_family("nobody") == 0 and store.reserved_on("lab9") == (0, 0)


def test_room_subtracts_usage_and_reservations_not_yet_running(store):
    store.register("lab1", "a:1", 4096, 8, now=100.0)
    store.register("lab2", "b:1", 4096, 8, now=100.0)
    store.heartbeat("lab1", 1024, 2, now=110.0)
    store.add_ticket("t1", "fam", "lab1", 256, 1, {"lab1": 2}, now=110.0)
    store.add_ticket("t2", "fam", "lab1", 512, 1, {"lab1": 1}, now=110.0)
    store.set_ticket_state("t2", "running")  # its clone is in lab1's usage already
    assert store.room(now=120.0, timeout=15.0) == [HostRoom("lab1", 4096 - 1024 - 512, 8 - 2 - 2, up=True),
                                                   HostRoom("lab2", 4096, 8, up=False)]


def test_prune_deletes_old_finished_tickets_only(store):
    store.add_ticket("old-ended", "fam", "lab1", 256, 1, {"lab1": 1}, now=1.0)
    store.add_ticket("old-failed", "fam", "lab1", 256, 1, {"lab1": 1}, now=1.0)
    store.add_ticket("recent", "fam", "lab1", 256, 1, {"lab1": 1}, now=1.0)
    store.add_ticket("live", "fam", "lab1", 256, 1, {"lab1": 1}, now=1.0)
    store.end_ticket("old-ended", now=100.0)
    store.set_ticket_state("old-failed", "failed", now=100.0)
    store.end_ticket("recent", now=950.0)
    assert store.prune(now=1000.0, keep_seconds=600.0) == 2
    assert store.ticket("old-ended") is None and store.ticket("old-failed") is None
    assert store.ticket("recent") is not None and store.ticket("live") is not None
    assert store.db.execute("SELECT COUNT(*) FROM ticket_slots").fetchone()[0] == 2


def test_reopening_keeps_the_state(tmp_path):
    path = tmp_path / "master.db"
    s = MasterStore(path)
    s.register("lab1", "a:1", 4096, 8, now=100.0)
    s.heartbeat("lab1", 256, 1, now=105.0)
    s.add_ticket("t1", "fam", "lab1", 256, 1, {"lab1": 2}, now=105.0)
    s.set_ticket_state("t1", "cloning")
    hosts, ticket = s.hosts(), s.ticket("t1")
    s.close()
    again = MasterStore(path)
    assert again.version == SCHEMA_VERSION
    assert again.hosts() == hosts and again.ticket("t1") == ticket
    again.close()


def test_a_restarted_master_counts_silence_only_from_its_start(store):
    """Heartbeats sent while no master ran were heard by nobody: right after a
    restart every host that was up stays up, until it has been silent for the
    timeout under this master."""
    store.register("lab1", "10.0.0.1:7000", 4096, 8, now=100.0)
    store.register("lab2", "10.0.0.2:7000", 4096, 8, now=100.0)
    store.mark_down("lab2")
    started = 500.0                       # the master was away for 400 s
    assert store.mark_stale(now=501.0, timeout=5.0, heard_since=started) == []
    assert [(r.name, r.up) for r in store.room(now=501.0, timeout=5.0, heard_since=started)] == \
        [("lab1", True), ("lab2", False)]  # a host that had left stays down
    assert store.mark_stale(now=506.0, timeout=5.0, heard_since=started) == ["lab1"]
    assert not store.room(now=506.0, timeout=5.0, heard_since=started)[0].up


def test_mark_down_is_for_a_host_that_was_up(store):
    store.register("lab1", "10.0.0.1:7000", 4096, 8, now=100.0)
    assert store.mark_down("lab1") and not store.mark_down("lab1") and not store.mark_down("ghost")
    assert store.hosts()[0]["state"] == "down"
