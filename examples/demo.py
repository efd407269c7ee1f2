#!/usr/bin/env python3
"""`make demo`: boot a parent VM, fork it into 4 clones, show they resumed from the same instant.

Runs the real `sfmpi` commands, as a user would type them, against its own state
directory, and stops everything at the end (also on Ctrl-C or failure).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from rich.console import Console
from rich.table import Table

console = Console()
HOME = tempfile.mkdtemp(prefix="sfmpi-demo-", dir="/tmp")
ENV = {**os.environ, "SFMPI_HOME": HOME}
CLONES = int(os.environ.get("DEMO_CLONES", "4"))


def sfmpi(*args: str, capture: bool = True) -> str:
    console.print(f"[bold cyan]$ sfmpi {' '.join(args)}[/]")
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


if __name__ == "__main__":
    try:
        main()
    finally:
        subprocess.run(["sfmpi", "down"], env=ENV)
        shutil.rmtree(HOME, ignore_errors=True)
    sys.exit(0)
