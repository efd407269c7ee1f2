"""sfmpi under a real Grid Engine (sge_qmaster and sge_execd, tests/batch/sge.py):
`qsub -pe sfmpi 2` of a script `sfmpi jobs script sge` made runs sfmpirun in a
parent VM over the job's 2 slots; `qdel` mid-job leaves nothing behind (the
PE's stop procedure cleans up after the runner Grid Engine killed)."""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.batch.sge import GridEngine
from tests import leakcheck

pytestmark = [pytest.mark.sge, pytest.mark.timeout(1500)]

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "mpi"

GUEST_HOLD = r'''
import sfmpi, time
t = sfmpi.request_ticket(4)
i = sfmpi.clone(t)
print("forked", i, t.granted, flush=True)
time.sleep(3600)
'''


@pytest.fixture(scope="module")
def sge(tmp_path_factory):
    d = tmp_path_factory.mktemp("sge")
    with GridEngine(d, slots=2, env={"SFMPI_JOB_ROOT": str(d / "jobs"), "SFMPI_JOB_LOGS": str(d / "logs")}) as ge:
        ge.jobs_root = d / "jobs"
        yield ge


def script(ge: GridEngine, tmp: Path, *args: str) -> Path:
    # -V: the job gets this environment (PATH to sfmpi, SFMPI_JOB_ROOT), as users of -V expect.
    text = subprocess.run(["sfmpi", "jobs", "script", "sge", "--directive", "-V", *args], env=ge.env, check=True,
                          capture_output=True, text=True).stdout
    path = tmp / "job.sh"
    path.write_text(text)
    return path


def job_leaks(ge: GridEngine, job: str) -> list[str]:
    return leakcheck.job_leaks(ge.jobs_root / f"sge-{job}", [ge.host])


def test_qsub_pe_sfmpi_runs_sfmpirun(sge, tmp_path):
    src = (EXAMPLES / "cpi.c").read_text()
    cmd = (f"cat > /root/cpi.c <<'SFMPI_EOF'\n{src}\nSFMPI_EOF\n"
           "cd /root && mpicc.mpich -O2 -o cpi cpi.c -lm && sfmpirun -n 2 ./cpi 100000")
    path = script(sge, tmp_path, "--ntasks", "2", "--time", "20", "--", "sh", "-c", cmd)
    assert "#$ -pe sfmpi 2" in path.read_text()
    job = sge.submit(path, tmp_path)
    sge.wait_gone(job)
    out = (tmp_path / f"sfmpi.o{job}").read_text()
    assert sge.exit_status(job) == 0, out[-3000:]
    assert re.search(r"^pi is approximately 3\.14159", out, re.M), out[-2000:]
    ranks = dict(re.findall(r"^rank (\d) of 2 on (\S+)$", out, re.M))
    assert sorted(ranks) == ["0", "1"] and len(set(ranks.values())) == 2
    assert job_leaks(sge, job) == []


def test_qdel_mid_job_leaves_nothing(sge, tmp_path):
    cmd = f"cat > /root/hold.py <<'SFMPI_EOF'\n{GUEST_HOLD}\nSFMPI_EOF\npython3 /root/hold.py"
    job = sge.submit(script(sge, tmp_path, "--ntasks", "2", "--", "sh", "-c", cmd), tmp_path)
    home = sge.jobs_root / f"sge-{job}" / sge.host
    deadline = time.monotonic() + 600
    vms: list = []
    while time.monotonic() < deadline:
        if (home / "hostd.sock").exists():
            p = subprocess.run(["sfmpi", "vm", "list", "--json"], env={**sge.env, "SFMPI_HOME": str(home)},
                               capture_output=True, text=True, timeout=60)
            vms = json.loads(p.stdout) if p.returncode == 0 else []
            if len(vms) >= 2:         # the parent and the one clone 2 slots hold
                break
        assert sge.job_running(job), (tmp_path / f"sfmpi.o{job}").read_text()[-2000:]
        time.sleep(2)
    assert len(vms) == 2, vms
    sge.q("qdel", job)
    sge.wait_gone(job, timeout=120)
    deadline = time.monotonic() + 90
    while job_leaks(sge, job) and time.monotonic() < deadline:
        time.sleep(1)
    assert job_leaks(sge, job) == []
