"""Elastic Slurm: how long a job waits for powered-down cloud nodes.

`python3 bench/slurm.py [--json] [--repeats N]`: a lab of one host runs hostd,
slurmctld runs in its namespace with 2 cloud nodes (`sfmpi slurm config`), the
worker is built by `sfmpi slurm worker-image`. Each run: the nodes are
powered down; `srun -p cloud -N 2 hostname` starts; the clock stops at its
first line of output (the first task running). Side by side in one run:
ResumeProgram forking the worker (`sfmpi slurm resume`, mode clone) and
booting a VM per node from the same image and setting it up the same way
(mode boot, what a cloud ResumeProgram does without sfmpi).

JSON keys: resume_clone_s, resume_cold_s (medians), resume_speedup (cold / clone).
Target: speedup >= 10. Guests run under TCG here; both modes pay it.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import report  # noqa: E402

from sfmpi.hostd.lab import topology  # noqa: E402
from tests.batch.slurm import SlurmCluster  # noqa: E402
from tests.leakcheck import lab_leaks  # noqa: E402

NODES = "cloud[1-2]"


def sfmpi(*args: str, env: dict, timeout: float = 1800) -> str:
    p = subprocess.run(["sfmpi", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"sfmpi {' '.join(args)}: {p.stderr.strip()[-400:]}")
    return p.stdout


def wait(pred, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise RuntimeError(f"not {what} within {timeout:.0f} s")


def node_vms(env: dict) -> list[str]:
    rows = json.loads(sfmpi("--host", "lab1", "vm", "list", "--json", env=env))
    return [r["name"] for r in rows if r["name"] != "slurm-worker"]


def powered_down(cluster: SlurmCluster) -> bool:
    out = cluster.run(["sinfo", "-h", "-N", "-p", "cloud", "-o", "%T"], check=False).stdout.split()
    return len(out) == 2 and all(s == "idle~" for s in out)


def one_run(cluster: SlurmCluster, env: dict) -> float:
    wait(lambda: powered_down(cluster) and not node_vms(env), "nodes powered down", 300)
    t0 = time.monotonic()
    p = subprocess.Popen(["nsenter", "--net=/run/netns/lab1", "srun", "-p", "cloud", "-N", "2", "hostname"],
                         env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = p.stdout.readline()
    elapsed = time.monotonic() - t0
    rest, err = p.communicate(timeout=900)
    if p.returncode != 0 or not first.strip().startswith("cloud"):
        raise RuntimeError(f"srun failed ({p.returncode}): {first}{rest} {err.strip()[-400:]}")
    cluster.run(["scontrol", "update", f"NodeName={NODES}", "State=POWER_DOWN"])
    return elapsed


def run(repeats: int) -> dict:
    d = Path(tempfile.mkdtemp(prefix="sfmpi-bench-slurm-"))
    env = {**os.environ, "SFMPI_LAB_HOME": str(d / "lab")}
    res: dict = {"host_leaks": [], "clone_s": [], "cold_s": []}
    homes: list[Path] = []
    cluster = None
    try:
        rec = json.loads(sfmpi("lab", "up", "--hosts", "1", "--mem-budget", "3G", "--json", env=env))
        homes = [Path(h["home"]) for h in rec["hosts"].values()]
        el = d / "elastic"
        lines = sfmpi("slurm", "config", "--nodes", NODES, "--suspend-time", "3600", "--resume-timeout", "900",
                      "--dir", str(el), env=env).splitlines()
        (d / "slurm").mkdir()
        cluster = SlurmCluster(d / "slurm", [], extra=lines, ctl_ns="lab1", ctl_ip=str(topology.host_ip("lab1")),
                               epilog=False)
        cluster.start()
        sfmpi("--host", "lab1", "slurm", "worker-image", "--slurm-conf", str(cluster.conf), "--munge-key",
              str(cluster.dir / "munge.key"), "--mem", "256M", "--dir", str(el), env=env)
        for _ in range(repeats):
            for mode, key in (("clone", "clone_s"), ("boot", "cold_s")):
                sfmpi("slurm", "mode", mode, "--dir", str(el), env=env)
                res[key].append(one_run(cluster, env))
        res["resume_clone_s"] = statistics.median(res["clone_s"])
        res["resume_cold_s"] = statistics.median(res["cold_s"])
        res["resume_speedup"] = res["resume_cold_s"] / res["resume_clone_s"]
    except (RuntimeError, AssertionError, subprocess.SubprocessError) as exc:
        res["error"] = str(exc)
    finally:
        if cluster is not None:
            cluster.stop()
        subprocess.run(["sfmpi", "lab", "down"], env=env, capture_output=True, timeout=300)
        res["host_leaks"] = lab_leaks(d / "lab", homes)
    return res


def print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title="srun -N 2 on powered-down cloud nodes: seconds to the first task running")
    t.add_column("ResumeProgram")
    t.add_column("runs", justify="right")
    t.add_column("median", justify="right")
    t.add_column("target", justify="right")
    t.add_row("sfmpi slurm resume (clone the worker)", ", ".join(f"{x:.1f}" for x in r["clone_s"]),
              f"{r['resume_clone_s']:.1f} s", "")
    t.add_row("boot a VM per node from the worker image", ", ".join(f"{x:.1f}" for x in r["cold_s"]),
              f"{r['resume_cold_s']:.1f} s", "")
    t.add_row("speedup", "", f"{r['resume_speedup']:.1f}x", ">= 10x")
    Console(width=120).print(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    return report(run(a.repeats), a.json, print_table)


if __name__ == "__main__":
    sys.exit(main())
