"""sfmpi under a real Slurm (slurmctld and a slurmd per lab host, tests/batch/slurm.py).

The lab here is its network only (3 hosts, no hostd): each job starts sfmpi on
its own nodes (`sfmpi jobs run`, from a script `sfmpi jobs script slurm` made),
so the allocation alone decides where clones may go. lab3 is in no
allocation: nothing may run there.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from sfmpi.hostd.lab.network import LabNetwork
from tests.batch.slurm import SlurmCluster
from tests import leakcheck

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(1500)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "mpi"
HOSTS = ["lab1", "lab2", "lab3"]

# In the parent: a ticket for more clones than the allocation holds, forked;
# each clone says where it runs through its exit status (10 * lab host number + ID).
GUEST_FORK = r'''
import json, sfmpi
t = sfmpi.request_ticket(16)
i = sfmpi.clone(t)
if i == 0:
    statuses = sfmpi.join(t)
    print("TICKET " + json.dumps({"granted": t.granted, "statuses": {str(k): v for k, v in statuses.items()}}))
else:
    sfmpi.exit(10 * int(sfmpi.whoami()["host"][3:]) + i)
'''

GUEST_HOLD = r'''
import sfmpi, time
t = sfmpi.request_ticket(3)
i = sfmpi.clone(t)
print("forked", i, flush=True)
time.sleep(3600)
'''


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm")
    jobs = d / "jobs"
    net = LabNetwork(len(HOSTS))
    net.up()
    try:
        with SlurmCluster(d, HOSTS, cpus=2, mem_mb=2048,
                          env={"SFMPI_JOB_ROOT": str(jobs), "SFMPI_JOB_LOGS": str(d / "logs")}) as cluster:
            cluster.jobs = jobs
            yield cluster
    finally:
        net.down()
    assert LabNetwork(1).leftovers() == []


def submit(slurm: SlurmCluster, tmp: Path, *args: str) -> tuple[str, Path]:
    """`sfmpi jobs submit slurm ARGS` from tmp; the job ID and its output file."""
    # sbatch must reach slurmctld: slurm.run() runs it in the lab's namespace.
    p = slurm.run(["sfmpi", "jobs", "submit", "slurm", "--json", *args], cwd=tmp)
    job = json.loads(p.stdout)["job"]
    return job, tmp / f"sfmpi-{job}.out"


def job_leaks(slurm: SlurmCluster, job: str) -> list[str]:
    return leakcheck.job_leaks(slurm.jobs / f"slurm-{job}", HOSTS)


def cpi_command() -> str:
    src = (EXAMPLES / "cpi.c").read_text()
    return (f"cat > /root/cpi.c <<'SFMPI_EOF'\n{src}\nSFMPI_EOF\n"
            f"cat > /root/fork.py <<'SFMPI_EOF'\n{GUEST_FORK}\nSFMPI_EOF\n"
            "cd /root && python3 fork.py && mpicc.mpich -O2 -o cpi cpi.c -lm && sfmpirun -n 4 ./cpi 100000")


def test_sbatch_runs_sfmpirun_over_the_allocation_only(slurm, tmp_path):
    job, out = submit(slurm, tmp_path, "--nodes", "2", "--ntasks", "4", "--time", "20", "--", "sh", "-c",
                      cpi_command())
    state = slurm.wait_job(job)
    text = out.read_text() if out.exists() else ""
    assert state == "COMPLETED", text[-3000:]
    # The program's output, as from mpiexec.
    assert re.search(r"^pi is approximately 3\.14159", text, re.M), text[-2000:]
    ranks = dict(re.findall(r"^rank (\d) of 4 on (\S+)$", text, re.M))
    assert sorted(ranks) == ["0", "1", "2", "3"] and len(set(ranks.values())) == 4
    # 16 asked, the allocation holds 2 nodes x 2 CPUs: the parent takes one, 3 clones are granted,
    # on lab1 and lab2 and never on lab3.
    ticket = json.loads(re.search(r"^TICKET (.*)$", text, re.M).group(1))
    assert ticket["granted"] == 3
    hosts = sorted(v // 10 for v in ticket["statuses"].values())
    assert hosts == [1, 2, 2], ticket
    assert job_leaks(slurm, job) == []


def test_scancel_mid_job_leaves_nothing_anywhere(slurm, tmp_path):
    cmd = f"cat > /root/hold.py <<'SFMPI_EOF'\n{GUEST_HOLD}\nSFMPI_EOF\npython3 /root/hold.py"
    slurm.wait_nodes("idle", ["lab1", "lab2"], timeout=300)   # the last job's epilog is done
    job, out = submit(slurm, tmp_path, "--nodes", "2", "--time", "20", "--", "sh", "-c", cmd)
    # Wait until the clones run on both nodes (their hostds are the job's).
    d = slurm.jobs / f"slurm-{job}"
    deadline = time.monotonic() + 600
    seen: dict[str, int] = {}
    while time.monotonic() < deadline:
        for host in ("lab1", "lab2"):
            sock = d / host / "hostd.sock"
            if sock.exists():
                p = subprocess.run(["sfmpi", "vm", "list", "--json"], env={**slurm.env, "SFMPI_HOME": str(d / host)},
                                   capture_output=True, text=True, timeout=60)
                if p.returncode == 0:
                    seen[host] = len(json.loads(p.stdout))
        if seen.get("lab1", 0) >= 2 and seen.get("lab2", 0) >= 2:   # parent + 1 on lab1, 2 on lab2
            break
        assert slurm.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), out.read_text()[-2000:]
        time.sleep(2)
    assert seen == {"lab1": 2, "lab2": 2}, (seen, slurm.job_state(job), out.read_text()[-2000:] if out.exists() else "")
    slurm.run(["scancel", job])
    assert slurm.wait_job(job, timeout=120) in ("CANCELLED", "GONE")
    # The epilog and the job's own teardown are done once the nodes are idle again.
    slurm.wait_nodes("idle", ["lab1", "lab2"], timeout=120)
    deadline = time.monotonic() + 60
    while job_leaks(slurm, job) and time.monotonic() < deadline:
        time.sleep(1)
    assert job_leaks(slurm, job) == []


def test_a_job_with_a_missing_checkpoint_fails_clearly(slurm, tmp_path):
    # Bad input inside a job: a checkpoint that is not there. One clear line, a failed job, nothing left.
    job, out = submit(slurm, tmp_path, "--checkpoint", str(tmp_path / "missing"), "--", "true")
    assert slurm.wait_job(job) == "FAILED"
    text = out.read_text()
    assert "no checkpoint there" in text, text
    assert job_leaks(slurm, job) == []
