"""Elastic service pool: how soon a new worker serves under a step of load.

`python3 bench/pool.py [--json] [--step-rate R] [--step-s S]`: two pools one
after the other, on one host, from the same image and example service:
workers cloned from the warm checkpoint (sfmpi's way) and workers cold-booted
from the image with the service started and probed (a pool without fork).
Each run: 1 request/s for 10 s (one worker), then a step to --step-rate for
--step-s (the queue grows: more workers), then 1 request/s while the pool
shrinks back. Scale-out time: from the first request the controller saw
waiting in HAProxy's queue to the first new worker serving (the controller's
"serving" event; it polls the queue every 250 ms). Latency percentiles during
the step (scale-out) and after it (scale-in); failed requests.

JSON keys: scale_out_s, cold_scale_out_s, scale_out_speedup (cold / clone),
failed_requests (the cloned pool's), cold_failed_requests, and the latencies.
Targets: speedup >= 20 (SnowFlock reported 20x), failed_requests 0. Guests run
under TCG here; both pools pay it, and the two cores bound the throughput of
four workers to about that of two.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import LEFT_AFTER_DOWN, measure, report  # noqa: E402

from sfmpi.hostd.pool import loadgen  # noqa: E402
from sfmpi.paths import Paths  # noqa: E402
from tests.leakcheck import leaks  # noqa: E402

SERVING = re.compile(r"serving ([\d.]+) s after the first queued request")
PARAMS = ["--set", "free_count=3", "--set", "hold_ms=3000", "--set", "report_ms=500", "--set", "last_connect_ms=5000"]


def sfmpi(*args: str, env: dict, timeout: float = 1800) -> str:
    p = subprocess.run(["sfmpi", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"sfmpi {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def phases(url: str, step_rate: float, step_s: float, calm_s: float) -> dict[str, list[loadgen.Result]]:
    """Open-loop phases started on schedule, each in its own thread."""
    plan = [("before", 1.0, 10.0, 0.0), ("scale-out", step_rate, step_s, 10.0),
            ("scale-in", 1.0, calm_s, 10.0 + step_s)]
    out: dict[str, list] = {}
    t0 = time.monotonic()

    def run(name, rate, duration, at):
        time.sleep(max(0.0, t0 + at - time.monotonic()))
        out[name] = loadgen.run(url, rate, duration, timeout=180.0)
    threads = [threading.Thread(target=run, args=p) for p in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def one_pool(image: str, workers: str, step_rate: float, step_s: float, calm_s: float) -> dict:
    home = Path(tempfile.mkdtemp(prefix=f"sfmpi-bp{workers[0]}-", dir="/tmp"))
    env = {**os.environ, "SFMPI_HOME": str(home)}
    try:
        sfmpi("pool", "up", "bench", "--image", image, "--min", "1", "--max", "4", "--workers", workers, *PARAMS,
              "--timeout", "900", env=env)
        url = json.loads(sfmpi("pool", "status", "bench", "--json", env=env))["frontend"]
        counts: list[int] = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                counts.append(json.loads(sfmpi("pool", "status", "bench", "--json", env=env))["vm_count"])
                stop.wait(1.0)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        results = phases(url, step_rate, step_s, calm_s)
        stop.set()
        watcher.join()
        events = json.loads(sfmpi("pool", "status", "bench", "--json", env=env))["events"]
        waits = [float(m.group(1)) for e in events if e["kind"] == "serving" and (m := SERVING.search(e["detail"]))]
        sfmpi("pool", "down", "bench", env=env)
        out = {"workers": workers, "scale_out_s": waits[0] if waits else None, "scale_out_all_s": waits,
               "max_workers": max(counts, default=0),
               "failed_requests": sum(1 for rs in results.values() for r in rs if not r.ok)}
        for name, rs in results.items():
            s = loadgen.summary(rs)
            out[name] = {"requests": s["requests"], "failed": s["failed"], "p50_s": s["latency_s"]["p50"],
                         "p99_s": s["latency_s"]["p99"]}
        return out
    finally:
        subprocess.run(["sfmpi", "down"], env=env, capture_output=True, timeout=600)
        paths = Paths(home)
        left = leaks(paths.home, paths.shm)
        shutil.rmtree(home, ignore_errors=True)
        if left:
            raise RuntimeError(f"{LEFT_AFTER_DOWN}: {left}")


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"pool, 1 -> {res['step_rate']:g} requests/s for {res['step_s']:g} s, then 1 request/s")
    t.add_column("measure")
    t.add_column("cloned workers", justify="right")
    t.add_column("cold-booted workers", justify="right")
    t.add_column("target", justify="right")
    c, b = res["clone"], res["boot"]
    fmt = lambda v: "-" if v is None else f"{v:.2f} s"  # noqa: E731
    t.add_row("first queued request -> new worker serving", fmt(c["scale_out_s"]), fmt(b["scale_out_s"]),
              f">= 20x ({res['scale_out_speedup']}x)")
    t.add_row("workers reached", str(c["max_workers"]), str(b["max_workers"]), "4")
    for phase in ("scale-out", "scale-in"):
        t.add_row(f"latency p50 / p99 during {phase}", f"{c[phase]['p50_s']:.2f} / {c[phase]['p99_s']:.2f} s",
                  f"{b[phase]['p50_s']:.2f} / {b[phase]['p99_s']:.2f} s", "")
    t.add_row("failed requests", str(c["failed_requests"]), str(b["failed_requests"]), "0")
    Console().print(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--step-rate", type=float, default=6.0)
    ap.add_argument("--step-s", type=float, default=75.0)
    ap.add_argument("--calm-s", type=float, default=40.0)
    args = ap.parse_args()
    from sfmpi.image import default_image

    def both() -> dict:
        image = default_image()
        clone = one_pool(image, "clone", args.step_rate, args.step_s, args.calm_s)
        boot = one_pool(image, "boot", args.step_rate, args.step_s, args.calm_s)
        c, b = clone["scale_out_s"], boot["scale_out_s"]
        return dict(clone=clone, boot=boot, scale_out_s=c, cold_scale_out_s=b,
                    scale_out_speedup=round(b / c, 1) if c and b else None,
                    failed_requests=clone["failed_requests"], cold_failed_requests=boot["failed_requests"])
    res = measure({"step_rate": args.step_rate, "step_s": args.step_s}, both)
    return report(res, args.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
