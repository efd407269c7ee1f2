"""Allocation backends: what a batch scheduler gave this job, read from its environment. Pure.

sfmpi does not schedule across hosts on its own (DESIGN: the master delegates
to Slurm or Grid Engine, as SnowFlock did to SGE and EGO). Inside a batch job
the scheduler has already decided which nodes, how many CPUs and how much
memory the job may use; every ticket of the job is bounded by that:

* `local`: no scheduler (today's embedded default): this host, its own budget;
* `slurm`: SLURM_JOB_ID, SLURM_JOB_NODELIST (a hostlist such as lab[1-2]),
  SLURM_JOB_CPUS_PER_NODE ("2(x2),1"), SLURM_MEM_PER_NODE (MiB, only when the
  job asked for memory);
* `sge`: JOB_ID, $PE_HOSTFILE (one "host slots queue processors" line per host)
  and NSLOTS; Grid Engine has no per-job memory figure unless a site sets
  h_vmem, so memory stays each hostd's own budget.

Processes go to the job's nodes the scheduler's own way (launch_argv): `srun
--overlap` into the job's allocation, `qrsh -inherit` under the parallel
environment, so the scheduler accounts for them and kills them with the job.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sfmpi.errors import UsageError

BACKENDS = ("local", "slurm", "sge")
# Hostnames and Slurm node names as a job may carry them; anything else in the
# scheduler's environment is refused rather than passed to a command line.
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_CPUS_PER_NODE = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")
_JOB_ID = re.compile(r"^[0-9]{1,12}(?:[._][0-9A-Za-z]{1,12})?$")


@dataclass(frozen=True)
class Node:
    name: str
    cpus: int
    mem_mb: int | None = None   # None: the node's hostd keeps its own budget


@dataclass(frozen=True)
class Allocation:
    backend: str
    job_id: str
    nodes: tuple[Node, ...]
    here: str                    # the node this process runs on (the job's first, for a batch script)

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise UsageError(f"{name} is not in job {self.job_id}'s allocation ({', '.join(self.names)})")

    @property
    def cpus(self) -> int:
        return sum(n.cpus for n in self.nodes)


def detect(env: dict | None = None) -> str:
    """The backend this environment belongs to: inside a Slurm job, a Grid Engine
    parallel job, or neither. SFMPI_ALLOCATION forces one."""
    env = os.environ if env is None else env
    forced = env.get("SFMPI_ALLOCATION")
    if forced:
        if forced not in BACKENDS:
            raise UsageError(f"SFMPI_ALLOCATION is one of {', '.join(BACKENDS)} (got {forced!r})")
        return forced
    if env.get("SLURM_JOB_ID"):
        return "slurm"
    if env.get("JOB_ID") and env.get("PE_HOSTFILE"):
        return "sge"
    return "local"


def from_env(env: dict | None = None, hostname: str | None = None) -> Allocation:
    env = os.environ if env is None else env
    backend = detect(env)
    if backend == "slurm":
        return slurm(env)
    if backend == "sge":
        return sge(env)
    import socket
    name = hostname or socket.gethostname().split(".")[0]
    return Allocation("local", "local", (Node(check_node(name), os.cpu_count() or 1),), name)


def _need(env: dict, key: str, backend: str) -> str:
    value = env.get(key)
    if not value:
        raise UsageError(f"inside a {backend} job but {key} is not set: is this the job's own shell?")
    return value


def check_node(name: str) -> str:
    if not _NODE_NAME.match(name):
        raise UsageError(f"{name!r:.80} is not a node name sfmpi accepts (letters, digits, '.', '_', '-')")
    return name


def _check_job(job_id: str) -> str:
    if not _JOB_ID.match(job_id):
        raise UsageError(f"{job_id!r:.40} is not a job ID")
    return job_id


def expand_cpus_per_node(text: str) -> list[int]:
    """Slurm's SLURM_JOB_CPUS_PER_NODE: "2(x3),1" -> [2, 2, 2, 1]."""
    out: list[int] = []
    for part in text.split(","):
        m = _CPUS_PER_NODE.match(part.strip())
        if not m:
            raise UsageError(f"cannot read SLURM_JOB_CPUS_PER_NODE {text!r:.80}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def slurm(env: dict) -> Allocation:
    import hostlist  # python-hostlist: Slurm's own hostlist syntax (lab[1-3,5],gpu01)
    job = _check_job(_need(env, "SLURM_JOB_ID", "Slurm"))
    try:
        names = hostlist.expand_hostlist(_need(env, "SLURM_JOB_NODELIST", "Slurm"))
    except hostlist.BadHostlist as exc:
        raise UsageError(f"cannot read SLURM_JOB_NODELIST: {exc}") from None
    cpus_text = env.get("SLURM_JOB_CPUS_PER_NODE") or env.get("SLURM_CPUS_ON_NODE") or "1"
    cpus = expand_cpus_per_node(cpus_text)
    if len(cpus) == 1:
        cpus = cpus * len(names)
    if len(cpus) != len(names):
        raise UsageError(f"Slurm gave {len(names)} node(s) but CPU counts for {len(cpus)} ({cpus_text!r})")
    mem = env.get("SLURM_MEM_PER_NODE")
    mem_mb = int(mem) if mem and mem.isdigit() and int(mem) > 0 else None
    nodes = tuple(Node(check_node(n), c, mem_mb) for n, c in zip(names, cpus))
    here = check_node(env.get("SLURMD_NODENAME") or names[0])
    return Allocation("slurm", job, nodes, here)


def parse_pe_hostfile(text: str) -> list[tuple[str, int]]:
    """Grid Engine's $PE_HOSTFILE: "host slots queue processors" per line -> [(host, slots)];
    a host twice (two queues) adds up."""
    slots: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or not fields[1].isdigit() or int(fields[1]) < 1:
            raise UsageError(f"cannot read the PE hostfile line {line!r:.80}")
        host = check_node(fields[0].split(".")[0])
        slots[host] = slots.get(host, 0) + int(fields[1])
    if not slots:
        raise UsageError("the PE hostfile names no host")
    return list(slots.items())


def sge(env: dict) -> Allocation:
    job = _check_job(_need(env, "JOB_ID", "Grid Engine"))
    path = Path(_need(env, "PE_HOSTFILE", "Grid Engine"))
    try:
        hosts = parse_pe_hostfile(path.read_text())
    except OSError as exc:
        raise UsageError(f"cannot read the PE hostfile {path}: {exc.strerror}") from None
    nslots = env.get("NSLOTS")
    if nslots and nslots.isdigit() and int(nslots) != sum(s for _, s in hosts):
        raise UsageError(f"NSLOTS is {nslots} but the PE hostfile gives {sum(s for _, s in hosts)} slots")
    here = env.get("HOSTNAME", hosts[0][0]).split(".")[0]
    here = here if here in dict(hosts) else hosts[0][0]
    return Allocation("sge", job, tuple(Node(h, s) for h, s in hosts), here)


def launch_argv(alloc: Allocation, node: str, argv: list[str], env: dict[str, str]) -> list[str]:
    """argv run on `node` of the allocation with `env` added, the scheduler's way. Pure.

    The environment goes as an `env K=V ...` prefix rather than through the
    scheduler's export options: srun and qrsh -inherit differ in what they
    pass, and this way both carry exactly the same."""
    alloc.node(node)
    for key in env:
        if not re.match(r"^[A-Z_][A-Z0-9_]*$", key):
            raise UsageError(f"{key!r} is not an environment variable name")
    prefixed = ["env", *(f"{k}={v}" for k, v in sorted(env.items())), *argv]
    if alloc.backend == "slurm":
        # --overlap: the step shares the job's CPUs with the batch step and other
        # steps (hostd is a daemon beside the work, not the work); one task on
        # exactly that node; no CPU binding, QEMU's threads go where Linux puts them.
        return ["srun", "--overlap", "--nodes=1", "--ntasks=1", f"--nodelist={node}", "--cpu-bind=none",
                "--mem=0", "--kill-on-bad-exit=0", f"--job-name=sfmpi-hostd-{node}", *prefixed]
    if alloc.backend == "sge":
        # The PE must have control_slaves TRUE (jobs/sge.py's pe_file()).
        return ["qrsh", "-inherit", "-nostdin", node, *prefixed]
    return prefixed
