"""Elastic Slurm: State=CLOUD nodes made by cloning a warm worker VM.

A lab of one host runs hostd; slurmctld runs in that host's namespace (it must
reach the clones' addresses, which hostd routes there). The worker is built by
`sfmpi slurm worker-image`; a job for 2 cloud nodes makes slurmctld run
`sfmpi slurm resume`, the job runs on the clones under the node names, and
after SuspendTime `sfmpi slurm suspend` stops them. A resume that fails marks
its nodes down with the reason.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from sfmpi.hostd.lab import topology
from tests.batch.slurm import SlurmCluster
from tests.leakcheck import lab_leaks

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(2400)]

SUSPEND_TIME = 20


def sfmpi(*args: str, env: dict, check: bool = True, timeout: float = 1200) -> subprocess.CompletedProcess:
    p = subprocess.run(["sfmpi", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"sfmpi {' '.join(args)} exited {p.returncode}:\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def elastic(tmp_path_factory):
    d = tmp_path_factory.mktemp("elastic")
    env = {**os.environ, "SFMPI_LAB_HOME": str(d / "lab")}
    homes: list[Path] = []
    cluster = None
    try:
        rec = json.loads(sfmpi("lab", "up", "--hosts", "1", "--mem-budget", "3G", "--json", env=env).stdout)
        homes = [Path(h["home"]) for h in rec["hosts"].values()]
        el = d / "elastic"
        lines = sfmpi("slurm", "config", "--nodes", "cloud[1-3]", "--suspend-time", str(SUSPEND_TIME),
                      "--resume-timeout", "600", "--dir", str(el), env=env).stdout.splitlines()
        cluster = SlurmCluster(d / "slurm", [], extra=lines, ctl_ns="lab1", ctl_ip=str(topology.host_ip("lab1")),
                               epilog=False)
        (d / "slurm").mkdir()
        cluster.start()
        sfmpi("--host", "lab1", "slurm", "worker-image", "--slurm-conf", str(cluster.conf), "--munge-key",
              str(cluster.dir / "munge.key"), "--mem", "256M", "--dir", str(el), env=env)
        cluster.elastic_dir, cluster.lab_env = el, env
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        sfmpi("lab", "down", env=env, check=False, timeout=300)
        left = lab_leaks(d / "lab", homes)
        assert left == [], f"lab down left: {left}"


def vms(cluster) -> list[str]:
    return [r["name"] for r in json.loads(sfmpi("--host", "lab1", "vm", "list", "--json", env=cluster.lab_env).stdout)]


def raw_state(cluster, node: str) -> str:
    return cluster.run(["sinfo", "-h", "-N", "-n", node, "-o", "%T"], check=False).stdout.strip()


def test_a_job_on_cloud_nodes_runs_on_clones_named_after_them_which_are_suspended_after(elastic):
    assert raw_state(elastic, "cloud1").endswith("~")            # powered down, not yet a VM
    p = elastic.run(["srun", "-p", "cloud", "-N", "2", "-w", "cloud[1-2]", "hostname"], timeout=900, check=False)
    assert p.returncode == 0, p.stderr + (elastic.dir / "slurmctld.log").read_text()[-3000:]
    assert sorted(p.stdout.split()) == ["cloud1", "cloud2"]
    clones = [v for v in vms(elastic) if v.startswith("slurm-worker-")]
    assert len(clones) == 2, vms(elastic)
    state = json.loads((elastic.elastic_dir / "elastic.json").read_text())
    assert sorted(state["nodes"]) == ["cloud1", "cloud2"] and sorted(state["nodes"].values()) == sorted(clones)
    # Idle for SuspendTime: slurmctld runs the SuspendProgram and the clones go.
    deadline = time.monotonic() + SUSPEND_TIME + 180
    while time.monotonic() < deadline and [v for v in vms(elastic) if v.startswith("slurm-worker-")]:
        time.sleep(2)
    assert [v for v in vms(elastic) if v.startswith("slurm-worker-")] == []
    assert json.loads((elastic.elastic_dir / "elastic.json").read_text())["nodes"] == {}


def test_a_failing_resume_marks_the_nodes_down_with_the_reason(elastic):
    path = elastic.elastic_dir / "elastic.json"
    good = path.read_text()
    path.write_text(json.dumps({**json.loads(good), "checkpoint": "no-such-checkpoint"}))
    try:
        job = elastic.run(["sbatch", "--parsable", "-p", "cloud", "-w", "cloud3", "--wrap", "true"]).stdout.strip()
        deadline = time.monotonic() + 180
        node = ""
        while time.monotonic() < deadline:
            node = elastic.run(["scontrol", "show", "node", "cloud3"]).stdout
            if "Reason=sfmpi resume failed" in node:
                break
            time.sleep(1)
        assert "Reason=sfmpi resume failed" in node and "no-such-checkpoint" in node, node
        assert "DOWN" in node
        with contextlib.suppress(AssertionError):
            elastic.run(["scancel", job])
    finally:
        path.write_text(good)
    assert [v for v in vms(elastic) if v.startswith("slurm-worker-")] == []
