"""What an sfmpirun job looks like, as pure functions: how many clones, where
the ranks go, the hostfile and the real launcher's command line.

Nothing here runs anything, so every rule is unit-tested without a VM.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from sfmpi.errors import UsageError

FLAVOURS = ("mpich", "openmpi")
MPIEXEC = {"mpich": "mpiexec.mpich", "openmpi": "mpiexec.openmpi"}


@dataclass(frozen=True)
class JobSpec:
    """sfmpirun's own options; `launcher_args` goes to the real mpiexec verbatim
    (the program and its arguments, and any option sfmpirun does not know)."""
    ranks: int
    launcher_args: tuple[str, ...]
    ppn: int = 1
    clones: int | None = None          # None: enough for `ranks` at `ppn`
    env: tuple[tuple[str, str], ...] = ()
    wdir: str | None = None
    mpi: str = "auto"
    parent_ranks: bool = True
    allow_fewer: bool = False
    verbose: bool = False
    launch_timeout: int = 120          # seconds for the launcher to reach every clone with ranks
    env_names: tuple[str, ...] = field(default=())  # -x NAME: pass this variable's current value

    def __post_init__(self):
        if self.ranks <= 0:
            raise UsageError(f"-n must be at least 1 (got {self.ranks})")
        if self.ppn <= 0:
            raise UsageError(f"-ppn must be at least 1 (got {self.ppn})")
        if self.clones is not None and self.clones < 0:
            raise UsageError(f"--clones must be 0 or more (got {self.clones})")
        if self.mpi not in FLAVOURS + ("auto",):
            raise UsageError(f"--mpi must be mpich, openmpi or auto (got {self.mpi!r})")
        if self.launch_timeout <= 0:
            raise UsageError(f"--launch-timeout must be at least 1 second (got {self.launch_timeout})")
        if not self.launcher_args:
            raise UsageError("no program to run: sfmpirun [options] PROGRAM [ARGS...]")
        if not self.parent_ranks and self.clones == 0:
            raise UsageError("--no-parent-ranks with --clones 0 leaves nowhere to run a rank")


def clones_wanted(spec: JobSpec) -> int:
    """Clones to ask for: one host per `ppn` ranks, the parent being one host
    unless --no-parent-ranks (SnowFlock ran ranks in the parent too)."""
    if spec.clones is not None:
        return spec.clones
    hosts = math.ceil(spec.ranks / spec.ppn)
    return hosts - 1 if spec.parent_ranks else hosts


def check_granted(spec: JobSpec, wanted: int, granted: int) -> None:
    """Fail before cloning when the ticket is smaller than asked, unless --allow-fewer."""
    if granted >= wanted:
        return
    if not spec.allow_fewer:
        raise UsageError(f"asked for {wanted} clone(s) for {spec.ranks} rank(s), the host granted {granted}; "
                         f"run with --allow-fewer to use what was granted, or ask for fewer ranks")
    if granted == 0 and not spec.parent_ranks:
        raise UsageError("the host granted no clone and --no-parent-ranks leaves nowhere to run a rank")


def slots(spec: JobSpec, hosts: int) -> int:
    """Ranks per host: `ppn`, or more when fewer hosts were granted than asked
    (the same ranks oversubscribe the hosts there are)."""
    return max(spec.ppn, math.ceil(spec.ranks / hosts))


def hosts_with_ranks(hosts: list[str], ranks: int, per_host: int) -> list[str]:
    """The hosts the launcher puts ranks on: filled in hostfile order, `per_host` each."""
    return hosts[:math.ceil(ranks / per_host)]


def hostfile(flavour: str, hosts: list[str], per_host: int) -> str:
    if flavour == "mpich":
        return "".join(f"{h}:{per_host}\n" for h in hosts)
    return "".join(f"{h} slots={per_host}\n" for h in hosts)


def mpiexec_argv(flavour: str, spec: JobSpec, hostfile_path: str, agent: str, subnet: str | None,
                 env: dict[str, str]) -> list[str]:
    """The real launcher's command line: our hosts and agent first, then what
    the user gave us for it. `env` is -genv/-x resolved to values."""
    if flavour == "mpich":
        argv = [MPIEXEC["mpich"], "-launcher", "rsh", "-launcher-exec", agent, "-f", hostfile_path,
                "-n", str(spec.ranks)]
        for k, v in env.items():
            argv += ["-genv", k, v]
        if spec.wdir:
            argv += ["-wdir", spec.wdir]
    elif flavour == "openmpi":
        argv = [MPIEXEC["openmpi"], "--allow-run-as-root", "--hostfile", hostfile_path, "-n", str(spec.ranks),
                "--mca", "plm", "rsh", "--mca", "plm_rsh_agent", agent,
                # One agent call per clone from the parent: clones do not ssh on.
                "--mca", "plm_rsh_no_tree_spawn", "1",
                # More ranks than slots (fewer clones granted) is the user's choice, not an error.
                "--oversubscribe"]
        if subnet:
            # Only the family network: Open MPI otherwise tries every interface it sees.
            argv += ["--mca", "oob_tcp_if_include", subnet, "--mca", "btl_tcp_if_include", subnet]
        for k, v in env.items():
            argv += ["-x", f"{k}={v}"]
        if spec.wdir:
            argv += ["-wdir", spec.wdir]
    else:
        raise UsageError(f"unknown MPI flavour {flavour!r}")
    return argv + list(spec.launcher_args)


def resolve_env(spec: JobSpec, environ: dict[str, str]) -> dict[str, str]:
    """-genv K V and -x K=V as given; -x K takes K's value from our environment."""
    out = dict(spec.env)
    for name in spec.env_names:
        if name not in environ:
            raise UsageError(f"-x {name}: {name} is not set in the environment")
        out[name] = environ[name]
    return out


def with_preload(env: dict[str, str], environ: dict[str, str], library: str) -> dict[str, str]:
    """The ranks' environment with `library` preloaded before whatever the user
    preloads (by -genv/-x, or in the environment the launcher passes on)."""
    theirs = env.get("LD_PRELOAD", environ.get("LD_PRELOAD", ""))
    return {**env, "LD_PRELOAD": ":".join(p for p in (library, theirs) if p)}


def remote_command(argv: list[str]) -> str:
    """The command a launcher asks its agent to run on a host, as one line for
    the remote shell. Not quoted on purpose: Hydra passes the proxy's path with
    literal double quotes and Open MPI passes shell syntax (PATH=...; export
    PATH; ...); both mean them to be parsed by a shell, as ssh would."""
    return " ".join(argv)
