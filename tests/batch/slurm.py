"""A real Slurm cluster over a lab's hosts, for the batch tests: munged, slurmctld
in the lab's namespace, one slurmd per lab host in that host's namespace.

Debian's packages do not start the daemons here (no systemd, policy-rc.d
refuses), so these classes do, each owning its process (start(), stop() safe
twice, a context manager). The daemons run in the foreground (-D) with every
file under one directory; munged listens on a private socket.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from sfmpi.hostd.lab import topology
from sfmpi.hostd.net.namespace import NETNS_DIR, enter_argv

CTL_PORT = 6817
SLURMD_PORT = 6818


def slurm_conf(directory: Path, hosts: list[str], cpus: int, mem_mb: int, extra: list[str] = (),
               ctl_ip: str = str(topology.MASTER_IP), epilog: bool = True) -> str:
    """slurm.conf for the lab: slurmctld at ctl_ip (the lab's master address by
    default), node labN at labN's address. Pure."""
    d = directory
    names = ",".join(hosts)
    lines = [
        "ClusterName=sfmpilab",
        # slurmctld checks that its own host name is the controller's.
        f"SlurmctldHost={socket.gethostname().split('.')[0]}({ctl_ip})",
        f"SlurmctldPort={CTL_PORT}", f"SlurmdPort={SLURMD_PORT}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={d}/munge.socket",
        "SlurmUser=root", "SlurmdUser=root",
        f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool/%n",
        f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd-%n.pid",
        f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "MpiDefault=none", "ReturnToService=2", "SchedulerType=sched/backfill",
        # The lab's nodes say they have what the config says (they share this machine's 2 cores).
        "SlurmdParameters=config_overrides",
        "KillWait=30", "MinJobAge=30", "SlurmctldTimeout=30", "SlurmdTimeout=60", "InactiveLimit=0",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        *([f"Epilog={d}/epilog"] if epilog else []), *extra,
        *(f"NodeName={h} NodeAddr={topology.host_ip(h)} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN"
          for h in hosts),
    ]
    if hosts:
        lines.append(f"PartitionName=lab Nodes={names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO")
    return "\n".join(lines) + "\n"


# The admins' epilog as shipped (docs/batch-admin-slurm.md): what a killed job's runner left on the node.
EPILOG = Path(__file__).resolve().parents[2] / "jobs" / "admin" / "slurm-epilog"


class Daemon:
    """One foreground daemon this test started: its Popen, its log."""

    def __init__(self, argv: list[str], log: Path, env: dict):
        self.argv, self.log, self.env = argv, log, env
        self.popen: subprocess.Popen | None = None

    def start(self) -> "Daemon":
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                          env=self.env, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class SlurmCluster:
    """munged + slurmctld + slurmd per host; `run(argv)` runs a Slurm client in the controller's namespace."""

    def __init__(self, directory: Path, hosts: list[str], cpus: int = 2, mem_mb: int = 2048,
                 env: dict | None = None, extra: list[str] = (), ctl_ns: str = topology.LAB_NS,
                 ctl_ip: str = str(topology.MASTER_IP), epilog: bool = True):
        self.dir, self.hosts, self.ctl_ns, self.ctl_ip = directory, hosts, ctl_ns, ctl_ip
        self.epilog = epilog
        self.conf = directory / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), **(env or {})}
        self.cpus, self.mem_mb, self.extra = cpus, mem_mb, list(extra)
        self.daemons: list[Daemon] = []

    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def write_conf(self) -> None:
        import shutil
        # As an admin installs it: with sfmpi's full path (Slurm gives epilogs a minimal PATH).
        text = EPILOG.read_text().replace("\nSFMPI=sfmpi\n", f"\nSFMPI={shutil.which('sfmpi')}\n")
        assert shutil.which("sfmpi") and "SFMPI=/" in text
        (self.dir / "epilog").write_text(text)
        (self.dir / "epilog").chmod(0o755)
        self.conf.write_text(slurm_conf(self.dir, self.hosts, self.cpus, self.mem_mb, self.extra, self.ctl_ip,
                                         self.epilog))

    def start(self) -> None:
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.write_conf()
        try:
            self.daemons.append(Daemon(["munged", "-F", "--force", f"--socket={d}/munge.socket",
                                        f"--key-file={key}", f"--pid-file={d}/munged.pid",
                                        f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"],
                                       d / "munged.out", self.env).start())
            _wait(lambda: (d / "munge.socket").exists(), "munged", d / "munged.log")
            self.daemons.append(Daemon(enter_argv(str(NETNS_DIR / self.ctl_ns), ["slurmctld", "-D", "-i"]),
                                       d / "slurmctld.out", self.env).start())
            _wait(lambda: self.run(["scontrol", "ping"], check=False).returncode == 0, "slurmctld",
                  d / "slurmctld.log")
            for h in self.hosts:
                self.start_slurmd(h)
            if self.hosts:
                self.wait_nodes("idle")
        except BaseException:
            self.stop()
            raise

    def start_slurmd(self, host: str, argv_prefix: list[str] = ()) -> Daemon:
        d = Daemon(enter_argv(str(NETNS_DIR / host), [*argv_prefix, "slurmd", "-D", "-N", host]),
                   self.dir / f"slurmd-{host}.out", self.env).start()
        self.daemons.append(d)
        return d

    def wait_nodes(self, state: str, hosts: list[str] | None = None, timeout: float = 60) -> None:
        hosts = hosts or self.hosts
        _wait(lambda: all(self.node_state(h).startswith(state) for h in hosts), f"nodes {state}",
              self.dir / "slurmctld.log", timeout)

    def node_state(self, host: str) -> str:
        out = self.run(["sinfo", "-h", "-N", "-n", host, "-o", "%T"], check=False).stdout.strip().lower()
        return out.rstrip("*~#%!")

    def run(self, argv: list[str], check: bool = True, timeout: float = 120, env: dict | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run(enter_argv(str(NETNS_DIR / self.ctl_ns), argv), capture_output=True, text=True,
                           env={**self.env, **(env or {})}, timeout=timeout, cwd=cwd)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.strip()}")
        return p

    def job_state(self, job: str) -> str:
        out = self.run(["scontrol", "show", "job", "-o", job], check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "GONE"

    def wait_job(self, job: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "GONE"),
                 timeout: float = 900) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.job_state(job)
            if s in states:
                return s
            time.sleep(1)
        raise AssertionError(f"job {job} not in {states} after {timeout:.0f} s (is {self.job_state(job)})")

    def stop(self) -> None:
        for d in reversed(self.daemons):
            d.stop()
        self.daemons.clear()


def _wait(cond, what: str, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.3)
    tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else ["no log"]
    raise AssertionError(f"{what} not ready in {timeout:.0f} s: {' | '.join(tail)}")
