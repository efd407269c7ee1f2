"""The pool's pure parts: parameters, rules, database, load generator, the
example service, the guest's load parsing, the load report's schema."""
from __future__ import annotations

import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfmpi.errors import NotFound, ProtocolError, UsageError
from sfmpi.guest.load import cpu_times, mem_used
from sfmpi.guest.service import transform
from sfmpi.hostd.guestapi import schemas
from sfmpi.hostd.pool import loadgen
from sfmpi.hostd.pool.db import PoolDb, now_ms
from sfmpi.hostd.pool.haproxy import haproxy_argv, haproxy_config
from sfmpi.hostd.pool.latency import parse_line, percentile
from sfmpi.hostd.pool.params import PARAMS, parse_assignment
from sfmpi.hostd.pool.rules import Snapshot, Worker, decide
from sfmpi.hostd.pool.status import check_name, open_pool, pool_status
from sfmpi.hostd.pool.workers import probe_argv, start_service_argv

P = {name: p.kind(p.default) for name, p in PARAMS.items()} | {"min_vm_count": 1, "max_vm_count": 4}
NOW = 1_000_000


def worker(name, state="serving", started=0, last=NOW, free=0, busy=0):
    return Worker(name, state, started, last, free, busy)


def snap(workers=(), queued=0, starting=0, free_ips=None, **params):
    ps = P | params
    free = ps["max_vm_count"] - len(workers) - starting if free_ips is None else free_ips
    return Snapshot(NOW, ps, tuple(workers), queued, starting, free)


# -- parameters ---------------------------------------------------------------
def test_assignments_are_checked():
    assert parse_assignment("free_count=5") == ("free_count", 5)
    assert parse_assignment(" idle_cpu_percent = 12.5 ") == ("idle_cpu_percent", 12.5)
    for bad, says in (("free_count", "KEY=VALUE"), ("nope=1", "unknown pool parameter 'nope'"),
                      ("free_count=0", "between 1 and 1000"), ("free_count=1.5", "an integer"),
                      ("idle_cpu_percent=nan", "between"), ("last_connect_ms=10", "between 500")):
        with pytest.raises(UsageError, match=says):
            parse_assignment(bad)


def test_pool_names():
    assert check_name("web-1") == "web-1"
    for bad in ("", "Web", "1web", "a" * 25, "we/b", "../x"):
        with pytest.raises(UsageError):
            check_name(bad)


# -- rules ----------------------------------------------------------------------
def test_a_queue_starts_as_many_workers_as_it_needs_at_maxconn_each():
    assert decide(snap([worker("a", busy=2)], queued=5)).start == 3        # ceil(5 / 2)
    assert decide(snap([worker("a", busy=2)], queued=5, starting=2)).start == 1
    assert decide(snap([worker("a", busy=2)], queued=0)).start == 0


def test_nothing_is_started_beyond_max_or_without_a_free_address():
    full = [worker(n, busy=2) for n in "abcd"]
    assert decide(snap(full, queued=50)).start == 0
    assert decide(snap([worker("a", busy=2)], queued=50, free_ips=1)).start == 1
    assert decide(snap([worker("a", busy=2)], queued=50, free_ips=0)).start == 0


def test_the_floor_is_kept():
    assert decide(snap([], min_vm_count=2)).start == 2
    assert decide(snap([worker("a")], starting=1, min_vm_count=2)).start == 0


def test_idle_workers_are_drained_newest_first_never_below_the_floor():
    ws = [worker("a", started=1, free=5), worker("b", started=2, free=5), worker("c", started=3, free=1)]
    assert decide(snap(ws, free_count=3)).drain == ["b", "a"]    # c is not idle yet: it is the floor
    assert decide(snap(ws, free_count=3, min_vm_count=2)).drain == ["b"]
    assert decide(snap(ws, free_count=3, min_vm_count=3)).drain == []


def test_no_drain_while_requests_wait_or_workers_start_or_within_hold():
    ws = [worker("a", started=0, free=9), worker("b", started=0, free=9)]
    assert decide(snap(ws, queued=1)).drain == []
    assert decide(snap(ws, starting=1)).drain == []
    young = [worker("a", started=0, free=9), worker("b", started=NOW - 100, free=9)]
    assert decide(snap(young, hold_ms=1000)).drain == ["a"]     # b has not served hold_ms yet


def test_drained_workers_stop_only_when_nothing_is_in_flight():
    ws = [worker("a"), worker("b", "draining", busy=1), worker("c", "draining", busy=0)]
    assert decide(snap(ws)).stop == ["c"]


def test_a_draining_worker_is_put_back_before_anything_is_cloned():
    ws = [worker("a", busy=2), worker("b", "draining", started=5)]
    act = decide(snap(ws, queued=2))
    assert act.ready == ["b"] and act.start == 0 and act.stop == []


def test_silent_workers_are_dead_and_replaced():
    ws = [worker("a", last=NOW - 6000), worker("b", last=NOW - 100)]
    act = decide(snap(ws, last_connect_ms=5000, min_vm_count=2))
    assert act.dead == ["a"] and act.start == 1


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 6), queued=st.integers(0, 40), starting=st.integers(0, 3), lo=st.integers(1, 4),
       hi=st.integers(1, 6), free=st.lists(st.integers(0, 9), min_size=6, max_size=6),
       busy=st.lists(st.integers(0, 3), min_size=6, max_size=6), silent=st.lists(st.booleans(), min_size=6,
                                                                                 max_size=6))
def test_rules_never_exceed_the_ceiling_or_go_below_the_floor(n, queued, starting, lo, hi, free, busy, silent):
    hi = max(hi, lo)
    ws = [worker(f"w{i}", started=i, free=free[i], busy=busy[i], last=NOW - (99_999 if silent[i] else 0))
          for i in range(n)]
    act = decide(snap(ws, queued=queued, starting=starting, free_ips=max(0, hi - n - starting),
                      min_vm_count=lo, max_vm_count=hi))
    alive = n - len(act.dead)
    assert alive + starting + act.start <= max(hi, alive + starting)
    assert alive - len(act.drain) - len(act.stop) >= min(lo, alive) or not act.drain
    assert not (act.drain and (queued or act.start))
    assert act.start >= 0 and set(act.drain).isdisjoint(act.dead)


# -- database ---------------------------------------------------------------------
def test_a_version_1_database_is_migrated(tmp_path):
    path = tmp_path / "pool.db"
    db = sqlite3.connect(path)
    from sfmpi.hostd.pool.db import SCHEMA_V1
    for statement in SCHEMA_V1.split(";"):
        db.execute(statement)
    db.execute("INSERT INTO system_params VALUES ('free_count', '7')")
    db.execute("INSERT INTO ip_pool(id_ip, ip, port) VALUES (1, '10.0.0.5', 8080)")
    db.execute("INSERT INTO vmachine(id_ip, cpu, ram) VALUES (1, 3.5, 100)")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    pool = PoolDb(path)
    assert pool.version == 3
    assert pool.params()["free_count"] == 7
    vm = pool.vms()[0]
    assert vm["cpu"] == 3.5 and vm["state"] == "serving" and vm["ip"] == "10.0.0.5"
    pool.event("up", None)
    assert pool.events()[0]["kind"] == "up"


def test_a_newer_database_is_refused(tmp_path):
    path = tmp_path / "pool.db"
    sqlite3.connect(path).execute("PRAGMA user_version = 9").connection.close()
    with pytest.raises(Exception, match="schema version 9"):
        PoolDb(path)


def test_ip_pool_reservations(tmp_path):
    db = PoolDb(tmp_path / "pool.db")
    db.init_params({})
    db.size_ip_pool(3, 8080)
    a, b, c = (db.reserve_ip(3) for _ in range(3))
    assert (a, b, c) == (1, 2, 3) and db.reserve_ip(3) is None
    db.add_vm("w1", a, "10.0.0.2")
    # b and c are reserved with no worker: stale once ip_reserve_ms has passed.
    assert db.stale_reservations(60_000) == []
    db.db.execute("UPDATE ip_pool SET last_reserve = ? WHERE id_ip IN (2, 3)", (now_ms() - 120_000,))
    assert db.stale_reservations(60_000) == [2, 3]
    db.release_ip(2)
    assert not db.is_reserved(2) and db.is_reserved(1)
    # Shrinking drops free rows above the new size, never a row a worker holds.
    db.size_ip_pool(1, 8080)
    assert [r["id_ip"] for r in db.ip_pool()] == [1, 3]
    db.remove_vm("w1")
    assert not db.is_reserved(1)


def test_reports_count_idle_in_a_row(tmp_path):
    db = PoolDb(tmp_path / "pool.db")
    db.init_params({})
    db.size_ip_pool(1, 8080)
    db.add_vm("w1", db.reserve_ip(1), "10.0.0.2")
    assert [db.report("w1", 1.0, 10, idle, now_ms()) for idle in (True, True, False, True)] == [1, 2, 0, 1]
    assert len(db.samples()) == 4


def test_pool_status_of_a_pool(tmp_path):
    with pytest.raises(NotFound, match="no pool named 'x'"):
        open_pool(tmp_path, "x")
    (tmp_path / "pools" / "p").mkdir(parents=True)
    db = PoolDb(tmp_path / "pools" / "p" / "pool.db")
    db.init_params({"max_vm_count": 2})
    db.set_info(name="p", state="serving", pid=1, frontend="http://127.0.0.1:1/")
    db.close()
    st = pool_status(tmp_path, "p")
    # pid 1 is no controller of ours: the pool is reported with a dead controller, not as serving.
    assert st["state"] == "controller-dead" and st["params"]["max_vm_count"] == 2


def test_min_above_max_is_refused(tmp_path):
    db = PoolDb(tmp_path / "pool.db")
    with pytest.raises(UsageError, match="above max_vm_count"):
        db.init_params({"min_vm_count": 5, "max_vm_count": 4})
    db.init_params({})
    with pytest.raises(UsageError, match="above max_vm_count"):
        db.set_param("min_vm_count", 9)


# -- command lines, configuration -------------------------------------------------------
def test_haproxy_configuration_and_command_line(tmp_path):
    cfg = haproxy_config(tmp_path / "api.sock", 7, 30)
    assert "bind fd@7" in cfg and "balance first" in cfg and "timeout queue 30s" in cfg
    assert f"stats socket {tmp_path / 'api.sock'} mode 600 level admin" in cfg
    assert haproxy_argv(tmp_path / "h.cfg", "/run/netns/sfmpi-x") == [
        "nsenter", "--net=/run/netns/sfmpi-x", "--", "haproxy", "-f", str(tmp_path / "h.cfg"), "-db"]


def test_service_command_lines():
    argv = start_service_argv("python3 -m sfmpi.guest.service --port 8080")
    assert argv[:3] == ["setsid", "-f", "sh"] and "exec python3 -m sfmpi.guest.service --port 8080" in argv[-1]
    assert probe_argv(8080, 5) == ["python3", "-m", "sfmpi.guest.service", "--probe", "8080", "--timeout", "5"]


# -- load generator, service, guest side ---------------------------------------------------
def test_load_generator_summary():
    rs = [loadgen.Result(i * 0.1, 0.01 * (i + 1), 200) for i in range(100)] + [loadgen.Result(0, 1, 503, "HTTP 503")]
    s = loadgen.summary(rs, 10.0)
    assert s["requests"] == 101 and s["ok"] == 100 and s["failed"] == 1 and s["errors"] == {"HTTP 503": 1}
    assert s["latency_s"]["p50"] == pytest.approx(0.505, abs=0.01) and s["latency_s"]["max"] == 1.0
    assert s["throughput_rps"] == 10.0
    for bad in ((0, 1, 1), (5, 0, 1), (5, 1, 0), (5000, 1, 1)):
        with pytest.raises(UsageError):
            loadgen.check_args(*bad)


def test_example_service_transformation():
    r = transform("b a b\nc b\n", 2)
    assert r["lines"] == 2 and r["words"] == 5 and r["top"][0] == ("b", 3) and len(r["chain"]) == 64
    import hashlib
    assert r["chain"] == hashlib.sha256(hashlib.sha256(b"b a b\nc b\n").digest()).hexdigest()


def test_guest_load_parsing():
    busy, total = cpu_times("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n")
    assert (busy, total) == (150, 1000)
    used, mem_total = mem_used("MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    400 kB\n")
    assert (used, mem_total) == (600 * 1024, 1000 * 1024)


@pytest.mark.parametrize("line", [
    b'{"ev": "load", "cpu": 101, "ram": 1}', b'{"ev": "load", "cpu": -1, "ram": 1}',
    b'{"ev": "load", "cpu": NaN, "ram": 1}', b'{"ev": "load", "cpu": 1, "ram": -5}',
    b'{"ev": "load", "cpu": 1, "ram": 1.5}', b'{"ev": "load", "cpu": "1", "ram": 1}', b'{"ev": "load", "ram": 1}',
])
def test_hostile_load_reports_are_refused(line):
    with pytest.raises(ProtocolError):
        schemas.check(schemas.parse_line(line))


def test_a_load_report_passes():
    schemas.check(schemas.parse_line(b'{"ev": "load", "cpu": 12.5, "ram": 1048576, "ram_total": 2097152}'))


def test_request_log_lines_and_percentiles():
    assert parse_line(b"12 200\n") == (12, 200)
    assert parse_line(b"60003 503") == (60003, 503)
    for bad in (b"", b"12", b"12 200 7", b"x 200", b"-5 200", b"12 2000", b"\xff\xfe", b"99999999999 200"):
        assert parse_line(bad) is None, bad
    assert percentile([], 95) is None
    assert percentile([7], 95) == 7.0
    values = list(range(1, 101))           # 1..100 ms
    assert percentile(values, 95) == 95.0 and percentile(values, 50) == 50.0 and percentile(values, 100) == 100.0
    assert percentile([5, 1, 3], 50) == 3.0


@given(st.lists(st.integers(0, 10 ** 6), min_size=1, max_size=200), st.floats(1, 100))
def test_a_percentile_is_a_time_some_request_took_and_bounds_its_share(values, q):
    p = percentile(values, q)
    assert p in values
    assert sum(1 for v in values if v <= p) >= q / 100 * len(values)


def test_the_database_keeps_request_times_and_summarises_a_window(tmp_path):
    db = PoolDb(tmp_path / "pool.db")
    t = now_ms()
    db.add_requests([(t - 5000, 900, 200)] + [(t - 1000 + i, 10 + i, 200) for i in range(19)] + [(t - 10, 60000, 503)])
    window = db.latency(t - 2000)
    assert window["count"] == 20 and window["errors"] == 1
    assert window["p50_ms"] == 19.0 and window["p95_ms"] == 28.0 and window["max_ms"] == 60000.0
    assert db.latency(t - 6000, t - 4000)["p95_ms"] == 900.0
    assert db.latency(t + 1)["count"] == 0 and db.latency(t + 1)["p95_ms"] is None
    db.add_requests([(t - 700_000, 5, 200)])
    db.trim_history()
    assert db.latency(0)["count"] == 21             # older than ten minutes: gone


def test_haproxy_logs_each_request_to_the_request_log_only_when_asked():
    with_log = haproxy_config("/p/api.sock", 5, 60, "/p/requests.sock")
    assert "log /p/requests.sock len 512 format raw local0 info" in with_log
    assert 'log-format "%Ta %ST"' in with_log and "log global" in with_log
    assert "log" not in haproxy_config("/p/api.sock", 5, 60).replace("/p/", "")
