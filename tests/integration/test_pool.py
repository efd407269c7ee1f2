"""Elastic service pools on real VMs: the controller's rules against a real
HAProxy and real clones (docs/pool.md). One pool for the module (its warm
checkpoint is the expensive part); each test leaves it at one worker."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time

import psutil
import pytest

from tests.integration.conftest import Cli, make_home

POOL = "web"
# Quick rules, so that a test sees a whole cycle in seconds.
FAST = ["--set", "free_count=2", "--set", "hold_ms=2000", "--set", "last_connect_ms=3000", "--set", "report_ms=500"]


def status(cli: Cli, name: str = POOL) -> dict:
    return cli.json("pool", "status", name)


def wait_for(what, predicate, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what} within {timeout:g} s (last: {last!r})")


class Load:
    """`sfmpi pool client` in the background; its JSON summary at the end."""

    def __init__(self, cli: Cli, rate: float, duration: float, *extra: str):
        self.proc = subprocess.Popen(["sfmpi", "pool", "client", POOL, "--rate", str(rate), "--duration",
                                      str(duration), "--json", *extra], env=cli.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def result(self, timeout: float = 300) -> dict:
        out, err = self.proc.communicate(timeout=timeout)
        assert out, f"pool client printed nothing: {err}"
        return json.loads(out)


@contextlib.contextmanager
def worker_counts(cli: Cli):
    """The pool's worker count every half second while the block runs."""
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(status(cli)["vm_count"])
            stop.wait(0.5)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        stop.set()
        watcher.join()


@pytest.fixture(scope="module")
def pool_cli(request):
    home = make_home("pool")
    cli = Cli(home)
    from sfmpi.image import default_image
    cli("pool", "up", POOL, "--image", default_image(), "--min", "1", "--max", "4", *FAST, timeout=900)
    yield cli
    left = cli.teardown(keep_logs=getattr(request.session, "sfmpi_failed", False))
    if getattr(request.session, "sfmpi_failed", False) and (home / "pools").exists():
        from tests.integration.conftest import ARTIFACTS
        shutil.copytree(home / "pools", ARTIFACTS / home.name / "pools", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.sock"))
    shutil.rmtree(home, ignore_errors=True)
    assert not left, f"the pool left things behind: {left}"


def test_pool_up_serves_the_example_service(pool_cli):
    st = status(pool_cli)
    assert st["state"] == "serving" and st["vm_count"] == 1
    assert st["frontend"].startswith("http://127.0.0.1:")
    import urllib.request
    req = urllib.request.Request(st["frontend"] + "?rounds=3", data=b"to be or not to be", method="POST")
    answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
    assert answer["words"] == 6 and answer["top"][0] == ["to", 2] and answer["rounds"] == 3
    # The database has the design's tables and the parameters that were set.
    assert st["params"]["free_count"] == 2 and st["params"]["max_vm_count"] == 4
    assert len(st["ip_pool"]) == 4 and sum(r["reserve"] for r in st["ip_pool"]) == 1
    # Load reports arrive over the agent.
    wait_for("a load report", lambda: status(pool_cli)["vms"][0]["ram"] > 0, 20)


def test_burst_grows_by_cloning_and_shrinks_back_with_no_failure(pool_cli):
    with worker_counts(pool_cli) as seen:
        burst = Load(pool_cli, 10, 15).result()
        assert burst["failed"] == 0 and burst["ok"] == burst["requests"] == 150, burst
        assert max(seen) == 4, f"the pool grew to {max(seen)} workers, not 4: {seen}"
        st = status(pool_cli)
        starts = [e for e in st["events"] if e["kind"] == "scale-out"]
        assert starts and all("by clone" in e["detail"] for e in starts)
        # Scale-in while a light load runs: drained workers cut nothing in flight.
        trickle = Load(pool_cli, 1.5, 30)
        wait_for("back to one worker", lambda: status(pool_cli)["vm_count"] == 1, 90)
        light = trickle.result()
        assert light["failed"] == 0, light
    st = status(pool_cli)
    kinds = [e["kind"] for e in st["events"]]
    assert "drain" in kinds and "scale-in" in kinds
    assert min(seen) >= 1
    # Each stopped worker's VM is gone, and its ip_pool row is free again.
    names = {r["name"] for r in pool_cli.json("vm", "list")}
    assert names == {v["name"] for v in st["vms"]}
    assert sum(r["reserve"] for r in st["ip_pool"]) == 1


def test_killed_worker_is_replaced(pool_cli):
    pool_cli("pool", "set", POOL, "min_vm_count=2")
    wait_for("a second worker for min_vm_count=2", lambda: status(pool_cli)["vm_count"] == 2, 60)
    st = status(pool_cli)
    victim, since = st["vms"][-1]["name"], st["vms"][-1]["started"]
    pid = next(r["pid"] for r in pool_cli.json("vm", "list") if r["name"] == victim)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    params = st["params"]

    out_of_rotation = None

    def replaced():
        nonlocal out_of_rotation
        s = status(pool_cli)
        if out_of_rotation is None and any(e["kind"] == "dead" and e["vm"] == victim for e in s["events"]):
            out_of_rotation = time.monotonic() - killed
        serving = [v for v in s["vms"] if v["state"] == "serving"]
        # The replacement may get the dead one's name (hostd reuses a free clone ID): it started later.
        gone = all(v["name"] != victim or v["started"] > since for v in s["vms"])
        return out_of_rotation and gone and len(serving) == 2 and s

    wait_for("the dead worker replaced", replaced, 60)
    # Noticed within last_connect_ms after its last report, plus a report interval and a tick or two.
    assert out_of_rotation < (params["last_connect_ms"] + params["report_ms"]) / 1000 + 10
    # The killed QEMU's VM record is gone (destroyed), not left crashed in `vm list`.
    assert all(r["pid"] != pid and r["state"] == "running" for r in pool_cli.json("vm", "list"))
    pool_cli("pool", "set", POOL, "min_vm_count=1")
    wait_for("back to one worker", lambda: status(pool_cli)["vm_count"] == 1, 60)


def balancer(cli: Cli):
    """The pool's own HAProxy, through its runtime API socket."""
    from hostd.pool.haproxy import RuntimeApi
    from hostd.pool.status import pool_dir
    return RuntimeApi(pool_dir(cli.home, POOL) / "haproxy.sock")


def test_max_reached_requests_queue_and_are_served(pool_cli):
    pool_cli("pool", "set", POOL, "max_vm_count=2")
    try:
        # qmax counts from here: the queue this load builds, not an earlier test's.
        assert balancer(pool_cli).command("clear counters") == ""
        with worker_counts(pool_cli) as seen:
            res = Load(pool_cli, 10, 10).result()
        assert res["failed"] == 0 and res["ok"] == 100, res
        assert max(seen) == 2, f"workers beyond max_vm_count=2: {seen}"
        st = status(pool_cli)
        assert len(st["ip_pool"]) == 2
        assert len({r["name"] for r in pool_cli.json("vm", "list")}) <= 2
        # With 2 workers of maxconn 2, requests waited in HAProxy's queue (not refused) and were all served.
        backend = balancer(pool_cli).stat()["BACKEND"]
        assert int(backend["qmax"]) > 0, backend
    finally:
        pool_cli("pool", "set", POOL, "max_vm_count=4")
    wait_for("back to one worker", lambda: status(pool_cli)["vm_count"] == 1, 60)


def test_bad_input_is_refused_clearly(pool_cli):
    def fails(*args, says: str):
        p = pool_cli(*args, check=False, timeout=300)
        assert p.returncode != 0, f"sfmpi {' '.join(args)} succeeded"
        assert says in p.stderr, p.stderr
        assert p.stderr.count("\n") <= 2, p.stderr
    fails("pool", "status", "nosuch", says="no pool named 'nosuch'")
    fails("pool", "set", POOL, "bogus=1", says="unknown pool parameter 'bogus'")
    fails("pool", "set", POOL, "free_count=0", says="free_count must be between 1 and 1000")
    fails("pool", "set", POOL, "free_count=two", says="free_count must be an integer")
    fails("pool", "set", POOL, "min_vm_count=9", says="min_vm_count (9) is above max_vm_count (4)")
    fails("pool", "set", POOL, "free_count", says="takes KEY=VALUE")
    fails("pool", "up", "Bad_Name", "--checkpoint", "x", says="pool name 'Bad_Name'")
    fails("pool", "up", POOL, "--checkpoint", status(pool_cli)["checkpoint"], says="already up")
    fails("pool", "up", "nock", "--checkpoint", "nosuch-ck", says="nosuch-ck")
    fails("pool", "client", POOL, "--rate", "0", says="--rate")
    fails("control", "add", "pool:nosuch", "--class", "high", "--target", "p95_ms=200", says="no pool named 'nosuch'")
    fails("control", "add", f"pool:{POOL}", "--class", "high", "--target", "cpu_percent=50",
          says="cpu_percent is a target for a VM")
    # A checkpoint whose service does not listen where the pool is told: a clear error, nothing left running.
    ck = status(pool_cli)["checkpoint"]
    fails("pool", "up", "deaf", "--checkpoint", ck, "--port", "9999", "--probe-timeout", "5",
          says="no service answered on port 9999")
    assert status(pool_cli, "deaf")["state"] == "failed"
    assert {r["name"] for r in pool_cli.json("vm", "list")} == {v["name"] for v in status(pool_cli)["vms"]}
    assert status(pool_cli)["params"]["free_count"] == 2, "a refused `pool set` changed a parameter"


@pytest.mark.browser
def test_the_balancer_times_each_request_and_a_controller_holds_the_p95(pool_cli):
    from hostd.pool.status import open_pool
    db = open_pool(pool_cli.home, POOL)
    try:
        # Every request is timed at the balancer, and HAProxy's time is within what the client saw.
        t0 = time.time() * 1000
        res = Load(pool_cli, 4, 6, "--rounds", "200").result()
        assert res["failed"] == 0, res
        wait_for("every request in the pool's database", lambda: db.latency(int(t0))["count"] == res["requests"], 10)
        lat = db.latency(int(t0))
        assert 0 < lat["p50_ms"] <= res["latency_s"]["p50"] * 1000 + 20, (lat, res)
        assert lat["max_ms"] <= res["latency_s"]["max"] * 1000 + 20, (lat, res)
        assert status(pool_cli)["latency"]["window_ms"] == 10_000
    finally:
        db.close()
    # A best-effort VM limited for the pool's p95: a target no request meets clamps it to its floor;
    # when the load ends nothing waits, and the limit is released.
    pool_cli("pool", "set", POOL, "max_vm_count=1")      # no scale-out: the limit is the only lever here
    pool_cli("vm", "start", "be", "--mem", "256M")
    tag = pool_cli.paths.tag
    quota_file = f"/sys/fs/cgroup/cpu/sfmpi-{tag}/be/cpu.cfs_quota_us"

    def quota() -> str:
        try:
            return open(quota_file).read().strip()
        except FileNotFoundError:
            return ""
    try:
        pool_cli("control", "add", f"pool:{POOL}", "--class", "high", "--target", "p95_ms=1", "--period", "1")
        pool_cli("control", "add", "be", "--class", "best-effort", "--min-limit", "10")
        load = Load(pool_cli, 4, 20, "--rounds", "200")
        wait_for("the best-effort VM limited to its floor", lambda: quota() == "10000", 15)
        steps = pool_cli.json("control", "log")["steps"]
        measured = [s["measurement"] for s in steps if s["measurement"]]
        assert measured and all(m >= 1 for m in measured), steps
        assert steps[-1]["target"] == 1.0 and steps[-1]["actuation"] == 10.0, steps[-1]
        assert load.result()["failed"] == 0
        wait_for("the limit released once no request waits", lambda: quota() == "-1", 30)
        last = pool_cli.json("control", "log")["steps"][-1]
        assert last["measurement"] == 0.0 and last["note"] == "released", last
        rows = pool_cli.json("control", "list")
        assert rows[0]["members"][f"pool:{POOL}"] == {"class": "high", "measure": "p95_ms", "target": 1.0}
    finally:
        pool_cli("control", "rm", f"pool:{POOL}", check=False)
        pool_cli("control", "rm", "be", check=False)
        pool_cli("vm", "stop", "be")
        pool_cli("pool", "set", POOL, "max_vm_count=4")
    assert pool_cli.json("control", "list") == []


def test_console_follows_the_real_pool_in_chromium(pool_cli):
    from tests.browser import Chromium
    from tests.integration.conftest import ARTIFACTS
    console = subprocess.Popen(["sfmpi", "console", "--port", "0"], env=pool_cli.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        url = console.stdout.readline().split("console: ", 1)[-1].strip()
        assert url.startswith("http://127.0.0.1:"), console.stderr.read() if console.poll() is not None else url
        with Chromium() as browser:
            browser.open(url)
            browser.wait_js("window.sfmpiConsole && window.sfmpiConsole.ready()")
            browser.wait_js(f"sfmpiConsole.vmCount('{POOL}') === {status(pool_cli)['vm_count']}", timeout=10)
            assert browser.text(f"vmcount-{POOL}") == f"VMs: {status(pool_cli)['vm_count']}"
            points = browser.js(f"sfmpiConsole.points('{POOL}')")
            before = len(browser.js(f"sfmpiConsole.events('{POOL}')"))
            load = Load(pool_cli, 8, 8)
            # Load reports add points while the load runs; the burst clones a worker: a scale event.
            browser.wait_js(f"sfmpiConsole.points('{POOL}') > {points}", timeout=20)
            browser.wait_js(f"sfmpiConsole.events('{POOL}').slice({before}).includes('scale-out')", timeout=60)
            browser.wait_js(f"sfmpiConsole.vmCount('{POOL}') > 1", timeout=60)
            assert load.result()["failed"] == 0
            assert browser.js(f"sfmpiConsole.vmCount('{POOL}')") == status(pool_cli)["vm_count"] or \
                abs(browser.js(f"sfmpiConsole.vmCount('{POOL}')") - status(pool_cli)["vm_count"]) <= 1
            browser.screenshot(ARTIFACTS / "console-pool.png")
            assert browser.console_errors() == []
        assert browser.leftovers() == []
    finally:
        console.terminate()
        console.wait(10)
    assert (ARTIFACTS / "console-pool.png").stat().st_size > 10_000


def test_sfmpi_down_stops_the_pool(pool_cli):
    home = str(pool_cli.home)

    def ours(p: psutil.Process) -> bool:
        try:
            return "pool" in p.cmdline() and "serve" in p.cmdline() and p.environ().get("SFMPI_HOME") == home
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
    controllers = [p for p in psutil.process_iter() if ours(p)]
    assert len(controllers) == 1, "not one controller process for the pool"
    pool_cli("down")
    assert status(pool_cli)["state"] == "stopped"
    assert not controllers[0].is_running() or controllers[0].status() == psutil.STATUS_ZOMBIE
    assert pool_cli.json("vm", "list") == []
