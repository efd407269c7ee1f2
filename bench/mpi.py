#!/usr/bin/env python3
"""MPI benchmark: sfmpirun -n N end to end vs mpiexec on N running VMs vs cold boot.

    python3 bench/mpi.py [--json] [--ns 2,4,8] [--cold-ns 2,4,8] [--long 60] [--mpi mpich]

For each N and for a short job (cpi, 10^5 intervals) and a long one
(examples/mpi/timed_work.c, --long seconds):

- sfmpirun: `sfmpirun -n N PROGRAM` in a parent VM, timed in the parent from
  the command to its exit: ticket, fork of N-1 clones, SSH trust, mpiexec, join.
- ideal (zero-cost fork): the same mpiexec command line, agent and hostfile on
  N-1 clones that are already running (forked before the clock starts, joined
  after it stops): the job's own time on a ready cluster.
- cold boot: N VMs booted from the image in parallel until their agents answer,
  plus the ideal mpiexec time. The two are measured separately and added: VMs
  booted on their own each get a family network of their own, so mpiexec
  cannot span them; what a cold-booted cluster adds is its boot time.

Ranks: one per VM, the parent being one of them (sfmpirun's default). Everything
runs against its own state directory and is torn down with the test suite's
leak check.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fork import COLD_TIMEOUT, Bench, emit, ints  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "mpi"
SHORT_INTERVALS = 100000

# Runs in the parent: fork the cluster as sfmpirun does, time only mpiexec on it.
GUEST_IDEAL = """
import json, os, sys, time
from sfmpi.launcher import options, run
os.chdir("/root")
job = run.Job(options.parse(sys.argv[1:]))
try:
    job.start()
    t0 = time.monotonic()
    status = job.run_mpiexec()
    took = time.monotonic() - t0
    job.finish(status)
finally:
    job._clean_up()
print(json.dumps({"mpiexec_s": took, "status": status}))
"""

# Runs in the parent: sfmpirun as a user runs it, timed around the command.
GUEST_TIMED = """
import json, os, subprocess, sys, time
os.chdir("/root")
t0 = time.monotonic()
p = subprocess.run(["sfmpirun", *sys.argv[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
print(json.dumps({"total_s": time.monotonic() - t0, "status": p.returncode, "stderr": p.stderr[-2000:]}))
"""


class MpiBench(Bench):
    def put(self, vm: str, path: str, text: str) -> None:
        self.run_in(vm, f"cat > {path} <<'SFMPI_EOF'\n{text}\nSFMPI_EOF")

    def prepare(self, vm: str, flavour: str) -> None:
        cc = {"mpich": "mpicc.mpich", "openmpi": "mpicc.openmpi"}[flavour]
        for name in ("cpi.c", "timed_work.c"):
            self.put(vm, f"/root/{name}", (EXAMPLES / name).read_text())
        self.put(vm, "/root/ideal.py", GUEST_IDEAL)
        self.put(vm, "/root/timed.py", GUEST_TIMED)
        self.run_in(vm, f"cd /root && {cc} -O2 -o cpi cpi.c -lm && {cc} -O2 -o timed_work timed_work.c")

    def guest_json(self, vm: str, argv: list[str]) -> dict:
        out = self.exec_out(vm, argv)
        return json.loads(out.strip().splitlines()[-1])

    def job(self, vm: str, n: int, flavour: str, program: list[str], repeats: int) -> dict:
        args = ["--mpi", flavour, "-n", str(n), *program]
        sfmpirun, ideal = [], []
        for _ in range(repeats):
            r = self.guest_json(vm, ["python3", "/root/timed.py", *args])
            if r["status"] != 0:
                raise RuntimeError(f"sfmpirun {' '.join(args)} exited {r['status']}: {r['stderr']}")
            sfmpirun.append(r["total_s"])
            r = self.guest_json(vm, ["python3", "/root/ideal.py", *args])
            if r["status"] != 0:
                raise RuntimeError(f"mpiexec on running clones ({' '.join(args)}) exited {r['status']}")
            ideal.append(r["mpiexec_s"])
        return {"sfmpirun_s": statistics.median(sfmpirun), "ideal_s": statistics.median(ideal),
                "sfmpirun_runs_s": [round(x, 2) for x in sfmpirun], "ideal_runs_s": [round(x, 2) for x in ideal]}

    def cold_boot(self, n: int, mem_mb: int) -> dict:
        names = [f"cold{n}-{i}" for i in range(n)]
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=n) as pool:
            futures = [pool.submit(self.start, name, mem_mb, COLD_TIMEOUT) for name in names]
            errors = [f.exception() for f in futures if f.exception() is not None]
        took = time.monotonic() - t0
        live = {r["name"] for r in self.client.call("vm.list")}
        self.stop_all([x for x in names if x in live])
        return {"cold_error": str(errors[0]).splitlines()[0]} if errors else {"boot_s": took}

    def run(self, ns: list[int], cold_ns: list[int], long_s: int, flavour: str, repeats: int,
            mem_mb: int) -> list[dict]:
        self.start("mparent", mem_mb)
        self.prepare("mparent", flavour)
        rows = []
        for n in ns:
            short = self.job("mparent", n, flavour, ["./cpi", str(SHORT_INTERVALS)], repeats)
            long = self.job("mparent", n, flavour, ["./timed_work", str(long_s)], 1)
            row = {"n": n, "short": short, "long": long}
            if n in cold_ns:
                row["cold"] = self.cold_boot(n, mem_mb)
            rows.append(row)
        self.stop_all(["mparent"])
        return rows


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for kind, title in (("short", f"short job (cpi, {SHORT_INTERVALS} intervals), median of {result['repeats']}"),
                        ("long", f"long job (timed_work {result['long_s']} s), one run")):
        t = Table(title=f"sfmpirun -n N vs mpiexec on N running VMs vs cold boot: {title}; "
                        f"{result['mpi']}, {result['mem_mb']} MiB guests, accel {result['accel']}")
        for col in ("N", "sfmpirun (s)", "ideal (s)", "sfmpirun / ideal", "cold boot + ideal (s)",
                    "cold / sfmpirun"):
            t.add_column(col, justify="right")
        for r in result["rows"]:
            job = r[kind]
            cold = r.get("cold", {})
            if "boot_s" in cold:
                cold_total = cold["boot_s"] + job["ideal_s"]
                cold_cells = (f"{cold_total:.1f}", ratio(cold_total, job["sfmpirun_s"]))
            else:
                cold_cells = ("failed" if "cold_error" in cold else "-", "-")
            t.add_row(str(r["n"]), f"{job['sfmpirun_s']:.2f}", f"{job['ideal_s']:.2f}",
                      ratio(job["sfmpirun_s"], job["ideal_s"]), *cold_cells)
        console.print(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    ap.add_argument("--ns", default="2,4,8")
    ap.add_argument("--cold-ns", default="2,4,8", help="N for which to cold-boot N VMs (slow: minutes)")
    ap.add_argument("--long", type=int, default=60, help="seconds of the long job")
    ap.add_argument("--mpi", default="mpich", choices=("mpich", "openmpi"))
    ap.add_argument("--mem", type=int, default=512, help="MiB per guest")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the short job per N")
    ap.add_argument("--image", default=None)
    args = ap.parse_args()

    from sfmpi.cli import _default_image
    bench = MpiBench(args.image or _default_image())
    left: list[str] = []
    try:
        rows = bench.run(ints(args.ns), ints(args.cold_ns), args.long, args.mpi, args.repeats, args.mem)
        accel = json.loads(bench.paths.accel_cache.read_text())["accel"]
    finally:
        left = bench.down()
    result = {"mpi": args.mpi, "mem_mb": args.mem, "repeats": args.repeats, "long_s": args.long,
              "accel": accel, "cpus": os.cpu_count(), "rows": rows, "leaks": left}
    return emit(result, args.json, print_tables)


if __name__ == "__main__":
    sys.exit(main())
