"""`sfmpi lab up --hosts K` / `lab down`: K hosts on one machine, each a network
namespace with its own hostd, and the master in the lab's own namespace.

Each host's hostd has its own state directory (SFMPI_LAB_HOME/labN: state,
checkpoints, its RAM directory under /dev/shm (a tmpfs of its own, ramdir.py)
and its family namespace follow from it), runs in its host's network namespace only (nsenter --net: FUSE
mounts and files stay visible to the machine), and is told its place in the
cluster by its environment (cluster/config.py). The lab's record (lab.json)
says where each host's hostd is, for `--host NAME` / SFMPI_HOST.

A real cluster runs the same daemons on real hosts (docs/cluster.md).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from sfmpi.errors import HostdError, NotFound, UsageError
from sfmpi.paths import Paths

from ..cluster import keys, wire
from ..cluster.config import ADMIN_NAME, MASTER_NAME, MASTER_PORT
from ..net.namespace import enter_thread
from ..policy.admission import host_mem_mb, parse_size_mb
from . import ramdir, topology
from .network import LabNetwork

log = logging.getLogger("sfmpi.lab")

DEFAULT_LAB_HOME = "/var/lib/sfmpi-lab"
START_TIMEOUT = 60.0
# Family numbers per host: disjoint ranges, so a family keeps its number on every host it spans.
FAMILIES_PER_HOST = 2000


def lab_home() -> Path:
    return Path(os.environ.get("SFMPI_LAB_HOME", DEFAULT_LAB_HOME)).resolve()


def record_path(home: Path | None = None) -> Path:
    return (home or lab_home()) / "lab.json"


def read_record(home: Path | None = None) -> dict | None:
    path = record_path(home)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise HostdError(f"the lab's record {path} is damaged: {exc}") from None


def host_home(name: str, home: Path | None = None) -> Path:
    """The state directory of lab host NAME's hostd (what --host NAME points the CLI at)."""
    rec = read_record(home)
    if rec is None:
        raise NotFound(f"no lab is up (no {record_path(home)}): `sfmpi lab up --hosts K` makes one")
    if name not in rec["hosts"]:
        raise NotFound(f"the lab has no host {name} (hosts: {', '.join(rec['hosts'])})")
    return Path(rec["hosts"][name]["home"])


def hostd_env(name: str, home: Path, keys_dir: Path, multicast: bool = True) -> dict[str, str]:
    """A lab host's hostd environment: its state directory and its place in the cluster. Pure."""
    return {"SFMPI_HOME": str(home / name), "SFMPI_HOST_NAME": name, "SFMPI_MULTICAST": "1" if multicast else "0",
            "SFMPI_HOST_ADDRESS": str(topology.host_ip(name)),
            "SFMPI_MASTER": f"{topology.MASTER_IP}:{MASTER_PORT}", "SFMPI_CLUSTER_KEYS": str(keys_dir),
            "SFMPI_FAMILY_START": str(1 + (topology.host_index(name) - 1) * FAMILIES_PER_HOST)}


def _spawn(argv: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env={**os.environ, **env}, start_new_session=True)


def _tail(path: Path) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()[-2:] if path.exists() else []
    return " | ".join(lines) or "no output"


def _wait(what: str, ready, popen: subprocess.Popen, log_path: Path, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            lines = log_path.read_text(errors="replace").strip().splitlines()[-3:] if log_path.exists() else []
            raise HostdError(f"{what} exited at start: {' | '.join(lines) or 'no output'}")
        if ready():
            return
        time.sleep(0.1)
    raise HostdError(f"{what} did not come up in {timeout:.0f} s (log: {log_path})")


class Lab:
    def __init__(self, home: Path | None = None):
        self.home = home or lab_home()
        self.keys = self.home / "keys"

    def admin(self, op: str, timeout: float = 30.0, **args):
        """A call to the master, as the admin (the CLI's certificate), made from
        inside the lab's namespace: the lab's addresses exist only there, and
        from the machine's own namespace the connection would leave by its
        default route."""
        ctx = keys.client_context(self.keys, ADMIN_NAME)
        return in_namespace(topology.LAB_NS, lambda: wire.call_sync(
            str(topology.MASTER_IP), MASTER_PORT, ctx, MASTER_NAME, op, timeout=timeout, **args))

    def up(self, k: int, policy: str = "spread", mem_budget: str | None = None,
           ram_dir_size: str | None = None, multicast: bool = True, env: dict[str, str] | None = None) -> dict:
        """ram_dir_size: each host's RAM directory (a tmpfs of its own); by
        default its memory budget, else half the machine's RAM (the size
        Linux gives /dev/shm). multicast: False makes every memory server and
        memtap unicast only, as on a network without multicast. env: more of
        the hostds' environment (SFMPI_PUSH_TICKETS=0, SFMPI_PREFETCH=0 ...)."""
        if policy not in ("pack", "spread"):
            raise UsageError(f"--policy is pack or spread (got {policy!r})")
        ram_mb = parse_size_mb(ram_dir_size or mem_budget or f"{host_mem_mb() // 2}M")
        names = topology.host_names(k)
        if read_record(self.home) is not None:
            raise UsageError(f"a lab is already up ({record_path(self.home)}): `sfmpi lab down` first")
        net = LabNetwork(k)
        net.up()
        rec: dict = {"hosts": {}, "policy": policy, "keys": str(self.keys), "home": str(self.home),
                     "multicast": multicast, "env": dict(env or {})}
        try:
            self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
            keys.init_cluster(self.keys, [MASTER_NAME, ADMIN_NAME, *names])
            py = sys.executable
            self._start_master(rec, policy)
            for name in names:
                env = {**rec["env"], **hostd_env(name, self.home, self.keys, multicast)}
                ram = Paths(Path(env["SFMPI_HOME"])).shm
                rec["hosts"][name] = {"home": env["SFMPI_HOME"], "address": env["SFMPI_HOST_ADDRESS"],
                                      "ram_dir": str(ram)}
                self._write(rec)
                ramdir.make(ram, ram_mb, name)
                argv = [py, "-m", "sfmpi.cli", "hostd"] + (["--mem-budget", mem_budget] if mem_budget else [])
                popen = _spawn(net.wrap(name, argv), env, self.home / name / "hostd.log")
                rec["hosts"][name]["pid"] = popen.pid
                self._write(rec)
                sock = Path(env["SFMPI_HOME"]) / "hostd.sock"
                _wait(f"hostd of {name}", sock.exists, popen, self.home / name / "hostd.log")
            try:
                _wait_until(lambda: {h["name"] for h in self.admin("hosts") if h["state"] == "up"} >= set(names),
                            "every host registered with the master")
            except HostdError as exc:
                said = [f"{n}: {_tail(self.home / n / 'hostd.log')}" for n in names]
                raise HostdError(f"{exc}; " + "; ".join(said)) from None
        except BaseException:
            self.down()
            raise
        return rec

    def _start_master(self, rec: dict, policy: str) -> None:
        log_path = self.home / "master" / "master.log"
        master = _spawn(LabNetwork(1).wrap(topology.LAB_NS, [
            sys.executable, "-m", "sfmpi.cli", "master", "--home", str(self.home / "master"), "--keys",
            str(self.keys), "--listen", str(topology.MASTER_IP), "--policy", policy]), {}, log_path)
        rec["master"] = {"pid": master.pid, "address": f"{topology.MASTER_IP}:{MASTER_PORT}"}
        self._write(rec)
        _wait("the master", lambda: self._answers("ping"), master, log_path)

    def restart_master(self) -> int:
        """The master again, after it died or was stopped (what a service manager
        does on a real cluster): it finds its hosts in its database, and they
        are up again with their next heartbeat. Its new PID."""
        rec = read_record(self.home)
        if rec is None:
            raise NotFound(f"no lab is up ({record_path(self.home)})")
        _kill((rec.get("master") or {}).get("pid"))
        self._start_master(rec, rec.get("policy", "spread"))
        return rec["master"]["pid"]

    def _restart_hostd(self, name: str, rec: dict) -> None:
        env = {**rec.get("env", {}), **hostd_env(name, self.home, self.keys, rec.get("multicast", True))}
        popen = _spawn(LabNetwork(1).wrap(name, [sys.executable, "-m", "sfmpi.cli", "hostd"]), env,
                       self.home / name / "hostd.log")
        rec["hosts"][name]["pid"] = popen.pid
        from sfmpi.client import HostdClient
        client = HostdClient(Paths(Path(env["SFMPI_HOME"])), autostart=False)
        _wait(f"hostd of {name} (restarted to clean up)", client.running, popen, self.home / name / "hostd.log")

    def _answers(self, op: str) -> bool:
        try:
            self.admin(op, timeout=2)
            return True
        except HostdError:
            return False

    def _write(self, rec: dict) -> None:
        tmp = record_path(self.home).with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=2) + "\n")
        os.replace(tmp, record_path(self.home))

    def down(self) -> dict:
        """Every host's VMs and hostd, the master, the namespaces, the lab's files; safe twice."""
        from sfmpi.client import HostdClient, wait_gone
        rec = read_record(self.home) or {"hosts": {}}
        stopped: list[str] = []
        for name, h in rec["hosts"].items():
            client = HostdClient(Paths(Path(h["home"])), autostart=False)
            try:
                if not client.running() and Path(h["home"]).exists() and LabNetwork(1).exists():
                    # A host whose hostd died: a new one reaps what the old one left
                    # (QEMUs, memtaps, its families' namespace), then goes down with it.
                    self._restart_hostd(name, rec)
                if client.running():
                    pid = client.call("ping")["pid"]
                    stopped += client.call("down")["stopped"]
                    wait_gone(pid)
            except Exception as exc:  # noqa: BLE001 - down goes on; the kill below ends it
                log.warning("lab host %s: down: %s", name, exc)
            _kill(h.get("pid"))
            if h.get("ram_dir"):
                ramdir.remove(Path(h["ram_dir"]))
        _kill((rec.get("master") or {}).get("pid"))
        LabNetwork(1).down()
        shutil.rmtree(self.home, ignore_errors=True)
        return {"stopped": stopped, "hosts": sorted(rec["hosts"])}


def in_namespace(netns: str, fn):
    """fn() on a thread of its own inside network namespace `netns` (only that
    thread moves); its result or its exception."""
    import threading

    from ..net.namespace import NETNS_DIR
    if not (NETNS_DIR / netns).exists():
        raise NotFound(f"no network namespace {netns}: is the lab up?")
    out: dict = {}

    def run() -> None:
        try:
            enter_thread(NETNS_DIR / netns)
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            out["error"] = exc
    t = threading.Thread(target=run, name=f"in-{netns}")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _wait_until(cond, what: str, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except HostdError as exc:
            last = exc
        time.sleep(0.2)
    raise HostdError(f"lab: not {what} within {timeout:.0f} s" + (f" ({last})" if last else ""))


def _kill(pid) -> None:
    """A daemon the lab started (its PID in the record), if it still runs: TERM, then KILL."""
    import psutil
    if not pid:
        return
    try:
        p = psutil.Process(int(pid))
        if "sfmpi.cli" not in " ".join(p.cmdline()):
            return            # the PID was reused by something not ours
        p.send_signal(signal.SIGTERM)
        p.wait(10)
    except psutil.TimeoutExpired:
        p.kill()
    except psutil.Error:
        pass
