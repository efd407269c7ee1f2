"""hostd's SQLite store: VM records, checkpoints index, counters."""
from __future__ import annotations

import pytest

from sfmpi.hostd.state.store import Store
from sfmpi.hostd.state.records import VmRecord, VmRole, VmState


@pytest.fixture
def db(tmp_path):
    return tmp_path / "state.db"


def rec(name="vm1", created=1000.0, **kw) -> VmRecord:
    base = dict(name=name, role=VmRole.PARENT, state=VmState.RUNNING,
                spec={"mem_mb": 512, "cpus": 1, "accel": "tcg"}, overlay=f"/d/{name}.qcow2",
                ram_path=f"/shm/{name}", qmp_path="/s/q", agent_path="/s/a", log_path="/s/l",
                serial_log="/s/serial", pid=4242, image="/img/disk.qcow2", created=created)
    base.update(kw)
    return VmRecord(**base)


def test_vm_round_trip_keeps_enums(db):
    s = Store(db)
    r = rec(role=VmRole.CLONE, state=VmState.PAUSED, checkpoint="ck-1", error="oops")
    s.put_vm(r)
    got = s.get_vm("vm1")
    assert got == r
    assert isinstance(got.role, VmRole) and got.role is VmRole.CLONE
    assert got.state is VmState.PAUSED
    assert s.get_vm("nope") is None
    s.close()


def test_put_replaces_and_survives_reopen(db):
    s = Store(db)
    s.put_vm(rec())
    s.put_vm(rec().with_(state=VmState.CRASHED, pid=None))
    s.close()
    s = Store(db)
    got = s.get_vm("vm1")
    assert got.state is VmState.CRASHED and got.pid is None
    assert len(s.vms()) == 1
    s.close()


def test_list_sorted_by_creation_and_delete(db):
    s = Store(db)
    s.put_vm(rec("b", created=3.0))
    s.put_vm(rec("a", created=2.0))
    s.put_vm(rec("c", created=1.0, role=VmRole.RECEIVER))
    assert [r.name for r in s.vms()] == ["c", "a", "b"]
    s.delete_vm("a")
    s.delete_vm("missing")  # no error
    assert [r.name for r in s.vms()] == ["c", "b"]
    assert s.get_vm("a") is None
    s.close()


def test_counters_strictly_increase_and_persist(db):
    s = Store(db)
    seen = [s.next("clone") for _ in range(5)]
    assert seen == sorted(set(seen)) and len(seen) == 5
    assert s.next("ckpt") == 1  # independent names
    s.close()
    s = Store(db)
    assert s.next("clone") > seen[-1]
    assert s.next("ckpt") == 2
    s.close()


def test_checkpoints_table(db, monkeypatch):
    import sfmpi.hostd.state.store as store_mod
    clock = iter([10.0, 20.0, 30.0])
    monkeypatch.setattr(store_mod.time, "time", lambda: next(clock))
    s = Store(db)
    s.add_checkpoint("ck-2", "vm1", "/c/ck-2")
    s.add_checkpoint("ck-1", "vm2", "/c/ck-1")
    assert s.checkpoint_path("ck-1") == "/c/ck-1"
    assert s.checkpoint_path("ck-9") is None
    assert [(r["id"], r["vm"], r["path"]) for r in s.checkpoint_rows()] == \
        [("ck-2", "vm1", "/c/ck-2"), ("ck-1", "vm2", "/c/ck-1")]
    s.delete_checkpoint("ck-2")
    s.close()
    s = Store(db)
    assert [(r["id"], r["vm"], r["path"]) for r in s.checkpoint_rows()] == [("ck-1", "vm2", "/c/ck-1")]
    s.close()


def test_next_reserves_a_block(tmp_path):
    from sfmpi.hostd.state.store import Store
    store = Store(tmp_path / "s.db")
    assert store.next("c", 4) == 1   # 1..4
    assert store.next("c") == 5
    assert store.next("c", 3) == 6   # 6..8
    assert store.next("c") == 9
