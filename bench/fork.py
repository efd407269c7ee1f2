#!/usr/bin/env python3
"""Fork benchmark: clone N vs cold-boot N, and the parent's pause per checkpoint.

    python3 bench/fork.py [--json] [--ns 1,4,8,16] [--cold-ns 1,4,8,16] [--sizes 256,512,1024]
    python3 bench/fork.py --driver libvirt [--json] [--repeats 5]

1. For each N: time from the clone request to all N clones running guest code
   (their agent answered), median of --repeats, vs cold-booting N VMs from the
   image in parallel to the same point (agent answered).
2. For guests of 256 MiB, 512 MiB and 1 GiB, RAM on tmpfs and on 2 MiB huge
   pages: the parent's pause per checkpoint
   (from QEMU's STOP/RESUME event timestamps) for the background snapshot
   (default), the live pre-copy and the copy-while-paused fallback, with the
   guest idle and with a guest process dirtying 64 MiB of memory in a loop.

With --driver libvirt, instead: the libvirt driver beside the direct one in
one run (a hostd of each, a settled parent in each, their clone-8 requests and
background checkpoints alternating): the time to 8 clones' agents answering
and the parent's pause; JSON key libvirt_vs_direct_clone8 (the medians' ratio).

Everything runs against its own state directory and is torn down at the end
(with the same leak check as the tests). Side by side in one run: this machine
is shared and noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sfmpi.client import HostdClient  # noqa: E402
from sfmpi.paths import Paths  # noqa: E402
from tests import hugetlb  # noqa: E402
from tests.leakcheck import down_and_leaks  # noqa: E402

COLD_TIMEOUT = 1200.0
DIRTY = ("import time\nb = bytearray(64 << 20)\ni = 0\n"
         "while True:\n    b[(i * 4096) % len(b)] = i & 255\n    i += 1\n")


# Runs in the parent: fork into M clones that exit at once, join, print hostd's timings.
GUEST_CLONE = """
import json, time, sfmpi
from sfmpi import api
t = sfmpi.request_ticket(M)
t0 = time.monotonic()
ans = api.call("clone", ticket=t.id)
if ans["id"]:
    sfmpi.exit(0)
call_ms = (time.monotonic() - t0) * 1000
sfmpi.join(t)
print(json.dumps({**ans["timings"], "guest_call_ms": call_ms}))
"""


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


class Bench:
    def __init__(self, image: str, driver: str | None = None):
        self.home = Path(tempfile.mkdtemp(prefix="sfmpi-bench-", dir="/tmp"))
        os.environ["SFMPI_HOME"] = str(self.home)
        # N = 16 clones plus the parent exceed the default 8 vCPUs per core of a
        # 2-core host; the benchmark's own hostd gets room for them.
        os.environ.setdefault("SFMPI_VCPU_BUDGET", "64")
        self.paths = Paths(self.home)
        self.client = HostdClient(self.paths)
        self.image = image
        if driver is not None:
            # hostd reads both from its environment when the first call starts it: now.
            os.environ["SFMPI_DRIVER"] = driver
            self.client.call("ping")

    def start(self, name: str, mem_mb: int, timeout: float = 300, ram_backing: str = "tmpfs") -> dict:
        return self.client.call("vm.start", name=name, image=self.image, mem_mb=mem_mb, cpus=1,
                                timeout=timeout, ram_backing=ram_backing)

    def settle(self, name: str, idle_share: float = 0.05, timeout: float = 180.0) -> float:
        """Waits until the VM's QEMU uses under `idle_share` of a core over 2 s.

        A parent is forked after it has run a while, not in the tail of its
        boot: under TCG the first minute after boot still runs systemd's
        start jobs, which would take the CPU from the clones being measured.
        Returns the seconds waited."""
        pid = next(v["pid"] for v in self.client.call("vm.list") if v["name"] == name)
        tick = os.sysconf("SC_CLK_TCK")

        def cpu_s() -> float:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / tick

        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            before = cpu_s()
            time.sleep(2.0)
            if (cpu_s() - before) / 2.0 < idle_share:
                break
        return time.monotonic() - t0

    def stop_all(self, names: list[str]) -> None:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda n: self.client.call("vm.stop", name=n), names))

    def run_in(self, vm: str, script: str) -> None:
        res = self.client.call("vm.exec", name=vm, argv=["sh", "-c", script])
        if res["code"] != 0:
            raise RuntimeError(f"{vm}: {script!r} exited {res['code']}")

    def down(self) -> list[str]:
        return down_and_leaks(self.client, self.home)

    # -- 1. clone vs cold boot --------------------------------------------
    def clone_vs_cold(self, ns: list[int], cold_ns: list[int], repeats: int, mem_mb: int) -> list[dict]:
        self.start("bparent", mem_mb)
        self.settle("bparent")
        ck = self.client.call("checkpoint", name="bparent")
        rows = []
        for n in ns:
            hostd_ms, wall_ms, resumed_ms = [], [], []
            for _ in range(repeats):
                t0 = time.monotonic()
                res = self.client.call("clone", checkpoint=ck["id"], n=n)
                wall_ms.append((time.monotonic() - t0) * 1000)
                hostd_ms.append(res["total_ms"])
                resumed_ms.append(res["resumed_ms"])
                self.stop_all(res["clones"])
            row = {"n": n, "clone_s": statistics.median(wall_ms) / 1000,
                   "clone_hostd_s": statistics.median(hostd_ms) / 1000,
                   "resumed_s": statistics.median(resumed_ms) / 1000,
                   "clone_runs_s": [round(x / 1000, 3) for x in wall_ms]}
            if n in cold_ns:
                names = [f"cold{n}-{i}" for i in range(n)]
                t0 = time.monotonic()
                # N full boots share 2 cores: give them time, and keep what was
                # measured so far if one still fails.
                with ThreadPoolExecutor(max_workers=n) as pool:
                    futures = [pool.submit(self.start, name, mem_mb, COLD_TIMEOUT) for name in names]
                    errors = [f.exception() for f in futures if f.exception() is not None]
                if errors:
                    row["cold_error"] = str(errors[0]).splitlines()[0]
                else:
                    row["cold_s"] = time.monotonic() - t0
                    row["speedup"] = row["cold_s"] / row["clone_s"]
                live = {r["name"] for r in self.client.call("vm.list")}
                self.stop_all([n for n in names if n in live])
            rows.append(row)
        self.stop_all(["bparent"])
        return rows

    # -- 3. clone() called in the guest ------------------------------------
    def guest_clone(self, ms: list[int], repeats: int, mem_mb: int) -> list[dict]:
        """From the parent's clone() call reaching hostd to all m clones having
        returned from theirs (re-identified), as hostd measures it; and the
        call as the parent's program sees it."""
        self.start("gparent", mem_mb)
        self.settle("gparent")
        rows = []
        for m in ms:
            runs = []
            for _ in range(repeats):
                out = self.exec_out("gparent", ["python3", "-c", GUEST_CLONE.replace("M", str(m))])
                runs.append(json.loads(out.strip().splitlines()[-1]))
            rows.append({
                "m": m,
                "all_returned_s": statistics.median(r["total_ms"] for r in runs) / 1000,
                "checkpoint_s": statistics.median(r["checkpoint_ms"] for r in runs) / 1000,
                "clones_s": statistics.median(r["clones_ms"] for r in runs) / 1000,
                "resumed_s": statistics.median(r["resumed_ms"] for r in runs) / 1000,
                "guest_call_s": statistics.median(r["guest_call_ms"] for r in runs) / 1000,
                "runs_s": [round(r["total_ms"] / 1000, 3) for r in runs],
            })
        self.stop_all(["gparent"])
        return rows

    def exec_out(self, vm: str, argv: list[str]) -> str:
        out = bytearray()
        res = self.client.call("vm.exec", name=vm, argv=argv,
                               on_output=lambda fd, data: out.extend(data) if fd == 1 else None)
        if res["code"] != 0:
            raise RuntimeError(f"{vm}: {argv} exited {res['code']}")
        return out.decode()

    # -- 2. parent pause ----------------------------------------------------
    def pauses(self, sizes: list[int], repeats: int, backings: list[str]) -> list[dict]:
        rows: list[dict] = []
        if not sizes:
            return rows
        for backing in backings:
            if backing == "hugepages":
                # One parent at a time: room for the largest.
                with hugetlb.hugetlbfs(max(sizes) // 2 + 16):
                    rows += self._pauses(sizes, repeats, backing)
            else:
                rows += self._pauses(sizes, repeats, backing)
        return rows

    def _pauses(self, sizes: list[int], repeats: int, backing: str) -> list[dict]:
        rows = []
        for mem in sizes:
            name = f"pause{mem}"
            self.start(name, mem, ram_backing=backing)
            for load in ("idle", "dirty 64M"):
                if load != "idle":
                    self.run_in(name, f"printf '%s' '{DIRTY}' > /tmp/dirty.py; "
                                      "setsid python3 /tmp/dirty.py >/dev/null 2>&1 < /dev/null &")
                    time.sleep(2)
                for mode in ("background", "precopy", "paused"):
                    runs = [self.client.call("checkpoint", name=name, mode=mode) for _ in range(repeats)]
                    rows.append({
                        "mem_mb": mem, "ram_backing": backing, "load": load, "mode": mode,
                        "pause_ms": statistics.median(r["pause_ms"] for r in runs),
                        "pause_runs_ms": [round(r["pause_ms"], 1) for r in runs],
                        "checkpoint_s": statistics.median(r["timings"]["total_ms"] for r in runs) / 1000,
                        "ram_allocated_mb": runs[-1]["ram_allocated_mb"],
                    })
            self.stop_all([name])
        return rows


def compare_drivers(image: str, repeats: int, mem_mb: int, n: int = 8) -> dict:
    """clone-n and the background checkpoint's pause on the direct and the
    libvirt driver, alternating, each with its own hostd and settled parent."""
    benches = {}
    result: dict = {"drivers": [], "leaks": []}
    try:
        for driver in ("direct", "libvirt"):
            benches[driver] = Bench(image, driver)
        for driver, b in benches.items():
            b.start(f"{driver[:3]}p", mem_mb)
        for driver, b in benches.items():
            b.settle(f"{driver[:3]}p")
        cks = {d: b.client.call("checkpoint", name=f"{d[:3]}p") for d, b in benches.items()}
        runs: dict = {d: {"clone_s": [], "resumed_s": [], "pause_ms": []} for d in benches}
        for _ in range(repeats):
            for driver, b in benches.items():
                t0 = time.monotonic()
                res = b.client.call("clone", checkpoint=cks[driver]["id"], n=n)
                runs[driver]["clone_s"].append(time.monotonic() - t0)
                runs[driver]["resumed_s"].append(res["resumed_ms"] / 1000)
                b.stop_all(res["clones"])
                ck = b.client.call("checkpoint", name=f"{driver[:3]}p", mode="background")
                runs[driver]["pause_ms"].append(ck["pause_ms"])
                b.client.call("checkpoint.rm", id=ck["id"])
        for driver, r in runs.items():
            result["drivers"].append({
                "driver": driver, "n": n, "clone_s": statistics.median(r["clone_s"]),
                "resumed_s": statistics.median(r["resumed_s"]), "pause_ms": statistics.median(r["pause_ms"]),
                "clone_runs_s": [round(x, 3) for x in r["clone_s"]],
                "pause_runs_ms": [round(x, 1) for x in r["pause_ms"]]})
        by = {r["driver"]: r for r in result["drivers"]}
        result[f"libvirt_vs_direct_clone{n}"] = by["libvirt"]["clone_s"] / by["direct"]["clone_s"]
        result["libvirt_vs_direct_pause"] = by["libvirt"]["pause_ms"] / by["direct"]["pause_ms"]
    except Exception as exc:  # noqa: BLE001 - reported with the partial result
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for b in benches.values():
            result["accel"] = json.loads(b.paths.accel_cache.read_text())["accel"] \
                if b.paths.accel_cache.exists() else "unknown"
            result["leaks"] += b.down()
    return result


def print_driver_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    t = Table(title=f"Direct vs libvirt driver ({result['mem_mb']} MiB guests, accel {result.get('accel')}, "
                    f"median of {result['repeats']}, alternating in one run)")
    for col in ("driver", "N", "all resumed (s)", "all agents answered (s)", "runs (s)", "pause ms", "runs (ms)"):
        t.add_column(col, justify="right")
    for r in result["drivers"]:
        t.add_row(r["driver"], str(r["n"]), f"{r['resumed_s']:.3f}", f"{r['clone_s']:.3f}",
                  " ".join(f"{x:.2f}" for x in r["clone_runs_s"]), f"{r['pause_ms']:.1f}",
                  " ".join(f"{x:.0f}" for x in r["pause_runs_ms"]))
    console.print(t)
    ratio = result.get("libvirt_vs_direct_clone8")
    if ratio is not None:
        console.print(f"libvirt / direct, clone-8: {ratio:.2f}x (target <= 1.5x); "
                      f"pause: {result['libvirt_vs_direct_pause']:.2f}x")


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    t = Table(title=f"Clone N vs cold boot N ({result['mem_mb']} MiB guests, accel {result['accel']}, "
                    f"median of {result['repeats']}; speedup = cold boot / agents answered)")
    for col in ("N", "all resumed (s)", "all agents answered (s)", "cold boot (s)", "speedup"):
        t.add_column(col, justify="right")
    for r in result["clone_vs_cold"]:
        t.add_row(str(r["n"]), f"{r['resumed_s']:.3f}", f"{r['clone_s']:.3f}",
                  f"{r['cold_s']:.1f}" if "cold_s" in r else ("failed" if "cold_error" in r else "-"),
                  f"{r['speedup']:.0f}x" if "speedup" in r else "-")
    console.print(t)
    if result.get("guest_clone"):
        t = Table(title="clone() in the guest: from the call reaching hostd to all m clones returned "
                        "(re-identified); median")
        for col in ("m", "checkpoint (s)", "clones resumed (s)", "all returned (s)", "parent's call (s)"):
            t.add_column(col, justify="right")
        for r in result["guest_clone"]:
            t.add_row(str(r["m"]), f"{r['checkpoint_s']:.3f}", f"{r['resumed_s']:.3f}",
                      f"{r['all_returned_s']:.3f}", f"{r['guest_call_s']:.3f}")
        console.print(t)
    t = Table(title="Parent pause per checkpoint (QEMU STOP->RESUME)")
    for col in ("RAM", "RAM on", "guest", "mode", "pause ms", "min-max", "ckpt s", "file MiB"):
        t.add_column(col, justify="right")
    for r in result["pauses"]:
        t.add_row(f"{r['mem_mb']} MiB", r["ram_backing"], r["load"], r["mode"], f"{r['pause_ms']:.1f}",
                  f"{min(r['pause_runs_ms']):.0f}-{max(r['pause_runs_ms']):.0f}", f"{r['checkpoint_s']:.2f}",
                  f"{r['ram_allocated_mb']:.0f}")
    console.print(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    ap.add_argument("--ns", default="1,4,8,16")
    ap.add_argument("--cold-ns", default="1,4,8,16")
    ap.add_argument("--ms", default="1,4,8", help="clones per in-guest clone() call")
    ap.add_argument("--sizes", default="256,512,1024")
    ap.add_argument("--mem", type=int, default=512, help="MiB per guest for the clone benchmark")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ram-backings", default="tmpfs,hugepages",
                    help="parent RAM for the pause table: tmpfs and/or hugepages (a hugetlbfs the "
                         "benchmark reserves and mounts, and gives back)")
    ap.add_argument("--image", default=None)
    ap.add_argument("--driver", choices=["direct", "libvirt"], default="direct",
                    help="libvirt: only the libvirt driver beside the direct one (clone-8 and pause)")
    args = ap.parse_args()

    from sfmpi.cli import _default_image
    if args.driver == "libvirt":
        result = {"mem_mb": args.mem, "repeats": args.repeats, "cpus": os.cpu_count(),
                  **compare_drivers(args.image or _default_image(), args.repeats, args.mem)}
        return emit(result, args.json, print_driver_table)
    bench = Bench(args.image or _default_image())
    result = {"mem_mb": args.mem, "repeats": args.repeats, "cpus": os.cpu_count(),
              "clone_vs_cold": [], "guest_clone": [], "pauses": []}
    try:
        # Each part lands in the result as it ends: a later failure keeps what was measured.
        result["clone_vs_cold"] = bench.clone_vs_cold(ints(args.ns), ints(args.cold_ns), args.repeats, args.mem)
        if args.ms:
            result["guest_clone"] = bench.guest_clone(ints(args.ms), args.repeats, args.mem)
        result["pauses"] = bench.pauses(ints(args.sizes), args.repeats,
                                        [b for b in args.ram_backings.split(",") if b])
    except Exception as exc:  # noqa: BLE001 - reported with the partial result
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        result["accel"] = json.loads(bench.paths.accel_cache.read_text())["accel"] \
            if bench.paths.accel_cache.exists() else "unknown"
        result["leaks"] = bench.down()
    return emit(result, args.json, print_tables)


def emit(result: dict, as_json: bool, tables) -> int:
    """One JSON document, or the tables, any leak and any failure; non-zero if
    something leaked or failed."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        tables(result)
        if result["leaks"]:
            print(f"LEAKS: {result['leaks']}")
        if result.get("error"):
            print(f"FAILED: {result['error']}")
    return 1 if result["leaks"] or result.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
