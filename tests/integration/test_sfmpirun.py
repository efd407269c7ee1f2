"""sfmpirun in a real parent VM: unmodified MPI programs on freshly forked clones."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "mpi"
MPI_PROCESSES = ("mpiexec", "mpiexec.hydra", "mpirun", "hydra_pmi_proxy", "orted", "prterun", "cpi_mpich", "cpi_openmpi",
                 "sum_input", "sfmpirun", "sfmpirun-reaper")
PI_LINE = re.compile(r"^pi is approximately (\S+)", re.M)


def no_job_left(cli, parent: str) -> None:
    """Nothing of a finished job anywhere: no clone VM, no MPI process in the parent."""
    cli.assert_no_clones_left(parent)
    ps = cli.exec(parent, "ps -eo comm=").stdout.split()
    assert not [p for p in ps if p in MPI_PROCESSES], ps
    assert "/run/sfmpirun/" not in cli.exec(parent, "ps -eo args=").stdout   # the job's sshd ended with it
    assert cli.exec(parent, "ls /run/sfmpirun 2>/dev/null | wc -l").stdout.strip() == "0"


@pytest.fixture(scope="module")
def programs(cli, parent) -> str:
    cli.put(parent, "/root/cpi.c", (EXAMPLES / "cpi.c").read_text())
    cli.put(parent, "/root/sum_input.c", (EXAMPLES / "sum_input.c").read_text())
    cli.put(parent, "/root/pi_mpi4py.py", (EXAMPLES / "pi_mpi4py.py").read_text())
    cli.exec(parent, "cd /root && mpicc.mpich -O2 -o cpi_mpich cpi.c -lm && "
                     "mpicc.openmpi -O2 -o cpi_openmpi cpi.c -lm && mpicc.mpich -O2 -o sum_input sum_input.c")
    return "/root"


def sfmpirun(cli, parent: str, args: str, check: bool = False):
    return cli.exec(parent, f"cd /root && sfmpirun {args}", check=check)


@pytest.mark.parametrize("flavour", ["mpich", "openmpi"])
def test_cpi_matches_mpiexec_on_one_vm(cli, parent, programs, flavour):
    mpiexec = {"mpich": "mpiexec.mpich", "openmpi": "mpiexec.openmpi --allow-run-as-root --oversubscribe"}
    ref = cli.exec(parent, f"cd /root && {mpiexec[flavour]} -n 4 ./cpi_{flavour} 100000")
    p = sfmpirun(cli, parent, f"-n 4 ./cpi_{flavour} 100000")
    assert p.returncode == 0, p.stderr
    assert PI_LINE.search(p.stdout).group(1) == PI_LINE.search(ref.stdout).group(1)
    hosts = re.findall(r"^rank (\d) of 4 on (\S+)$", p.stdout, re.M)
    assert sorted(r for r, _ in hosts) == ["0", "1", "2", "3"]
    assert len({h for _, h in hosts}) == 4, hosts           # every rank on its own VM
    assert "parent" in {h for _, h in hosts}                 # rank(s) in the parent too
    no_job_left(cli, parent)


def test_mpi4py(cli, parent, programs):
    p = sfmpirun(cli, parent, "-n 3 python3 pi_mpi4py.py 20000")
    assert p.returncode == 0, p.stderr
    assert PI_LINE.search(p.stdout).group(1).startswith("3.14159")
    assert len(set(re.findall(r"^rank \d of 3 on (\S+)$", p.stdout, re.M))) == 3
    no_job_left(cli, parent)


def test_clones_read_what_the_parent_wrote_just_before(cli, parent, programs):
    cli.exec(parent, "python3 -c \"import struct; open('/tmp/input.dat','wb').write(struct.pack('1000d', *range(1000)))\"")
    p = sfmpirun(cli, parent, "-n 4 -ppn 2 ./sum_input /tmp/input.dat")
    assert p.returncode == 0, p.stderr
    assert "sum 499500 over 1000 values" in p.stdout
    no_job_left(cli, parent)


def test_exit_status_is_the_jobs_and_a_dead_rank_ends_it(cli, parent, programs):
    cli.put(parent, "/root/die.py", "from mpi4py import MPI\nimport os, time\n"
                                     "if MPI.COMM_WORLD.Get_rank() == 1: os._exit(7)\ntime.sleep(600)\n")
    t0 = time.monotonic()
    p = sfmpirun(cli, parent, "-n 3 python3 die.py")
    assert p.returncode != 0
    assert time.monotonic() - t0 < 300
    no_job_left(cli, parent)


def test_too_few_clones_fail_before_cloning(cli, parent, programs):
    p = sfmpirun(cli, parent, "-n 200 ./cpi_mpich")
    assert p.returncode == 2, p.stderr
    assert "--allow-fewer" in p.stderr and "granted" in p.stderr
    no_job_left(cli, parent)


def test_bad_input_is_a_clear_usage_error(cli, parent, programs):
    p = sfmpirun(cli, parent, "./cpi_mpich")
    assert p.returncode == 2 and "needs -n" in p.stderr
    p = sfmpirun(cli, parent, "-n 2 /bin/true")
    assert p.returncode == 2 and "not linked against MPICH or Open MPI" in p.stderr


def sfmpirun_with_clone_hook(cli, parent: str, hook: str, script: str, args: str):
    """sfmpirun while every clone runs `script` as it is re-identified; its result and how long it took."""
    path = f"/etc/sfmpi/clone.d/{hook}"
    cli.put(parent, path, script)
    cli.exec(parent, f"chmod +x {path}")
    try:
        t0 = time.monotonic()
        p = sfmpirun(cli, parent, args)
        return p, time.monotonic() - t0
    finally:
        cli.exec(parent, f"rm -f {path}")


# The job's sshd, inherited by every clone: its port and PID, for the hooks below.
JOB_SSHD = """port=$(awk '$1 == "Port" {print $2}' /run/sfmpirun/*/sshd_config)
pid=$(ss -ltnpH "sport = :$port" | sed -n 's/.*pid=\\([0-9]*\\).*/\\1/p' | head -n 1)
[ -n "$port" ] && [ -n "$pid" ] || exit 1
"""


def test_agent_that_cannot_connect_ends_the_job(cli, parent, programs):
    # The job's sshd ends in every clone as it is re-identified: no login.
    p, took = sfmpirun_with_clone_hook(cli, parent, "20-nossh", f"#!/bin/sh\n{JOB_SSHD}kill $pid\n",
                                       "-n 2 ./cpi_mpich")
    assert p.returncode == 1, p.stderr
    assert "cannot connect over SSH" in p.stderr
    assert took < 120
    no_job_left(cli, parent)


# In every clone the job's sshd gives way to a listener on its port that accepts
# and never speaks: the hub hangs in the SSH banner exchange, the way a launch
# hangs that never reaches a clone. --launch-timeout must end the job before the
# login gives up.
SILENT_SSHD = f"""#!/bin/sh
{JOB_SSHD}kill $pid
systemd-run --unit sfmpi-silent-sshd python3 -c "import socket, time
s = socket.create_server(('0.0.0.0', $port))
held = [s.accept() for _ in range(64)]
time.sleep(3600)"
# Listening before the clone is handed back: sfmpirun logs in at once.
for i in $(seq 100); do ss -ltn "sport = :$port" | grep -q LISTEN && exit 0; sleep 0.1; done
exit 1
"""


def test_a_launch_that_never_reaches_a_clone_times_out(cli, parent, programs):
    p, took = sfmpirun_with_clone_hook(cli, parent, "20-silent", SILENT_SSHD, "--launch-timeout 5 -n 2 ./cpi_mpich")
    assert p.returncode == 1, p.stderr
    assert "did not reach 10." in p.stderr and "--launch-timeout" in p.stderr
    assert "cannot connect" not in p.stderr       # the watchdog, not the agent's own timeout
    assert took < 120
    no_job_left(cli, parent)


def _start_in_background(cli, parent: str, args: str) -> None:
    cli.exec(parent, f"cd /root && (setsid sfmpirun {args} > /tmp/bg.out 2> /tmp/bg.err; "
                     f"echo $? > /tmp/bg.rc) > /dev/null 2>&1 < /dev/null & echo started")


def _wait_for_clones(cli, parent: str, n: int) -> list[str]:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        names = cli.clones_of(parent)
        if len(names) >= n and "rank" in cli.exec(parent, "cat /tmp/bg.out").stdout:
            return names
        time.sleep(1)
    raise AssertionError("the background job never started: " + cli.exec(parent, "cat /tmp/bg.err").stdout)


def _background_result(cli, parent: str) -> tuple[int, str]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rc = cli.exec(parent, "cat /tmp/bg.rc 2>/dev/null; true").stdout.strip()
        if rc:
            return int(rc), cli.exec(parent, "cat /tmp/bg.err").stdout
        time.sleep(1)
    raise AssertionError("sfmpirun did not end")


LONG_JOB = "-n 3 python3 -c 'from mpi4py import MPI; import time; print(\"rank\", flush=True); time.sleep(900)'"


def _long_job_running(cli, parent: str) -> list[str]:
    """sfmpirun of LONG_JOB in the background, its ranks up; its clones."""
    cli.exec(parent, "rm -f /tmp/bg.rc /tmp/bg.out")
    _start_in_background(cli, parent, LONG_JOB)
    return _wait_for_clones(cli, parent, 2)


def _signal_sfmpirun(cli, parent: str, sig: str) -> None:
    # sfmpirun itself, not its reaper (a fork of it, with the same arguments).
    cli.exec(parent, f"kill -{sig} $(ps -eo pid=,comm= | awk '$2 == \"sfmpirun\" {{print $1}}')")


def test_a_dead_clone_ends_the_job(cli, parent, programs):
    names = _long_job_running(cli, parent)
    cli("vm", "stop", names[0])
    rc, err = _background_result(cli, parent)
    assert rc == 1 and "died" in err, err
    no_job_left(cli, parent)


def test_sigterm_ends_the_job_and_destroys_the_clones(cli, parent, programs):
    _long_job_running(cli, parent)
    _signal_sfmpirun(cli, parent, "TERM")
    rc, err = _background_result(cli, parent)
    assert rc == 143 and "SIGTERM" in err, err
    no_job_left(cli, parent)


def test_sfmpirun_killed_outright_takes_its_job_along(cli, parent, programs):
    # SIGKILL: no clean-up of sfmpirun's own runs. mpiexec dies with it
    # (parent-death signal) and so does its sshd, the clones see their control
    # line close and exit, and the next sfmpirun removes the dead job's directory.
    _long_job_running(cli, parent)
    _signal_sfmpirun(cli, parent, "KILL")
    deadline = time.monotonic() + 90
    # Open MPI's mpirun (comm "mpirun") cleans up for a while after its SIGTERM:
    # wait for every process of the job, found by the job directory in its arguments.
    while time.monotonic() < deadline and (cli.clones_of(parent) or [
            p for p in cli.exec(parent, "ps -eo comm=").stdout.split() if p in MPI_PROCESSES]
            or "/run/sfmpirun/" in cli.exec(parent, "ps -eo args=").stdout):
        time.sleep(1)
    assert cli.exec(parent, "ls /run/sfmpirun | wc -l").stdout.strip() == "1"  # left by the killed job
    assert "/run/sfmpirun/" not in cli.exec(parent, "ps -eo args=").stdout
    p = sfmpirun(cli, parent, "--clones 0 -n 1 ./cpi_mpich 1000")
    assert p.returncode == 0, p.stderr
    no_job_left(cli, parent)
