#!/usr/bin/env python3
"""Remote (served) memory: what a clone moves, what a fault costs, what serving costs the fork.

    python3 bench/remote.py [--json] [--repeats 3] [--touches 2000] [--lab]

One 512 MiB parent; its clones' RAM comes from a memory server in another
network namespace, across a veth pair, through memtap (docs/memory.md):
1. Bytes moved by an idle fork (one clone started and answering, one command
   run in it) and by an MPI hello (sfmpirun -n 4 inside the parent: 3 served
   clones), as a share of guest RAM. The clones of one host share memtap's
   page cache, so the MPI figure is all its clones together.
2. 4 KiB fault latency, touch to data: a process maps memtap's file privately
   (as QEMU does) and touches pages with data that are not cached yet, one at
   a time; each touch is one FUSE read, one request over the veth and the
   reply. Also memtap's own histogram of its requests.
3. Time to 8 clones answering, served vs local, alternating, median of --repeats.
JSON keys: remote_bytes_share_idle, remote_bytes_share_mpi, fetch_p50_us,
fetch_p99_us, served_vs_local_clone8.
With --lab: the fork across the hosts of a lab instead (bench/remote_lab.py):
fork8_spread_vs_local, remote_bytes_per_host. With --multicast
(bench/remote_multicast.py): multicast_egress_ratio, unicast_egress_ratio,
prefetch_fault_reduction. With --freed (bench/remote_freed.py):
freed_pages_saved_share.
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import report  # noqa: E402
from sfmpi.client import HostdClient  # noqa: E402
from sfmpi.paths import Paths  # noqa: E402
from tests.leakcheck import down_and_leaks  # noqa: E402

GUEST_MB = 512
MPI_HELLO = ["sh", "-c", "cd /root && sfmpirun -n 4 python3 -c 'from mpi4py import MPI; "
             "c = MPI.COMM_WORLD; print(\"hello from\", c.rank, \"of\", c.size)'"]


def run(client: HostdClient, name: str, argv: list[str]) -> int:
    return client.call("vm.exec", name=name, argv=argv)["code"]


def served_bytes(client: HostdClient, ckpt: str) -> int:
    server = client.call("stats")["memory"]["server"] or {}
    return server.get("checkpoints", {}).get(ckpt, {}).get("bytes_sent", 0)


def page_map_pages(path: Path) -> list[int]:
    raw = path.read_bytes()[24:]
    return [i * 8 + b for i, byte in enumerate(raw) if byte for b in range(8) if byte >> b & 1]


def touch_latencies(ram: Path, candidates: list[int], touches: int) -> list[float]:
    """Microseconds per first touch of an uncached page with data (mincore says which are cached)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = ram.stat().st_size
    with open(ram, "r+b") as f:
        m = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        vec = (ctypes.c_ubyte * (size // 4096))()
        libc.mincore(ctypes.c_void_p(base), ctypes.c_size_t(size), vec)
        cold = [p for p in candidates if not vec[p] & 1]
        random.Random(1).shuffle(cold)
        out = []
        for p in cold[:touches]:
            t0 = time.perf_counter_ns()
            m[p * 4096]
            out.append((time.perf_counter_ns() - t0) / 1000.0)
        del base
        m.close()
    return out


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--touches", type=int, default=2000)
    ap.add_argument("--image", default=None)
    ap.add_argument("--lab", action="store_true", help="the fork across a lab of 3 hosts (bench/remote_lab.py)")
    ap.add_argument("--freed", action="store_true", help="what free page reporting saves (bench/remote_freed.py)")
    ap.add_argument("--multicast", action="store_true",
                    help="multicast, push and prefetch across labs of 4 hosts (bench/remote_multicast.py)")
    args = ap.parse_args()
    if args.multicast:
        return multicast_main(args)
    if args.lab:
        return lab_main(args)
    if args.freed:
        return freed_main(args)
    home = Path(tempfile.mkdtemp(prefix="sfmpi-remote-", dir="/tmp"))
    os.environ["SFMPI_HOME"] = str(home)
    os.environ["SFMPI_CLONE_MEMORY"] = "served"     # sfmpirun's clones too
    from sfmpi.cli import _default_image
    client = HostdClient(Paths(home))
    res: dict = {"guest_mb": GUEST_MB}
    try:
        client.call("vm.start", name="rp", image=args.image or _default_image(), mem_mb=GUEST_MB, cpus=1,
                    timeout=600)
        assert run(client, "rp", ["sh", "-c", "echo warm > /dev/shm/v; sync"]) == 0
        ck = client.call("checkpoint", name="rp")["id"]
        ram_bytes = GUEST_MB << 20

        # 1a. idle fork: one clone up and answering, one command in it.
        clone = client.call("clone", checkpoint=ck, n=1, memory="served")["clones"][0]
        assert run(client, clone, ["cat", "/dev/shm/v"]) == 0
        res["remote_bytes_idle"] = served_bytes(client, ck)
        res["remote_bytes_share_idle"] = res["remote_bytes_idle"] / ram_bytes
        # 2. fault latency, while the clone's memtap serves the checkpoint.
        memtap = next(m for m in client.call("stats")["memory"]["memtaps"] if m["checkpoint"] == ck)
        ram = home / "memory" / "memtap" / ck / "mnt" / "ram"
        ckpt_dir = next(r["path"] for r in client.call("checkpoint.list") if r["id"] == ck)
        lat = touch_latencies(ram, page_map_pages(Path(ckpt_dir) / "ram.map"), args.touches)
        res.update(fetch_p50_us=quantile(lat, 0.5), fetch_p99_us=quantile(lat, 0.99), fetch_touches=len(lat),
                   memtap_hist_p50_us_upper=memtap["fetch_p50_us"], memtap_hist_p99_us_upper=memtap["fetch_p99_us"])
        client.call("vm.stop", name=clone)

        # 1b. MPI hello: sfmpirun in the parent forks 3 served clones.
        # The checkpoint sfmpirun makes is removed with its ticket; the server's counters keep it.
        before = set(client.call("stats")["memory"]["server"]["checkpoints"])
        assert run(client, "rp", MPI_HELLO) == 0
        stats = client.call("stats")["memory"]["server"]["checkpoints"]
        made = [c for c in stats if c not in before]
        if len(made) != 1:
            raise RuntimeError(f"sfmpirun's fork served {len(made)} checkpoints, not 1: {made}")
        mpi_ck = made[0]
        res["remote_bytes_mpi"] = stats[mpi_ck]["bytes_sent"]
        res["remote_bytes_share_mpi"] = res["remote_bytes_mpi"] / ram_bytes

        # 3. eight clones answering, served vs local, alternating.
        times: dict[str, list[float]] = {"served": [], "local": []}
        for _ in range(args.repeats):
            for mode in ("served", "local"):
                r = client.call("clone", checkpoint=ck, n=8, memory=mode)
                times[mode].append(r["total_ms"] / 1000.0)
                for name in r["clones"]:
                    client.call("vm.stop", name=name)
        res["clone8_served_s"] = statistics.median(times["served"])
        res["clone8_local_s"] = statistics.median(times["local"])
        res["served_vs_local_clone8"] = res["clone8_served_s"] / res["clone8_local_s"]
        res["clone8_runs_s"] = times
    except Exception as exc:  # noqa: BLE001 - reported with the leak check
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        res["host_leaks"] = down_and_leaks(client, home)
    return report(res, args.json, print_table)


def freed_main(args) -> int:
    from remote_freed import print_freed_table, run_freed

    from sfmpi.cli import _default_image
    home = Path(tempfile.mkdtemp(prefix="sfmpi-freed-", dir="/tmp"))
    os.environ["SFMPI_HOME"] = str(home)
    client = HostdClient(Paths(home))
    res: dict = {}
    try:
        res = run_freed(client, Paths(home).shm, args.image or _default_image())
    except Exception as exc:  # noqa: BLE001 - reported with the leak check
        res["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        res["host_leaks"] = down_and_leaks(client, home)
    return report(res, args.json, print_freed_table)


def multicast_main(args) -> int:
    from remote_multicast import print_multicast_table, run_multicast

    from sfmpi.cli import _default_image
    res = run_multicast(args.image or _default_image(), args.repeats)
    return report(res, args.json, print_multicast_table)


def lab_main(args) -> int:
    from remote_lab import print_lab_table, run_lab

    from sfmpi.cli import _default_image
    res = run_lab(args.image or _default_image(), args.repeats)
    return report(res, args.json, print_lab_table)


def print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"Served memory, {r['guest_mb']} MiB guest, memory server across a veth")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("target", justify="right")
    t.add_row("moved, idle fork (1 clone, 1 command)",
              f"{r['remote_bytes_idle'] / 2**20:.1f} MiB = {100 * r['remote_bytes_share_idle']:.1f}%", "<= 10%")
    t.add_row("moved, MPI hello (3 clones, one memtap)",
              f"{r['remote_bytes_mpi'] / 2**20:.1f} MiB = {100 * r['remote_bytes_share_mpi']:.1f}%", "<= 10%")
    t.add_row(f"4 KiB fault, touch to data, p50 ({r['fetch_touches']} touches)", f"{r['fetch_p50_us']:.0f} us",
              "<= 100 us")
    t.add_row("4 KiB fault, touch to data, p99", f"{r['fetch_p99_us']:.0f} us", "")
    t.add_row("8 clones answering: served / local",
              f"{r['clone8_served_s']:.2f} s / {r['clone8_local_s']:.2f} s = {r['served_vs_local_clone8']:.2f}x", "")
    Console(width=110).print(t)


if __name__ == "__main__":
    sys.exit(main())
