"""Job-script generation and the allocation backends: no scheduler needed."""
from __future__ import annotations

import shlex
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sfmpi.errors import UsageError
from sfmpi.hostd.master import allocation
from sfmpi.hostd.master.allocation import Allocation, Node
from sfmpi.jobs import runner
from sfmpi.jobs.script import JobSpec, ParallelEnvironment, SgeScript, SlurmScript, for_scheduler, hms, parse_time


def spec(**kw) -> JobSpec:
    return JobSpec(command=("sfmpirun", "-n", "4", "./cpi", "1000"), **kw)


def test_slurm_header_and_body():
    text = SlurmScript(spec(nodes=2, ntasks=4, time="10:00", name="pi")).script()
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "#SBATCH --job-name=pi" in lines and "#SBATCH --nodes=2" in lines and "#SBATCH --ntasks=4" in lines
    assert "#SBATCH --time=10:00" in lines and "#SBATCH --exclusive" in lines
    run = [l for l in lines if l.startswith("exec ")]
    assert shlex.split(run[0]) == ["exec", "sfmpi", "jobs", "run", "--mem", "512M", "--cpus", "1", "--",
                                   "sfmpirun", "-n", "4", "./cpi", "1000"]
    # Directives come before the first command, or the scheduler ignores them.
    first_cmd = next(i for i, l in enumerate(lines) if l and not l.startswith("#"))
    assert all(i < first_cmd for i, l in enumerate(lines) if l.startswith("#SBATCH"))


def test_sge_header_uses_the_sfmpi_pe_and_h_rt():
    lines = SgeScript(spec(nodes=2, ntasks=3, time="1-00:30:00", checkpoint="/ck/p-ck1")).script().splitlines()
    assert "#$ -pe sfmpi 3" in lines and "#$ -l h_rt=24:30:00" in lines and "#$ -S /bin/bash" in lines
    assert any(shlex.split(l)[:6] == ["exec", "sfmpi", "jobs", "run", "--checkpoint", "/ck/p-ck1"]
               for l in lines if l.startswith("exec "))


def test_users_add_and_drop_directives():
    lines = SlurmScript(spec(extra=("--partition=big", "--account=phys"), skip=("--exclusive", "--output"))
                        ).script().splitlines()
    assert "#SBATCH --partition=big" in lines and "#SBATCH --account=phys" in lines
    assert not any("--exclusive" in l or "--output" in l for l in lines)


def test_the_command_is_quoted_for_the_shell():
    job = SlurmScript(JobSpec(command=("sh", "-c", "echo $HOME; rm -rf /x"), name="q"))
    run = [l for l in job.script().splitlines() if l.startswith("exec ")][0]
    assert shlex.split(run)[-3:] == ["sh", "-c", "echo $HOME; rm -rf /x"]


def test_the_script_is_valid_bash():
    for cls in (SlurmScript, SgeScript):
        p = subprocess.run(["bash", "-n"], input=cls(spec(time="5")).script(), text=True, capture_output=True)
        assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("bad", [dict(nodes=0), dict(ntasks=0), dict(time="ten"), dict(name="a b"),
                                 dict(checkpoint="/c", image="/i"), dict(extra=("x\n#SBATCH --y",)),
                                 dict(cpus=True)])
def test_bad_specs_are_refused(bad):
    with pytest.raises(UsageError):
        spec(**bad)


def test_no_command_is_refused():
    with pytest.raises(UsageError, match="no command"):
        JobSpec(command=())


def test_unknown_scheduler():
    with pytest.raises(UsageError, match="slurm, sge"):
        for_scheduler("pbs", spec())


@pytest.mark.parametrize("text,seconds", [("5", 300), ("10:30", 630), ("1:00:00", 3600), ("2-03:04:05", 183845)])
def test_time_limits(text, seconds):
    assert parse_time(text) == seconds


@given(st.integers(min_value=0, max_value=10 ** 6))
def test_hms_round_trips(seconds):
    assert parse_time(hms(seconds)) == seconds


def test_job_ids_from_submit_output():
    assert SlurmScript.parse_job_id("42\n") == "42" and SlurmScript.parse_job_id("42;lab\n") == "42"
    assert SgeScript.parse_job_id("17\n") == "17" and SgeScript.parse_job_id("17.1-4:1\n") == "17"
    with pytest.raises(UsageError):
        SlurmScript.parse_job_id("sbatch: error: Batch job submission failed")
    assert SlurmScript(spec()).submit_argv("/j.sh") == ["sbatch", "--parsable", "/j.sh"]
    assert SgeScript(spec()).submit_argv("/j.sh") == ["qsub", "-terse", "/j.sh"]


def test_parallel_environment_lets_qrsh_inherit_and_cleans_up():
    fields = dict(l.split(None, 1) for l in ParallelEnvironment(sfmpi="/usr/bin/sfmpi").text().splitlines())
    assert fields["pe_name"] == "sfmpi" and fields["control_slaves"] == "TRUE"
    assert fields["stop_proc_args"] == "/usr/bin/sfmpi jobs cleanup --job $job_id"
    assert fields["job_is_first_task"] == "FALSE"


# -- allocations --------------------------------------------------------------
def test_backend_detection():
    assert allocation.detect({}) == "local"
    assert allocation.detect({"SLURM_JOB_ID": "3"}) == "slurm"
    assert allocation.detect({"JOB_ID": "3", "PE_HOSTFILE": "/x"}) == "sge"
    assert allocation.detect({"JOB_ID": "3"}) == "local"        # an SGE job without a PE is one host
    with pytest.raises(UsageError):
        allocation.detect({"SFMPI_ALLOCATION": "pbs"})


def test_slurm_allocation():
    a = allocation.from_env({"SLURM_JOB_ID": "12", "SLURM_JOB_NODELIST": "lab[1-3],gpu01",
                             "SLURM_JOB_CPUS_PER_NODE": "2(x3),4", "SLURM_MEM_PER_NODE": "1536",
                             "SLURMD_NODENAME": "lab1"})
    assert a.backend == "slurm" and a.job_id == "12" and a.here == "lab1"
    assert a.nodes == (Node("lab1", 2, 1536), Node("lab2", 2, 1536), Node("lab3", 2, 1536), Node("gpu01", 4, 1536))
    assert a.cpus == 10


def test_slurm_allocation_without_memory_or_per_node_counts():
    a = allocation.from_env({"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n[01-02]", "SLURM_CPUS_ON_NODE": "3"})
    assert a.nodes == (Node("n01", 3), Node("n02", 3)) and a.here == "n01"


@pytest.mark.parametrize("env", [
    {"SLURM_JOB_ID": "5"},                                                       # no node list
    {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n[1-2", },                      # a broken hostlist
    {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_JOB_CPUS_PER_NODE": "2(x2)"},
    {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_CPUS_PER_NODE": "two"},
    {"SLURM_JOB_ID": "5;rm", "SLURM_JOB_NODELIST": "n1"},
    {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n1,$(reboot)"},
])
def test_bad_slurm_environments(env):
    with pytest.raises(UsageError):
        allocation.from_env(env)


def test_sge_allocation(tmp_path):
    hf = tmp_path / "pe_hostfile"
    hf.write_text("node1.example 2 all.q@node1 UNDEFINED\nnode2 1 all.q@node2 UNDEFINED\nnode1 1 big.q@node1 x\n")
    a = allocation.from_env({"JOB_ID": "77", "PE_HOSTFILE": str(hf), "NSLOTS": "4", "HOSTNAME": "node2"})
    assert a.backend == "sge" and a.nodes == (Node("node1", 3), Node("node2", 1)) and a.here == "node2"
    with pytest.raises(UsageError, match="NSLOTS"):
        allocation.from_env({"JOB_ID": "77", "PE_HOSTFILE": str(hf), "NSLOTS": "9"})
    hf.write_text("node1 many q x\n")
    with pytest.raises(UsageError, match="PE hostfile line"):
        allocation.from_env({"JOB_ID": "77", "PE_HOSTFILE": str(hf)})
    with pytest.raises(UsageError, match="cannot read the PE hostfile"):
        allocation.from_env({"JOB_ID": "77", "PE_HOSTFILE": str(tmp_path / "missing")})


def test_launching_on_a_node_the_schedulers_way():
    slurm = Allocation("slurm", "9", (Node("lab1", 2), Node("lab2", 2)), "lab1")
    argv = allocation.launch_argv(slurm, "lab2", ["hostd"], {"SFMPI_HOME": "/j/lab2"})
    assert argv[:2] == ["srun", "--overlap"] and "--nodelist=lab2" in argv and "--ntasks=1" in argv
    assert argv[-3:] == ["env", "SFMPI_HOME=/j/lab2", "hostd"]
    sge = Allocation("sge", "9", (Node("h1", 2),), "h1")
    assert allocation.launch_argv(sge, "h1", ["hostd"], {}) == ["qrsh", "-inherit", "-nostdin", "h1", "env", "hostd"]
    with pytest.raises(UsageError, match="not in job 9"):
        allocation.launch_argv(slurm, "lab3", ["hostd"], {})
    with pytest.raises(UsageError):
        allocation.launch_argv(slurm, "lab1", ["hostd"], {"A=B": "x"})


def test_each_node_hostd_gets_its_share_and_its_place():
    a = Allocation("slurm", "9", (Node("lab1", 2, 1024), Node("lab2", 3)), "lab1")
    assert runner.hostd_argv(a.nodes[0], "py")[-4:] == ["--vcpu-budget", "2", "--mem-budget", "1024M"]
    assert runner.hostd_argv(a.nodes[1], "py")[-2:] == ["--vcpu-budget", "3"]
    from pathlib import Path
    env = runner.node_env(a, "lab2", Path("/j/slurm-9"), {"lab1": "10.0.0.1", "lab2": "10.0.0.2"})
    assert env["SFMPI_MASTER"] == "10.0.0.1:7440" and env["SFMPI_HOST_ADDRESS"] == "10.0.0.2"
    assert env["SFMPI_HOME"] == "/j/slurm-9/lab2" and env["SFMPI_CLUSTER_KEYS"] == "/j/slurm-9/keys"
    assert env["SFMPI_FAMILY_START"] == str(1 + runner.FAMILIES_PER_NODE)


# -- elastic Slurm ---------------------------------------------------------------
def test_elastic_config_lines_name_the_programs_and_the_cloud_nodes():
    from pathlib import Path

    from sfmpi.jobs import elastic
    lines = elastic.config_lines("cloud[1-4]", 2, 1024, Path("/e"), suspend_time=60)
    assert "ResumeProgram=/e/resume" in lines and "SuspendProgram=/e/suspend" in lines
    assert "PrivateData=cloud" in lines and "SuspendTime=60" in lines
    assert "NodeName=cloud[1-4] State=CLOUD CPUs=2 RealMemory=1024" in lines
    text = elastic.program_text("resume", Path("/e"), "/usr/bin/python3")
    assert text.splitlines()[-1] == 'exec /usr/bin/python3 -m sfmpi.cli slurm resume --dir /e "$@"'


def test_a_workers_slurm_conf_uses_the_guests_munge_socket():
    from sfmpi.jobs.elastic import guest_conf
    conf = "ClusterName=x\nAuthInfo=socket=/tmp/t/munge.socket\nAuthInfo=ttl=60,socket=/s\nNodeName=a\n"
    assert guest_conf(conf).splitlines() == ["ClusterName=x", "AuthInfo=ttl=60", "NodeName=a"]


def test_a_nodes_slurmd_runs_in_a_time_namespace_under_its_name():
    from sfmpi.jobs.elastic import slurmd_dirs, slurmd_script
    conf = "SlurmdSpoolDir=/var/spool/s/%n\nSlurmdLogFile=/var/log/s/%n.log\nSlurmdPidFile=/run/s-%n.pid\n"
    assert slurmd_dirs(conf, "cloud2") == ["/var/spool/s/cloud2", "/var/log/s", "/run"]
    script = slurmd_script("cloud2", ["/var/spool/s/cloud2"])
    assert "hostname cloud2" in script and "unshare --time --fork --boottime=-$up slurmd -D -N cloud2" in script
    p = subprocess.run(["sh", "-n"], input=script, text=True, capture_output=True)
    assert p.returncode == 0, p.stderr


def test_elastic_node_lists_are_checked():
    from sfmpi.jobs.elastic import expand
    assert expand("cloud[1-3]") == ["cloud1", "cloud2", "cloud3"]
    for bad in ("cloud[1-", "a;b"):
        with pytest.raises(UsageError):
            expand(bad)


def test_node_addresses_given_by_the_site():
    assert runner.parse_node_addresses("n1=10.1.0.1, n2=10.1.0.2") == {"n1": "10.1.0.1", "n2": "10.1.0.2"}
    with pytest.raises(UsageError):
        runner.parse_node_addresses("n1=somewhere")
