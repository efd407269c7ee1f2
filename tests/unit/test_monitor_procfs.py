"""The /proc readers of per-VM statistics, against real processes (no VM)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from sfmpi.hostd.monitor.procfs import (CLK_TCK, blockstats_totals, cpu_percent, cpu_ticks, pss_bytes,
                                        read_process)


def test_stat_lines_with_awkward_names():
    fields = " ".join(["S"] + ["0"] * 10 + ["120", "30"] + ["0"] * 30)
    assert cpu_ticks(f"42 (qemu) {fields}") == 150
    assert cpu_ticks(f"42 (a) b (c)) {fields}") == 150


def test_pss_and_missing_pss():
    assert pss_bytes("Rss: 10 kB\nPss:  4 kB\nPss_Anon: 1 kB\n") == 4096
    with pytest.raises(ValueError):
        pss_bytes("Rss: 10 kB\n")


def test_cpu_percent():
    assert cpu_percent(0, CLK_TCK, 1.0) == pytest.approx(100.0)
    assert cpu_percent(0, CLK_TCK // 2, 2.0) == pytest.approx(25.0, abs=1)
    assert cpu_percent(5, 3, 1.0) == 0.0 and cpu_percent(0, 5, 0) == 0.0


def test_blockstats_totals():
    stats = [{"device": "", "stats": {"rd_bytes": 10, "wr_bytes": 20, "rd_operations": 1, "wr_operations": 2}},
             {"device": "x", "stats": {"rd_bytes": 5}}]
    assert blockstats_totals(stats) == {"disk_read_bytes": 15, "disk_write_bytes": 20, "disk_read_ops": 1,
                                        "disk_write_ops": 2}


def test_a_busy_thread_is_measured_and_its_process_too():
    tid = []
    stop = threading.Event()

    def burn():
        tid.append(threading.get_native_id())
        while not stop.is_set():
            sum(range(1000))
    t = threading.Thread(target=burn)
    t.start()
    try:
        while not tid:
            time.sleep(0.01)
        before, t0 = read_process(os.getpid(), tid), time.monotonic()
        time.sleep(1.0)
        after, dt = read_process(os.getpid(), tid + [999_999_999]), time.monotonic() - t0
    finally:
        stop.set()
        t.join()
    # A spinning thread uses most of a core (the GIL lets the test's own thread sleep); the
    # process at least as much. Loose bounds: the machine is shared.
    busy = cpu_percent(before.thread_ticks[tid[0]], after.thread_ticks[tid[0]], dt)
    assert 30 < busy <= 110
    assert cpu_percent(before.ticks, after.ticks, dt) >= busy - 5
    assert 999_999_999 not in after.thread_ticks
    assert after.pss_bytes > 1 << 20


def test_shared_pages_count_once_in_pss_not_in_each_rss(tmp_path):
    """Two processes mapping one 64 MiB file: each one's PSS is about half of it."""
    path = tmp_path / "shared"
    path.write_bytes(b"\1" * (64 << 20))
    child = ("import mmap, sys, time\nf = open(sys.argv[1], 'rb')\nm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
             "sum(m[i] for i in range(0, len(m), 4096))\nprint('ready', flush=True)\ntime.sleep(60)\n")
    procs = [subprocess.Popen([sys.executable, "-c", child, str(path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        pss = [read_process(p.pid).pss_bytes for p in procs]
        for value in pss:
            assert 28 << 20 < value < 48 << 20, pss
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_sampler_rates_and_bounded_history(tmp_path):
    from sfmpi.hostd.monitor.history import Sampler, StatsHistory, Target
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        sampler = Sampler()
        target = Target("vm1", burner.pid, (burner.pid,), {"disk_read_bytes": 7, "net_tx_bytes": 9})
        assert sampler.sample([target]) == []          # a first reading gives no rate
        time.sleep(1.0)
        (s,) = sampler.sample([target, Target("gone", 999_999_999)])
    finally:
        burner.kill()
        burner.wait()
    assert 30 < s["cpu_percent"] <= 110 and len(s["vcpu_percent"]) == 1
    assert s["disk_read_bytes"] == 7 and s["net_tx_bytes"] == 9 and s["disk_write_bytes"] == 0
    history = StatsHistory(tmp_path / "stats.db", max_age_s=60)
    old = dict(s, at=s["at"] - 3600)
    history.add([old])
    history.add([s])                                  # the hour-old sample is trimmed
    assert [r["at"] for r in history.since("vm1")] == [s["at"]]
    assert history.since("vm1")[0]["vcpu_percent"] == s["vcpu_percent"]
    assert sampler.sample([]) == [] and sampler.last == {}


def test_prometheus_text_of_the_latest_samples():
    from prometheus_client.parser import text_string_to_metric_families

    from sfmpi.hostd.monitor.export import exposition
    sample = {"at": 1.0, "vm": "web-1", "cpu_percent": 12.5, "vcpu_percent": [10.0, 2.5], "mem_pss_bytes": 4096,
              "disk_read_bytes": 1, "disk_write_bytes": 2, "net_rx_bytes": 3, "net_tx_bytes": 4}
    families = {f.name: f for f in text_string_to_metric_families(exposition(lambda: [sample]).decode())}
    assert families["sfmpi_vm_cpu_percent"].samples[0].value == 12.5
    assert [(s.labels["vcpu"], s.value) for s in families["sfmpi_vm_vcpu_percent"].samples] == [("0", 10.0),
                                                                                               ("1", 2.5)]
    assert families["sfmpi_vm_disk_write_bytes"].samples[0].value == 2
    assert families["sfmpi_vm_mem_pss_bytes"].samples[0].labels == {"vm": "web-1"}
    # No VM, no series (a VM that is gone leaves none behind).
    assert all(not f.samples for f in text_string_to_metric_families(exposition(lambda: []).decode()))


def test_vcpu_threads_from_query_cpus_fast():
    from sfmpi.hostd.monitor.devices import vcpu_threads
    cpus = [{"cpu-index": 1, "thread-id": 202, "target": "x86_64"}, {"cpu-index": 0, "thread-id": 201},
            {"cpu-index": 2, "thread-id": "bad"}, {"cpu-index": 3}]
    assert vcpu_threads(cpus) == (201, 202)


def test_tap_counters_are_the_guests_view(tmp_path):
    """A veth end in a namespace stands for a tap: what is sent into it from
    the other end is what its "guest" received."""
    import uuid

    from sfmpi.hostd.monitor.devices import tap_counters
    ns = [f"sfmpi-t{uuid.uuid4().hex[:6]}" for _ in range(2)]
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    for n in ns:
        run("ip", "netns", "add", n)
    try:
        run("ip", "-n", ns[0], "link", "add", "sftap0", "type", "veth", "peer", "name", "guest0", "netns", ns[1])
        run("ip", "-n", ns[0], "addr", "add", "10.251.0.1/30", "dev", "sftap0")
        run("ip", "-n", ns[1], "addr", "add", "10.251.0.2/30", "dev", "guest0")
        for n, dev in ((ns[0], "sftap0"), (ns[1], "guest0")):
            run("ip", "-n", n, "link", "set", dev, "up")
        send = ("import socket, sys\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "for _ in range(int(sys.argv[1])): s.sendto(b'x' * 1000, ('10.251.0.1', 9))\n")
        run("ip", "netns", "exec", ns[1], sys.executable, "-c", send, "1")  # the neighbour resolved first
        time.sleep(0.3)
        before = tap_counters(ns[0], ["sftap0", "nosuch"])
        assert list(before) == ["sftap0"]
        # 200 datagrams of 1000 bytes from the "guest" side: the VM sent them.
        run("ip", "netns", "exec", ns[1], sys.executable, "-c", send, "200")
        after = tap_counters(ns[0], ["sftap0"])["sftap0"]
        assert after["net_tx_bytes"] - before["sftap0"]["net_tx_bytes"] >= 200 * 1000
        assert after["net_rx_bytes"] - before["sftap0"]["net_rx_bytes"] < 50 * 1000
    finally:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
