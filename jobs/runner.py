"""`sfmpi jobs run`: sfmpi for the life of one batch job.

Inside a Slurm or Grid Engine job (hostd/master/allocation.py says which),
the runner makes a cluster of the job's nodes only and ends it with the job:

1. the job's own keys (only the allocated nodes get a certificate, so no other
   host can join) and its own master, here, on the job's first node;
2. one hostd per allocated node, started the scheduler's way (`srun --overlap`,
   `qrsh -inherit`) with the node's share as its budget: its CPUs as vCPUs,
   its memory (Slurm's SLURM_MEM_PER_NODE) as memory. Every ticket of the job
   is bounded by these budgets, so a request beyond the allocation is trimmed
   (or refused) the way a too-large request on one host is;
3. the parent VM, restored from a checkpoint directory or booted from an image,
   on this node; the command runs inside it (`sfmpirun ...` forks the clones
   over the job's nodes);
4. on the command's end, on SIGTERM/SIGINT/SIGHUP (scancel, qdel, the time
   limit): the parent's hostd goes down, every hostd is signalled (each stops
   its node's VMs: `hostd --stop-vms-on-signal`), the master stops and the
   job's directory is removed.

The scheduler's epilog (Slurm) or the PE's stop procedure (Grid Engine) runs
`sfmpi jobs cleanup --job ID` after that, for a runner that was killed before
it could clean up (docs/batch-admin-*.md).

Without a scheduler (the `local` backend) the runner uses this host's hostd as
every other command does.
"""
from __future__ import annotations

import contextlib
import enum
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sfmpi import proc
from sfmpi.errors import CommandError, HostdError, SfmpiError, UsageError
from sfmpi.paths import Paths

from ..hostd.cluster.config import ADMIN_NAME, MASTER_NAME, MASTER_PORT
from ..hostd.master.allocation import Allocation, Node, launch_argv

log = logging.getLogger("sfmpi.jobs")

DEFAULT_JOB_ROOT = "/var/lib/sfmpi-jobs"
START_TIMEOUT = float(os.environ.get("SFMPI_JOB_START_TIMEOUT", "120"))
STOP_TIMEOUT = 25.0            # within Slurm's default KillWait (30 s) before its SIGKILL
PARENT_NAME = "parent"
# Families per node: disjoint ranges, so a family keeps its number on every node it spans.
FAMILIES_PER_NODE = 2000


class JobState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Cancelled(SfmpiError):
    """The scheduler (or the user) signalled the job."""
    exit_code = 143


@dataclass(frozen=True)
class ParentSpec:
    checkpoint: str | None = None
    image: str | None = None
    mem_mb: int = 512
    cpus: int = 1


def job_root(env: dict | None = None) -> Path:
    """Where jobs keep their keys and their hostds' homes. On a real cluster
    this must be on a file system every node of a job sees (docs/batch-admin-slurm.md)."""
    env = os.environ if env is None else env
    return Path(env.get("SFMPI_JOB_ROOT", DEFAULT_JOB_ROOT))


def job_dir(alloc: Allocation, env: dict | None = None) -> Path:
    return job_root(env) / f"{alloc.backend}-{alloc.job_id}"


def hostd_argv(node: Node, python: str = sys.executable) -> list[str]:
    """The node's hostd, its budget the node's share of the allocation. Pure."""
    argv = [python, "-m", "sfmpi.cli", "hostd", "--stop-vms-on-signal", "--vcpu-budget", str(node.cpus)]
    return argv + (["--mem-budget", f"{node.mem_mb}M"] if node.mem_mb else [])


def node_env(alloc: Allocation, node: str, directory: Path, addresses: dict[str, str]) -> dict[str, str]:
    """A node's hostd environment: its home in the job's directory, its place in the job's cluster. Pure."""
    return {"SFMPI_HOME": str(directory / node), "SFMPI_HOST_NAME": node, "SFMPI_HOST_ADDRESS": addresses[node],
            "SFMPI_MASTER": f"{addresses[alloc.here]}:{MASTER_PORT}", "SFMPI_CLUSTER_KEYS": str(directory / "keys"),
            "SFMPI_FAMILY_START": str(1 + alloc.names.index(node) * FAMILIES_PER_NODE),
            "SFMPI_JOB": f"{alloc.backend}-{alloc.job_id}",
            # The allocation is the job's alone: its one family may use all of it
            # (a shared host keeps a quarter back for other tenants).
            "SFMPI_FAMILY_MEM_SHARE": "1"}


_NODE_ADDR = re.compile(r"\bNodeAddr=(\S+)")


def parse_node_addresses(text: str) -> dict[str, str]:
    """SFMPI_NODE_ADDRESSES="n1=10.1.0.1,n2=10.1.0.2": the hosts' network where names resolve elsewhere. Pure."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, addr = part.partition("=")
        try:
            ipaddress.IPv4Address(addr)
        except ValueError:
            raise UsageError(f"SFMPI_NODE_ADDRESSES: {part!r} is not NAME=IPV4") from None
        out[name] = addr
    return out


def node_addresses(alloc: Allocation) -> dict[str, str]:
    """Each node's address on the hosts' network: Slurm's NodeAddr (what
    slurmctld itself uses), else the name resolved."""
    out: dict[str, str] = {}
    given = parse_node_addresses(os.environ.get("SFMPI_NODE_ADDRESSES", ""))
    for name in alloc.names:
        if name in given:
            out[name] = given[name]
            continue
        addr = name
        if alloc.backend == "slurm":
            text = proc.output(["scontrol", "show", "node", "-o", name], timeout=30)
            m = _NODE_ADDR.search(text)
            addr = m.group(1) if m else name
        try:
            ipaddress.IPv4Address(addr)
        except ValueError:
            try:
                addr = socket.gethostbyname(addr)
            except OSError as exc:
                raise UsageError(f"job {alloc.job_id}: cannot resolve node {name} ({exc})") from None
        out[name] = addr
    return out


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return "no log"
    return " | ".join(text) or "no output"


class JobCluster:
    """The job's master and hostds: start() / stop() (safe twice, always cleans up) / a context manager."""

    def __init__(self, alloc: Allocation, env: dict | None = None):
        self.alloc = alloc
        self.dir = job_dir(alloc, env)
        self.state = JobState.STARTING
        self.master: subprocess.Popen | None = None
        self.hostds: dict[str, subprocess.Popen] = {}
        self.addresses: dict[str, str] = {}

    def __enter__(self) -> "JobCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        with ignoring_signals():
            self.stop()

    def here(self):
        from sfmpi.client import HostdClient
        return HostdClient(Paths(self.dir / self.alloc.here), autostart=False)

    def start(self) -> None:
        from ..hostd.cluster import keys
        if self.dir.exists():
            raise UsageError(f"job {self.alloc.job_id}: {self.dir} exists already (a second runner in the "
                             "same job, or a job that was not cleaned up: `sfmpi jobs cleanup --job ID`)")
        self.dir.mkdir(mode=0o700, parents=True)
        try:
            self.addresses = node_addresses(self.alloc)
            keys.init_cluster(self.dir / "keys", [MASTER_NAME, ADMIN_NAME, *self.alloc.names])
            self._start_master()
            for node in self.alloc.nodes:
                self._start_hostd(node)
            self._wait_registered()
        except BaseException:
            self.stop()
            raise
        self.state = JobState.RUNNING
        log.info("job %s: hostds on %s", self.alloc.job_id, ", ".join(self.alloc.names))

    def _spawn(self, argv: list[str], log_path: Path) -> subprocess.Popen:
        log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        log.info("job %s: %s", self.alloc.job_id, " ".join(argv))
        with open(log_path, "ab") as out:
            # Our own process group: a Ctrl-C at a terminal reaches the runner
            # only, and the runner ends them in order.
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)

    def _start_master(self) -> None:
        self.master = self._spawn([sys.executable, "-m", "sfmpi.cli", "master", "--home", str(self.dir / "master"),
                                   "--keys", str(self.dir / "keys"), "--listen", self.addresses[self.alloc.here],
                                   "--port", str(MASTER_PORT), "--policy", "spread"], self.dir / "master.log")
        self._wait("the job's master", lambda: self._admin("ping", 2) is not None, self.master, self.dir / "master.log")

    def _start_hostd(self, node: Node) -> None:
        env = node_env(self.alloc, node.name, self.dir, self.addresses)
        self.hostds[node.name] = self._spawn(launch_argv(self.alloc, node.name, hostd_argv(node), env),
                                             self.dir / f"hostd-{node.name}.log")

    def _admin(self, op: str, timeout: float = 10.0):
        from ..hostd.cluster import keys, wire
        try:
            return wire.call_sync(self.addresses[self.alloc.here], MASTER_PORT,
                                  keys.client_context(self.dir / "keys", ADMIN_NAME), MASTER_NAME, op, timeout=timeout)
        except HostdError:
            return None

    def _wait(self, what: str, ready, popen: subprocess.Popen, log_path: Path) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if popen.poll() is not None:
                raise HostdError(f"job {self.alloc.job_id}: {what} exited at start: {_tail(log_path)}")
            if ready():
                return
            time.sleep(0.2)
        raise HostdError(f"job {self.alloc.job_id}: {what} did not come up in {START_TIMEOUT:.0f} s "
                         f"({_tail(log_path)})")

    def _wait_registered(self) -> None:
        want = set(self.alloc.names)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            for name, p in self.hostds.items():
                if p.poll() is not None:
                    raise HostdError(f"job {self.alloc.job_id}: hostd of {name} exited at start: "
                                     f"{_tail(self.dir / f'hostd-{name}.log')}")
            hosts = self._admin("hosts") or []
            if {h["name"] for h in hosts if h["state"] == "up"} >= want:
                return
            time.sleep(0.3)
        raise HostdError(f"job {self.alloc.job_id}: not every node's hostd registered in {START_TIMEOUT:.0f} s; "
                         + "; ".join(f"{n}: {_tail(self.dir / f'hostd-{n}.log', 1)}" for n in self.alloc.names))

    def stop(self) -> None:
        if self.state == JobState.STOPPED:
            return
        self.state = JobState.STOPPING
        try:
            client = self.here()
            if client.running():
                client.call("down")        # the parent first: its clones on the other nodes fail at once
        except SfmpiError as exc:
            log.warning("job %s: down on %s: %s", self.alloc.job_id, self.alloc.here, exc)
        # The other nodes' hostds go down by `sfmpi down` run there the scheduler's
        # way: a signal through srun aborts the step and SIGKILLs its task before
        # hostd has stopped its VMs and removed their networks.
        others = [n for n, p in self.hostds.items() if n != self.alloc.here and p.poll() is None]
        if others:
            with ThreadPoolExecutor(len(others)) as pool:
                list(pool.map(self._down_on, others))
        _wait_all(list(self.hostds.values()), STOP_TIMEOUT, signal_first=signal.SIGTERM)
        if self.master is not None:
            _signal(self.master, signal.SIGTERM)
            _wait_all([self.master], 10)
        self._keep_logs()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.state = JobState.STOPPED


    def _down_on(self, node: str) -> None:
        argv = launch_argv(self.alloc, node, [sys.executable, "-m", "sfmpi.cli", "down"],
                           {"SFMPI_HOME": str(self.dir / node)})
        try:
            proc.run(argv, timeout=STOP_TIMEOUT)
        except CommandError as exc:
            log.warning("job %s: down on %s: %s", self.alloc.job_id, node, exc)

    def _keep_logs(self) -> None:
        """SFMPI_JOB_LOGS=DIR: the job's daemon logs are copied to DIR/JOB before its directory goes."""
        dest = os.environ.get("SFMPI_JOB_LOGS")
        if not dest:
            return
        out = Path(dest) / self.dir.name
        out.mkdir(parents=True, exist_ok=True)
        for log_file in [*self.dir.glob("*.log"), *self.dir.glob("*/hostd.log")]:
            rel = log_file.relative_to(self.dir)
            shutil.copy(log_file, out / str(rel).replace("/", "-"))


def _signal(p: subprocess.Popen, sig: int) -> None:
    if p.poll() is None:
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass


def _wait_all(procs: list[subprocess.Popen], timeout: float, signal_first: int | None = None) -> None:
    """Each process ended within timeout (a hostd after its down: at once); signal_first
    is sent to those still running after a short grace."""
    deadline = time.monotonic() + timeout
    if signal_first is not None:
        grace = time.monotonic() + 5
        while any(p.poll() is None for p in procs) and time.monotonic() < grace:
            time.sleep(0.1)
        for p in procs:
            _signal(p, signal_first)
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not end in %.0f s: killed", p.pid, timeout)
            p.kill()
            p.wait()


def start_parent(client, spec: ParentSpec, timeout: float = 600.0) -> str:
    """The parent VM on this node: restored from a checkpoint directory (a clone
    of it, which forks like any VM) or booted from an image. Its name."""
    if spec.checkpoint:
        path = Path(spec.checkpoint)
        if not (path / "manifest.json").is_file():
            raise UsageError(f"--checkpoint {spec.checkpoint}: no checkpoint there (no manifest.json)")
        res = client.call("clone", checkpoint=str(path.resolve()), n=1, allow_fewer=False, memory="local")
        return res["clones"][0]
    from sfmpi.image import default_image
    image = spec.image or default_image("no --image or --checkpoint given", " on the nodes")
    client.call("vm.start", name=PARENT_NAME, image=os.path.abspath(image), mem_mb=spec.mem_mb, cpus=spec.cpus,
                timeout=timeout)
    return PARENT_NAME


def exec_in(client, vm: str, argv: list[str]) -> int:
    def out(fd: int, data: bytes) -> None:
        stream = sys.stdout.buffer if fd == 1 else sys.stderr.buffer
        stream.write(data)
        stream.flush()
    code = int(client.call("vm.exec", on_output=out, name=vm, argv=argv)["code"])
    return code if 0 <= code < 256 else 128 + abs(code)


def _raise_cancelled(sig, _frame) -> None:
    raise Cancelled(f"job cancelled ({signal.Signals(sig).name}): stopping its VMs")


def run(alloc: Allocation, spec: ParentSpec, argv: list[str]) -> int:
    """The whole job: daemons, parent, command, teardown. The command's exit code."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _raise_cancelled)
    if alloc.backend == "local":
        from sfmpi.client import HostdClient
        client = HostdClient()
        name = start_parent(client, spec)
        try:
            return exec_in(client, name, argv)
        finally:
            with ignoring_signals():
                client.call("vm.stop", name=name)
    with JobCluster(alloc) as cluster:
        client = cluster.here()
        name = start_parent(client, spec)
        print(f"sfmpi: job {alloc.job_id}: parent {name} on {alloc.here}; nodes {', '.join(alloc.names)} "
              f"({alloc.cpus} CPUs)", file=sys.stderr, flush=True)
        return exec_in(client, name, argv)


@contextlib.contextmanager
def ignoring_signals():
    """Teardown is not interrupted by a second signal (scancel sends one per step)."""
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def cleanup(job: str | None, stale: bool, env: dict | None = None) -> list[str]:
    """What a killed runner left on this node: its hostds' VMs, networks and files.
    `job` is BACKEND-ID or an ID; `stale`: every job directory whose master is gone.
    The directories cleaned."""
    root = job_root(env)
    if not root.is_dir():
        return []
    dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if job is not None:
        # A bare ID is the current scheduler's (epilogs and PE procedures run in the job's environment).
        from ..hostd.master.allocation import detect
        backend = detect(os.environ if env is None else env)
        names = {job} if "-" in job else ({f"{backend}-{job}"} if backend != "local" else
                                          {f"{b}-{job}" for b in ("slurm", "sge")})
        dirs = [d for d in dirs if d.name in names]
    elif stale:
        dirs = [d for d in dirs if not _master_alive(d)]
    else:
        raise UsageError("jobs cleanup: give --job ID or --stale")
    for d in dirs:
        for home in sorted(p for p in d.iterdir() if (p / "state.db").exists()):
            _reap(home)
        _end_master(d)
        shutil.rmtree(d, ignore_errors=True)
    return [d.name for d in dirs]


def _masters(d: Path) -> list:
    """The job's master, by its command line (its home is in the job's directory)."""
    import psutil
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "master" in cmd and str(d / "master") in cmd:
            found.append(p)
    return found


def _master_alive(d: Path) -> bool:
    return bool(_masters(d))


def _end_master(d: Path) -> None:
    """A runner killed outright (Grid Engine's qdel) leaves its master: it runs in a
    session of its own, which the scheduler's kill does not reach."""
    import psutil
    for p in _masters(d):
        try:
            p.terminate()
            p.wait(10)
        except psutil.TimeoutExpired:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _reap(home: Path) -> None:
    """A hostd on that home reaps what the dead one left (it does so at start), then goes down."""
    from sfmpi.client import HostdClient, wait_gone
    client = HostdClient(Paths(home), autostart=False)
    try:
        if not client.running():
            env = {**os.environ, "SFMPI_HOME": str(home)}
            for k in ("SFMPI_MASTER", "SFMPI_HOST_NAME", "SFMPI_HOST_ADDRESS", "SFMPI_CLUSTER_KEYS"):
                env.pop(k, None)   # alone: a reaper joins no cluster
            with open(home / "reaper.log", "ab") as out:
                subprocess.Popen([sys.executable, "-m", "sfmpi.cli", "hostd"], env=env, stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=out, start_new_session=True)
            deadline = time.monotonic() + 30
            while not client.running() and time.monotonic() < deadline:
                time.sleep(0.1)
        pid = client.call("ping")["pid"]
        client.call("down")
        wait_gone(pid)
    except (SfmpiError, CommandError, OSError) as exc:
        log.warning("cleanup of %s: %s", home, exc)
