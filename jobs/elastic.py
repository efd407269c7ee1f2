"""Elastic Slurm: `State=CLOUD` nodes made by cloning a warm worker VM.

Slurm's power saving runs ResumeProgram with a hostlist when a job needs
powered-down nodes and SuspendProgram when they have idled for SuspendTime.
Here ResumeProgram forks the worker checkpoint (a VM whose munged runs and
whose slurmd is installed and configured, `sfmpi slurm worker-image`) into one
clone per node, tells slurmctld each node's address (`scontrol update
NodeAddr=`) and starts slurmd as that node; SuspendProgram stops the clones.

Two things a restored clone needs that a booted node does not:
* slurmctld ignores a node whose boot time (now - uptime) predates the resume
  request, and a clone keeps its parent's uptime: its slurmd runs in a time
  namespace whose boot time is now (`unshare -T --boottime=-UPTIME`);
* slurmctld starts ResumeProgram with its signals blocked, and children
  inherit the mask: resume() clears it first, or a stopped VM's QEMU would
  ignore SIGTERM.

The state (which hostd, which checkpoint, which node is which VM) is one JSON
file under the elastic directory, changed under a lock: slurmctld may run
several resume and suspend programs at once.

Mode "boot" boots each node from the worker image instead of cloning it (what
a cloud ResumeProgram does without sfmpi); bench/slurm.py compares the two.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sfmpi import proc
from sfmpi.errors import SfmpiError, UsageError
from sfmpi.paths import Paths

log = logging.getLogger("sfmpi.jobs.elastic")

DEFAULT_DIR = "/var/lib/sfmpi/slurm"
WORKER_VM = "slurm-worker"
WORKER_PACKAGES = ("slurmd", "munge")
SLURMD_PORT = 6818
MODES = ("clone", "boot")
# Measured: a resume 3 s long had one of two nodes ignored ("booted before the resume").
BOOT_MARGIN_S = 2.5


def elastic_dir(directory: str | None = None) -> Path:
    return Path(directory or os.environ.get("SFMPI_SLURM_DIR", DEFAULT_DIR))


@dataclass(frozen=True)
class ElasticState:
    hostd_home: str
    slurm_conf: str
    munge_key: str
    image: str
    checkpoint: str = ""
    mode: str = "clone"
    mem_mb: int = 512
    cpus: int = 1
    nodes: dict = field(default_factory=dict)      # node name -> VM name

    def __post_init__(self):
        if self.mode not in MODES:
            raise UsageError(f"elastic mode is one of {', '.join(MODES)} (got {self.mode!r})")


def config_lines(nodes: str, cpus: int, mem_mb: int, directory: Path, partition: str = "cloud",
                 suspend_time: int = 300, resume_timeout: int = 300) -> list[str]:
    """The slurm.conf lines for elastic nodes NODES (a hostlist). Pure."""
    return [
        f"ResumeProgram={directory}/resume", f"SuspendProgram={directory}/suspend",
        f"SuspendTime={suspend_time}", "SuspendTimeout=60", f"ResumeTimeout={resume_timeout}",
        "ResumeRate=0", "SuspendRate=0",
        # Cloud nodes are hidden from sinfo without it.
        "PrivateData=cloud",
        # Slurm's advice for nodes whose addresses change: no message forwarding tree.
        "TreeWidth=65533",
        f"NodeName={nodes} State=CLOUD CPUs={cpus} RealMemory={mem_mb}",
        f"PartitionName={partition} Nodes={nodes} MaxTime=INFINITE State=UP",
    ]


def program_text(verb: str, directory: Path, python: str = sys.executable) -> str:
    """ResumeProgram and SuspendProgram take no arguments of their own: a wrapper per verb. Pure."""
    return f"#!/bin/sh\nexec {python} -m sfmpi.cli slurm {verb} --dir {directory} \"$@\"\n"


def write_programs(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    for verb in ("resume", "suspend"):
        path = directory / verb
        path.write_text(program_text(verb, directory))
        path.chmod(0o755)


# -- state ---------------------------------------------------------------------
def _state_path(directory: Path) -> Path:
    return directory / "elastic.json"


@contextlib.contextmanager
def _locked(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "elastic.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def load(directory: Path) -> ElasticState:
    path = _state_path(directory)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no elastic worker in {directory}: run `sfmpi slurm worker-image` first") from None
    except ValueError as exc:
        raise UsageError(f"{path} is damaged: {exc}") from None
    return ElasticState(**data)


def save(directory: Path, state: ElasticState) -> None:
    tmp = _state_path(directory).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
    os.replace(tmp, _state_path(directory))


def _client(state: ElasticState):
    from sfmpi.client import HostdClient
    return HostdClient(Paths(Path(state.hostd_home)), autostart=False)


# -- the guest side ------------------------------------------------------------
def guest_conf(conf: str) -> str:
    """slurm.conf as a worker VM uses it: AuthInfo's socket= (a path of the host's
    munged) dropped, so the guest's munged on its default socket is used. Pure."""
    out = []
    for line in conf.splitlines():
        if line.strip().startswith("AuthInfo="):
            opts = [o for o in line.split("=", 1)[1].split(",") if not o.strip().startswith("socket=")]
            if not opts:
                continue
            line = "AuthInfo=" + ",".join(opts)
        out.append(line)
    return "\n".join(out) + "\n"


def setup_script(conf: str, key: bytes) -> str:
    """Shell run in a worker: Slurm's config and the cluster's munge key in place, munged
    restarted with the key, slurmd kept off until a node name is given. Pure."""
    return (
        "set -e\n"
        "install -d -m 0755 /etc/slurm\n"
        f"printf '%s' '{base64.b64encode(guest_conf(conf).encode()).decode()}' | base64 -d > /etc/slurm/slurm.conf\n"
        f"printf '%s' '{base64.b64encode(key).decode()}' | base64 -d > /etc/munge/munge.key\n"
        "chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key\n"
        # slurmd's cgroup/v2 plugin asks systemd over D-Bus for a scope, and the
        # image has no D-Bus: it makes the cgroup directories itself instead.
        "printf 'CgroupPlugin=cgroup/v2\\nIgnoreSystemd=yes\\n' > /etc/slurm/cgroup.conf\n"
        "systemctl disable --now slurmd >/dev/null 2>&1 || true\n"
        "systemctl restart munge\n"
        "munge -n | unmunge >/dev/null\n"
    )


def slurmd_dirs(conf: str, node: str) -> list[str]:
    """The directories slurmd of NODE writes in (spool, log, pid file), which must
    exist in the guest. Pure."""
    values = {}
    for line in conf.splitlines():
        key, _, value = line.strip().partition("=")
        if key in ("SlurmdSpoolDir", "SlurmdLogFile", "SlurmdPidFile") and value.startswith("/"):
            values[key] = value.split()[0].replace("%n", node).replace("%h", node)
    dirs = [values["SlurmdSpoolDir"]] if "SlurmdSpoolDir" in values else []
    return dirs + [os.path.dirname(values[k]) for k in ("SlurmdLogFile", "SlurmdPidFile") if k in values]


def slurmd_script(node: str, dirs: list[str] = ()) -> str:
    """Shell run in a node's VM: its hostname, and slurmd as NODE in a time namespace
    whose boot time is now (see the module's docstring). Pure."""
    import shlex
    return (
        "set -e\n"
        + "".join(f"mkdir -p {shlex.quote(d)}\n" for d in dirs) +
        f"hostname {node} && echo {node} > /etc/hostname\n"
        "up=$(cut -d. -f1 /proc/uptime)\n"
        f"setsid -f unshare --time --fork --boottime=-$up slurmd -D -N {node} "
        "</dev/null >/var/log/slurmd.out 2>&1\n"
    )


def _exec(client, vm: str, script: str) -> str:
    out: list[bytes] = []
    code = client.call("vm.exec", name=vm, argv=["sh", "-c", script],
                       on_output=lambda _fd, data: out.append(data))["code"]
    text = b"".join(out).decode(errors="replace")
    if code != 0:
        raise SfmpiError(f"VM {vm}: setup exited {code}: {text.strip()[-300:]}")
    return text


def _ips(client) -> dict[str, str]:
    return {r["name"]: r["ip"] for r in client.call("vm.list")}


# -- commands -------------------------------------------------------------------
def build_worker(directory: Path, hostd_home: Path, slurm_conf: Path, munge_key: Path, image: str | None,
                 mem_mb: int, cpus: int, mode: str = "clone") -> ElasticState:
    """`sfmpi slurm worker-image`: the worker VM (booted, configured, munged running),
    its checkpoint, and the elastic state that resume and suspend read."""
    conf, key = _read(slurm_conf), munge_key.read_bytes() if munge_key.is_file() else None
    if key is None:
        raise UsageError(f"no munge key at {munge_key}")
    if image is None:
        from sfmpi import image as image_mod
        image = str(image_mod.build(image_mod.Recipe(extra_packages=WORKER_PACKAGES)))
    state = ElasticState(hostd_home=str(hostd_home), slurm_conf=str(slurm_conf), munge_key=str(munge_key),
                         image=str(image), mode=mode, mem_mb=mem_mb, cpus=cpus)
    client = _client(state)
    client.call("vm.start", name=WORKER_VM, image=state.image, mem_mb=mem_mb, cpus=cpus, timeout=600, nat=True,
                open_ports=[f"{SLURMD_PORT}/tcp"])
    try:
        _exec(client, WORKER_VM, setup_script(conf, key))
        ck = client.call("checkpoint", name=WORKER_VM)
    except BaseException:
        client.call("vm.stop", name=WORKER_VM)
        raise
    state = replace(state, checkpoint=ck["id"])
    write_programs(directory)
    with _locked(directory):
        save(directory, state)
    return state


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def clear_signal_mask() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def expand(hostlist_text: str) -> list[str]:
    import hostlist
    from ..hostd.master.allocation import check_node
    try:
        return [check_node(n) for n in hostlist.expand_hostlist(hostlist_text)]
    except hostlist.BadHostlist as exc:
        raise UsageError(f"cannot read the node list {hostlist_text!r}: {exc}") from None


def _scontrol(state: ElasticState, *args: str) -> None:
    proc.run(["scontrol", *args], timeout=60, env={**os.environ, "SLURM_CONF": state.slurm_conf})


def resume(directory: Path, hostlist_text: str) -> dict[str, str]:
    """ResumeProgram: the nodes as VMs, registered with slurmctld. node -> VM."""
    clear_signal_mask()
    started = time.time()
    names = expand(hostlist_text)
    state = load(directory)
    client = _client(state)
    made: list[str] = []
    try:
        if state.mode == "clone":
            res = client.call("clone", checkpoint=state.checkpoint, n=len(names), allow_fewer=False, memory="local")
            made = list(res["clones"])
        else:
            made = _boot(client, state, names)
        vms = dict(zip(names, made))
        ips = _ips(client)
        with _locked(directory):
            save(directory, replace(load(directory), nodes={**load(directory).nodes, **vms}))
        for node, vm in vms.items():
            _scontrol(state, "update", f"NodeName={node}", f"NodeAddr={ips[vm]}", f"NodeHostname={node}")
        # slurmctld takes a node's boot time (now - uptime, whole seconds, by the
        # guest's clock) to be before its resume request when it is not later by
        # the second: the time namespace's boot is now less the fraction of a
        # second the offset cannot express. A clone that is quicker than that waits.
        time.sleep(max(0.0, started + BOOT_MARGIN_S - time.time()))
        with ThreadPoolExecutor(len(vms)) as pool:
            conf = _read(Path(state.slurm_conf))
            list(pool.map(lambda item: _exec(client, item[1], slurmd_script(item[0], slurmd_dirs(conf, item[0]))),
                          vms.items()))
    except (SfmpiError, OSError) as exc:
        _undo(client, made)
        with _locked(directory):
            s = load(directory)
            save(directory, replace(s, nodes={n: v for n, v in s.nodes.items() if n not in names}))
        reason = f"sfmpi resume failed: {exc}".replace("\n", " ")[:200]
        with contextlib.suppress(SfmpiError):
            _scontrol(state, "update", f"NodeName={hostlist_text}", "State=DOWN", f"Reason={reason}")
        raise
    log.info("resumed %s", ", ".join(f"{n}={v}" for n, v in vms.items()))
    return vms


def _boot(client, state: ElasticState, names: list[str]) -> list[str]:
    """Mode boot: each node a VM booted from the worker image and set up as the worker was."""
    conf, key = _read(Path(state.slurm_conf)), Path(state.munge_key).read_bytes()
    made: list[str] = []

    def one(node: str) -> str:
        vm = f"boot-{node}"
        client.call("vm.start", name=vm, image=state.image, mem_mb=state.mem_mb, cpus=state.cpus, timeout=900,
                    nat=True, open_ports=[f"{SLURMD_PORT}/tcp"])
        made.append(vm)
        _exec(client, vm, setup_script(conf, key))
        return vm
    try:
        with ThreadPoolExecutor(len(names)) as pool:
            return list(pool.map(one, names))
    except BaseException:
        _undo(client, made)
        raise


def _undo(client, vms: list[str]) -> None:
    for vm in vms:
        with contextlib.suppress(SfmpiError):
            client.call("vm.stop", name=vm)


def suspend(directory: Path, hostlist_text: str) -> list[str]:
    """SuspendProgram: the nodes' VMs stopped. The VMs stopped."""
    clear_signal_mask()
    names = expand(hostlist_text)
    state = load(directory)
    client = _client(state)
    with _locked(directory):
        s = load(directory)
        vms = [s.nodes[n] for n in names if n in s.nodes]
        save(directory, replace(s, nodes={n: v for n, v in s.nodes.items() if n not in names}))
    _undo(client, vms)
    log.info("suspended %s", ", ".join(vms) or "nothing")
    return vms


def set_mode(directory: Path, mode: str) -> ElasticState:
    with _locked(directory):
        s = replace(load(directory), mode=mode)
        save(directory, s)
    return s
