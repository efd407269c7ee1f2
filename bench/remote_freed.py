"""bench/remote.py --freed: what free page reporting saves a served clone.

Two 512 MiB parents side by side, one with free page reporting and one
started --no-free-page-reporting. In each a process writes 150 MiB of random
data and exits (the guest frees the pages); the reporting parent's QEMU drops
them from its RAM file. Then a checkpoint, one clone whose RAM is served
(memtap), and in the clone a program that allocates and writes 150 MiB: the
guest hands it the pages freed before the fork, and every write faults its
page in from the checkpoint. With reporting those pages are zero (not in the
page map, never sent); without it each carries the old data over the wire.
Bytes moved per clone: the memory server's bytes sent for that checkpoint.
JSON keys: freed_pages_saved_share (1 - with / without), freed_bytes_with,
freed_bytes_without, nonzero_mb_with, nonzero_mb_without.
"""
from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

from sfmpi.client import HostdClient

MiB = 1 << 20
HOLD_MB = 150
WRITE = ["python3", "-c", f"import os\nb = bytearray(os.urandom(1 << 20) * {HOLD_MB})\n"
         "open('/run/held', 'w').write(str(os.getpid()))\nimport time; time.sleep(10 ** 6)"]
USE = ["python3", "-c", f"b = bytearray({HOLD_MB} << 20)\nfor i in range(0, len(b), 4096): b[i] = 1"]


def _exec(client: HostdClient, name: str, argv: list[str]) -> None:
    code = client.call("vm.exec", name=name, argv=argv)["code"]
    if code != 0:
        raise RuntimeError(f"{name}: {argv[:3]} exited {code}")


def _ram_mb(shm: Path, vm: str) -> float:
    return os.stat(shm / f"{vm}.ram").st_blocks * 512 / MiB


def one(client: HostdClient, shm: Path, image: str, name: str, reporting: bool) -> dict:
    client.call("vm.start", name=name, image=image, mem_mb=512, cpus=1, timeout=600, ram_backing="tmpfs",
                free_page_reporting=reporting)
    _exec(client, name, ["sh", "-c", f"nohup {shlex.join(WRITE)} >/dev/null 2>&1 & "
                         "for i in $(seq 600); do [ -s /run/held ] && break; sleep 0.3; done; "
                         "kill $(cat /run/held); sleep 1"])
    before, deadline = _ram_mb(shm, name), time.monotonic() + 60
    while reporting and _ram_mb(shm, name) > before - HOLD_MB * 0.6 and time.monotonic() < deadline:
        time.sleep(1)
    if not reporting:
        time.sleep(8)
    ck = client.call("checkpoint", name=name)["id"]
    clone = client.call("clone", checkpoint=ck, n=1, memory="served")["clones"][0]
    _exec(client, clone, USE)
    server = client.call("stats")["memory"]["server"] or {}
    sent = server.get("checkpoints", {}).get(ck, {}).get("bytes_sent", 0)
    from sfmpi import _native
    row = next(r for r in client.call("checkpoint.list") if r["id"] == ck)
    nonzero = _native.scan(str(Path(row["path"]) / "ram"), "/dev/null") * 4096 / MiB
    client.call("vm.stop", name=clone)
    client.call("vm.stop", name=name)
    return {"bytes": sent, "nonzero_mb": nonzero}


def run_freed(client: HostdClient, shm: Path, image: str) -> dict:
    on = one(client, shm, image, "fon", True)
    off = one(client, shm, image, "foff", False)
    return {"freed_bytes_with": on["bytes"], "freed_bytes_without": off["bytes"],
            "nonzero_mb_with": on["nonzero_mb"], "nonzero_mb_without": off["nonzero_mb"],
            "freed_pages_saved_share": 1.0 - on["bytes"] / off["bytes"] if off["bytes"] else float("nan")}


def print_freed_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"Free page reporting: {HOLD_MB} MiB freed before the fork, then used by a served clone")
    t.add_column("measure")
    t.add_column("with reporting", justify="right")
    t.add_column("without", justify="right")
    t.add_row("checkpoint's non-zero pages", f"{r['nonzero_mb_with']:.0f} MiB", f"{r['nonzero_mb_without']:.0f} MiB")
    t.add_row("moved for the clone", f"{r['freed_bytes_with'] / MiB:.1f} MiB", f"{r['freed_bytes_without'] / MiB:.1f} MiB")
    t.add_row("saved by reporting", f"{r['freed_pages_saved_share']:.0%}", "")
    Console().print(t)
