#!/usr/bin/env python3
"""`make demo`: boot a parent VM, fork it into 4 clones, show they resumed from
the same instant; then the main job: `sfmpirun -n 4` of an unmodified MPI
program inside the parent, each rank on a clone forked for it, with the timings.

Runs the real `sfmpi` commands, as a user would type them, against its own state
directory, and stops everything at the end (also on Ctrl-C or failure).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()
HOME = tempfile.mkdtemp(prefix="sfmpi-demo-", dir="/tmp")
ENV = {**os.environ, "SFMPI_HOME": HOME}
CLONES = int(os.environ.get("DEMO_CLONES", "4"))
RANKS = int(os.environ.get("DEMO_RANKS", "4"))
CPI = Path(__file__).resolve().parent / "mpi" / "cpi.c"


def sfmpi(*args: str, capture: bool = True) -> str:
    shown = " ".join(args).splitlines()[0]
    console.print(f"[bold cyan]$ sfmpi {shown[:110]}{' ...' if len(shown) > 110 or chr(10) in ' '.join(args) else ''}[/]",
                  markup=True, highlight=False)
    p = subprocess.run(["sfmpi", *args], env=ENV, text=True,
                       stdout=subprocess.PIPE if capture else None)
    if p.returncode != 0:
        raise SystemExit(f"demo: `sfmpi {' '.join(args)}` failed with exit code {p.returncode}")
    return p.stdout or ""


def main() -> None:
    image = sfmpi("image", "build").strip()
    boot = json.loads(sfmpi("vm", "start", "demo", "--image", image, "--mem", "512M", "--json"))
    console.print(f"parent booted under {boot['accel']} in {boot['boot_ms'] / 1000:.1f} s "
                  f"(agent answered after {boot['agent_ms'] / 1000:.1f} s)")
    # State the clones must inherit: a file on disk and a value held in guest RAM only.
    sfmpi("vm", "exec", "demo", "--", "sh", "-c",
          "echo 'written by the parent before the fork' > /root/note; "
          "python3 -c 'import uuid; print(uuid.uuid4())' > /dev/shm/ram-only")
    ck = json.loads(sfmpi("checkpoint", "demo", "--json"))
    console.print(f"checkpoint {ck['id']}: parent paused {ck['pause_ms']:.1f} ms, "
                  f"{ck['ram_allocated_mb']:.0f} of {ck['ram_mb']} MiB RAM non-zero")
    res = json.loads(sfmpi("clone", ck["id"], "-n", str(CLONES), "--json"))
    table = Table(title=f"{res['granted']} clones: all resumed in {res['resumed_ms'] / 1000:.2f} s, "
                        f"all agents answered in {res['total_ms'] / 1000:.2f} s")
    for col in ("VM", "disk: note from parent", "RAM: value from parent", "private file"):
        table.add_column(col)
    for name in ["demo"] + res["clones"]:
        sfmpi("vm", "exec", name, "--", "sh", "-c", f"echo {name} > /root/whoami")
    for name in ["demo"] + res["clones"]:
        out = sfmpi("vm", "exec", name, "--", "sh", "-c",
                    "cat /root/note; cat /dev/shm/ram-only; cat /root/whoami").splitlines()
        table.add_row(name, *out)
    console.print(table)
    console.print("Every clone has the parent's disk and RAM state at the checkpoint, "
                  "and a private disk of its own.")
    sfmpi("vm", "list", capture=False)
    for name in res["clones"]:
        sfmpi("vm", "stop", name)
    mpi_job()


def in_parent(script: str) -> str:
    return sfmpi("vm", "exec", "demo", "--", "sh", "-c", script)


def mpi_job() -> None:
    """The main job: an MPI program started in the parent forks the cluster it needs."""
    console.rule("sfmpirun: an unmodified MPI program on a cluster forked for it")
    in_parent(f"cat > /root/cpi.c <<'EOF'\n{CPI.read_text()}\nEOF\n"
              "cd /root && mpicc.mpich -O2 -o cpi cpi.c -lm")
    t0 = time.monotonic()
    ref = in_parent(f"cd /root && mpiexec.mpich -n {RANKS} ./cpi 2000000")
    one_vm_s = time.monotonic() - t0
    t0 = time.monotonic()
    out = in_parent(f"cd /root && sfmpirun -v -n {RANKS} ./cpi 2000000 2>&1")
    forked_s = time.monotonic() - t0
    ranks = re.findall(r"^rank (\d+) of \d+ on (\S+)$", out, re.M)
    table = Table(title=f"sfmpirun -n {RANKS} ./cpi inside VM demo")
    table.add_column("rank", justify="right")
    table.add_column("VM it ran on")
    for rank, host in sorted(ranks, key=lambda r: int(r[0])):
        table.add_row(rank, host)
    console.print(table)
    pi = re.search(r"^pi is approximately (\S+)", out, re.M)
    same = pi and pi.group(1) in ref
    console.print(f"pi = {pi.group(1) if pi else '?'} ({'same as' if same else 'DIFFERENT from'} mpiexec "
                  f"on one VM); {len({h for _, h in ranks})} VMs for {RANKS} ranks")
    console.print("sfmpirun's steps (-v), seconds from its start:")
    for line in out.splitlines():
        if line.startswith("sfmpirun: ["):
            console.print(f"  {line[len('sfmpirun: '):]}", markup=False)
    console.print(f"whole job, fork of the cluster included: {forked_s:.1f} s "
                  f"(mpiexec -n {RANKS} on the one VM: {one_vm_s:.1f} s)")
    if not same or len({h for _, h in ranks}) != RANKS:
        raise SystemExit("demo: the MPI job did not run one rank per VM with the right result")


if __name__ == "__main__":
    try:
        main()
    finally:
        subprocess.run(["sfmpi", "down"], env=ENV)
        shutil.rmtree(HOME, ignore_errors=True)
    sys.exit(0)
