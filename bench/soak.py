#!/usr/bin/env python3
"""Soak: N cycles of checkpoint, clone 4, exec in each (at once), stop, and what hostd holds after each.

    python3 bench/soak.py [--cycles 1000] [--clones 4] [--mode paused] [--json]

After every cycle it counts hostd's open files, threads and memory (RSS), the
QEMU processes of its state directory, the family's taps, the disk layers, the
files under the state and RAM directories, the checkpoints, and the budget
that tickets still reserve. A leak is growth from the end of the warm-up
(cycle WARMUP) to the end; memory may wander by RSS_SLACK before it counts.
Counts are compared as their peaks over the first window after the warm-up and
over the last window. The per-cycle time should stay flat: slowdown_last_vs_first is the median of
the last 100 cycles over the median of the first 100 (10% of the cycles each
when there are fewer than 1,000).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import report  # noqa: E402
from sfmpi.client import HostdClient  # noqa: E402
from sfmpi.hostd.net import netplan  # noqa: E402
from sfmpi.paths import Paths  # noqa: E402
from tests.leakcheck import down_and_leaks  # noqa: E402

WARMUP = 5
PHASES = ("checkpoint", "clone", "exec", "stop", "rm")
RSS_SLACK = 32 << 20
# SQLite grows its file by pages as it needs room and reuses them: a leak of
# rows shows in the row counts; the file may gain a few pages.
DB_SLACK = 1 << 20


def fd_kinds(pid: int) -> dict[str, int]:
    """A process's descriptors by kind: sockets, pipes, anon inodes, and files by directory."""
    kinds: dict[str, int] = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue   # closed while we looked
        kind = target.split(":")[0] if ":" in target and not target.startswith("/") else str(Path(target).parent)
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def files_under(path: Path) -> int:
    return sum(1 for _ in path.rglob("*")) if path.exists() else 0


class Soak:
    def __init__(self, image: str, clones: int, mode: str):
        self.home = Path(tempfile.mkdtemp(prefix="sfmpi-soak-", dir="/tmp"))
        os.environ["SFMPI_HOME"] = str(self.home)
        self.paths = Paths(self.home)
        self.client = HostdClient(self.paths)
        self.image, self.clones, self.mode = image, clones, mode
        self.pool = ThreadPoolExecutor(max_workers=clones)
        self.phase_s: list[dict] = []
        self.fds: list[dict] = []   # per sample, by kind: says what a rise in open_files is

    def counts(self) -> dict:
        status = self.client.call("ping")
        hostd = psutil.Process(status["pid"])
        self.fds.append(fd_kinds(hostd.pid))
        shm = str(self.paths.shm) + "/"
        qemus = sum(1 for p in psutil.process_iter(["name", "cmdline"])
                    if "qemu-system" in (p.info["name"] or "") and any(shm in a for a in p.info["cmdline"] or []))
        fam = next(r["family_no"] for r in self.client.call("vm.list") if r["name"] == "soak")
        # The family's taps live in hostd's network namespace.
        links = subprocess.run(["ip", "-n", self.paths.netns, "-o", "link"], capture_output=True, text=True).stdout
        taps = sum(1 for line in links.splitlines() if line.split(": ")[1].startswith(netplan.tap_prefix(fam)))
        return {"open_files": hostd.num_fds(), "threads": hostd.num_threads(), "rss_bytes": hostd.memory_info().rss,
                "qemu_processes": qemus, "taps": taps, "disk_layers": len(list(self.paths.disks.glob("*.qcow2"))),
                "state_files": files_under(self.home), "ram_dir_files": files_under(self.paths.shm),
                "checkpoints": len(self.client.call("checkpoint.list")),
                "reserved_mb": status["reserved"]["mem_mb"], "reserved_vcpus": status["reserved"]["vcpus"],
                **self.store_rows(),
                "db_bytes": sum(f.stat().st_size for f in self.home.glob(self.paths.db.name + "*"))}

    def store_rows(self) -> dict:
        """Rows per table of hostd's SQLite store, read-only (WAL lets a reader in)."""
        import sqlite3
        with sqlite3.connect(f"file:{self.paths.db}?mode=ro", uri=True) as db:
            return {f"rows_{t}": db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                    for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    def cycle(self) -> float:
        t0 = time.monotonic()
        marks = [t0]

        def mark() -> None:
            marks.append(time.monotonic())
        ck = self.client.call("checkpoint", name="soak", mode=self.mode)["id"]
        mark()
        names = self.client.call("clone", checkpoint=ck, n=self.clones)["clones"]
        mark()

        def run(name: str) -> None:
            res = self.client.call("vm.exec", name=name, argv=["sh", "-c", "hostname >/dev/null; echo ok"])
            if res["code"] != 0:
                raise RuntimeError(f"exec in {name} exited {res['code']}")
        # In every clone at once, then all stopped at once: as a job's clones are used and end.
        list(self.pool.map(run, names))
        mark()
        list(self.pool.map(lambda name: self.client.call("vm.stop", name=name), names))
        mark()
        self.client.call("checkpoint.rm", id=ck)
        mark()
        self.phase_s.append({p: b - a for p, a, b in zip(PHASES, marks, marks[1:])})
        return marks[-1] - t0

    def run(self, cycles: int, progress, max_minutes: float | None = None) -> dict:
        self.client.call("vm.start", name="soak", image=self.image, mem_mb=256, cpus=1, timeout=300)
        times, samples = [], []
        stop_at = time.monotonic() + max_minutes * 60 if max_minutes else None
        for i in range(1, cycles + 1):
            if stop_at is not None and time.monotonic() > stop_at:
                cycles = i - 1   # what was run is what is reported
                break
            times.append(self.cycle())
            samples.append(self.counts())
            if i % 50 == 0 or i == cycles:
                progress(i, times, {**samples[-1], **{f"{p}_s": round(v, 2) for p, v in self.phase_s[-1].items()}})
        window = 100 if cycles >= 1000 else max(1, cycles // 10)
        # Peaks per window, not two single samples: some counts swing by design
        # (a parent's chain grows by a layer per checkpoint until it is merged at
        # CHAIN_BOUND), and a leak is a peak that keeps rising.
        start = min(WARMUP, len(samples) - 1)
        early = samples[start:][:window]
        base = {k: max(s[k] for s in early) for k in samples[-1]}
        last = {k: max(s[k] for s in samples[-window:]) for k in samples[-1]}
        leaked = {k: max(0, last[k] - base[k]) for k in last if k not in ("rss_bytes", "db_bytes")}
        leaked["rss_bytes"] = max(0, last["rss_bytes"] - base["rss_bytes"] - RSS_SLACK)
        leaked["db_bytes"] = max(0, last["db_bytes"] - base["db_bytes"] - DB_SLACK)
        first, final = statistics.median(times[:window]), statistics.median(times[-window:])
        # Which step slowed down, if the whole did.
        phases = {p: statistics.median(x[p] for x in self.phase_s[-window:])
                  / max(1e-9, statistics.median(x[p] for x in self.phase_s[:window])) for p in PHASES}
        def peak(indices) -> int:
            return max(indices, key=lambda i: samples[i]["open_files"])
        early_peak, last_peak = peak(range(start, start + len(early))), peak(range(len(samples) - window, len(samples)))
        return {"cycles": cycles, "clones": self.clones,
                "fds_at_peak": {"first": self.fds[early_peak], "last": self.fds[last_peak]}, "mode": self.mode, "leaks": leaked,
                "leaked_total": sum(1 for v in leaked.values() if v), "slowdown_last_vs_first": final / first,
                "slowdown_by_phase": phases,
                "first_cycle_s": first, "last_cycle_s": final, "window": window,
                "after_warmup": base, "at_end": last, "cycle_s": times}

    def down(self) -> list[str]:
        return down_and_leaks(self.client, self.home)


def print_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console(width=max(Console().width, 120))
    t = Table(title=f"Soak: {result['cycles']} cycles of checkpoint ({result['mode']}), clone {result['clones']}, "
                    f"exec in each, stop, checkpoint rm")
    for col in ("counted", f"peak, first {result['window']} after cycle {WARMUP}",
                f"peak, last {result['window']}", "leaked"):
        t.add_column(col, justify="right")
    for k in result["at_end"]:
        t.add_row(k, str(result["after_warmup"][k]), str(result["at_end"][k]), str(result["leaks"][k]))
    console.print(t)
    console.print(f"cycle time: first {result['window']} median {result['first_cycle_s']:.2f} s, last "
                  f"{result['window']} median {result['last_cycle_s']:.2f} s: slowdown "
                  f"{result['slowdown_last_vs_first']:.3f}x ("
                  + ", ".join(f"{p} {v:.2f}x" for p, v in result["slowdown_by_phase"].items()) + ")")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--clones", type=int, default=4)
    ap.add_argument("--mode", default="paused", choices=["paused", "background"])
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop after this long even if fewer cycles ran (the result says how many)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--image", default=None)
    args = ap.parse_args()
    from sfmpi.cli import _default_image
    soak = Soak(args.image or _default_image(), args.clones, args.mode)

    def progress(i, times, last):
        print(f"cycle {i}: {times[-1]:.2f} s, {json.dumps(last)}", file=sys.stderr, flush=True)
    result: dict = {}
    try:
        result = soak.run(args.cycles, progress, args.max_minutes)
    except Exception as exc:  # noqa: BLE001 - reported with the leak check
        result = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        result["host_leaks"] = soak.down()
    return report(result, args.json, print_tables, failed=bool(result.get("leaked_total")), json_skip=("cycle_s",))


if __name__ == "__main__":
    sys.exit(main())
