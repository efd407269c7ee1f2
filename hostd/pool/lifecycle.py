"""A pool's life: `pool up` starts its controller process (`pool serve`),
which makes the warm checkpoint if it was given an image, starts HAProxy and
the first workers, then ticks until `pool down` (SIGTERM) or `sfmpi down`.

States in pool_info: starting -> serving -> stopping -> stopped, or failed
(with the error). The controller is a process of its own, not a part of hostd:
it reaches hostd only through the CLI's client and never restarts it: a hostd
that stopped (`sfmpi down`, a crash, a restart) ends the pool, which says
"hostd went away" and stops what it can. Its workers' reports come through
hostd, so without it the controller could only judge them on stale data.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sfmpi.errors import AlreadyExists, HostdError, PoolError, SfmpiError, UsageError

from .controller import Controller
from .db import PoolDb
from .haproxy import HAProxy
from .latency import RequestLog
from .status import controller_alive, open_pool, pool_dir, pool_names
from .workers import BootWorkers, CloneWorkers, default_service, start_service

log = logging.getLogger("sfmpi.pool")
TICK_S = 0.25


@dataclass(frozen=True)
class PoolSpec:
    name: str
    checkpoint: str = ""      # a warm checkpoint to clone, or
    image: str = ""           # an image to boot the first worker from
    service: str = ""         # the service's command (default: the example service)
    port: int = 8080          # the service's port in the workers
    front_port: int = 0       # the balancer's port on 127.0.0.1 (0: any free one)
    mem_mb: int = 256
    cpus: int = 1
    workers: str = "clone"    # clone | boot
    probe_timeout_s: float = 120.0  # how long the service has to answer in the first worker

    def check(self) -> None:
        if bool(self.checkpoint) == bool(self.image):
            raise UsageError("pool up takes one of --checkpoint CK or --image IMG")
        if self.workers not in ("clone", "boot"):
            raise UsageError(f"--workers is clone or boot (got {self.workers!r})")
        if self.workers == "boot" and not self.image:
            raise UsageError("--workers boot boots every worker from an image: give --image")
        if not 1 <= self.port <= 65535 or not 0 <= self.front_port <= 65535:
            raise UsageError("ports are 1-65535 (--front-port 0: any free one)")
        if not 1 <= self.probe_timeout_s <= 3600:
            raise UsageError(f"--probe-timeout is 1-3600 s (got {self.probe_timeout_s:g})")
        if self.image and not Path(self.image).is_file():
            raise UsageError(f"image {self.image} does not exist (see `sfmpi image build`)")

    @property
    def command(self) -> str:
        return self.service or default_service(self.port)


def up(home: Path, spec: PoolSpec, overrides: dict, timeout: float = 600.0) -> dict:
    """Start the pool's controller and wait until the pool serves (or failed)."""
    spec.check()
    from sfmpi.client import HostdClient
    from sfmpi.paths import Paths
    HostdClient(Paths(home)).ensure_running()  # the controller never starts hostd itself
    directory = pool_dir(home, spec.name)
    if (directory / "pool.db").is_file():
        db = open_pool(home, spec.name)
        info = db.info()
        if controller_alive(info):
            db.close()
            raise AlreadyExists(f"pool {spec.name} is already up ({info.get('frontend', '')}); "
                                f"`sfmpi pool down {spec.name}` first")
        db.close()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = PoolDb(directory / "pool.db")
    try:
        db.init_params({})
        for key, value in overrides.items():
            db.set_param(key, value)
        db.set_info(name=spec.name, state="starting", error="", frontend="", checkpoint=spec.checkpoint,
                    image=spec.image, service=spec.command, port=spec.port, front_port=spec.front_port,
                    mem_mb=spec.mem_mb, cpus=spec.cpus, workers=spec.workers, own_checkpoint="",
                    probe_timeout_s=spec.probe_timeout_s)
        with open(directory / "controller.log", "ab") as out:
            child = subprocess.Popen([sys.executable, "-m", "sfmpi.cli", "pool", "serve", spec.name],
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                     env=dict(os.environ))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = db.info()
            if info.get("state") == "serving":
                return {"name": spec.name, "frontend": info["frontend"], "checkpoint": info["checkpoint"],
                        "pid": child.pid, "workers": len(db.vms())}
            if info.get("state") == "failed" or child.poll() is not None:
                child.wait(30)
                raise PoolError(f"pool {spec.name} did not come up: "
                                f"{info.get('error') or _tail(directory / 'controller.log')}")
            time.sleep(0.2)
        stop(home, spec.name)
        raise PoolError(f"pool {spec.name} did not come up within {timeout:g} s")
    finally:
        db.close()


def serve(home: Path, name: str, paths) -> None:
    """The controller process (`sfmpi pool serve NAME`, started by up())."""
    from sfmpi.client import HostdClient
    db = open_pool(home, name)
    info = db.info()
    db.set_info(pid=os.getpid())
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stopping.set())
    hostd = HostdClient(paths, autostart=False)
    spec = PoolSpec(name=name, checkpoint=info.get("checkpoint", ""), image=info.get("image", ""),
                    service=info.get("service", ""), port=int(info["port"]), front_port=int(info["front_port"]),
                    mem_mb=int(info["mem_mb"]), cpus=int(info["cpus"]), workers=info.get("workers", "clone"),
                    probe_timeout_s=float(info.get("probe_timeout_s", "120")))
    requests = RequestLog(pool_dir(home, name) / "requests.sock")
    balancer = HAProxy(pool_dir(home, name), f"/run/netns/{paths.netns}", spec.front_port,
                       request_log=requests.path)
    controller = None
    failed = ""
    try:
        _reap_leftovers(db, hostd)
        checkpoint = spec.checkpoint or _warm_checkpoint(db, hostd, spec)
        db.set_info(checkpoint=checkpoint)
        workers = (CloneWorkers(hostd, checkpoint) if spec.workers == "clone" else
                   BootWorkers(hostd, name, spec.image, spec.command, spec.port, spec.mem_mb, spec.cpus,
                               spec.probe_timeout_s))
        controller = Controller(db, balancer.api, workers, hostd, spec.port, requests.drain)
        # The first workers exist before HAProxy starts: their family's network
        # namespace is where HAProxy must run.
        first = db.params()["min_vm_count"]
        db.size_ip_pool(db.params()["max_vm_count"], spec.port)
        launched = workers.launch(first)
        try:
            if spec.checkpoint and launched:
                start_probe(hostd, launched[0].name, spec)
            requests.start()
            balancer.start()
            controller.adopt(launched)
        except BaseException:
            # Not in the database yet, so the controller's shutdown would not see them.
            for worker in launched:
                if worker.name not in {vm["name"] for vm in db.vms()}:
                    workers.stop(worker.name)
            raise
        db.set_info(state="serving", frontend=f"http://127.0.0.1:{balancer.port}/")
        db.event("up", None, f"serving at http://127.0.0.1:{balancer.port}/ with {len(launched)} worker(s)")
        while not stopping.is_set():
            if not balancer.alive():
                raise PoolError(f"HAProxy exited: {balancer.tail()}")
            controller.tick()
            stopping.wait(TICK_S)
    except HostdError as exc:
        failed = f"hostd went away: {exc}"
    except SfmpiError as exc:
        failed = str(exc)
    except Exception as exc:  # the controller's bug: still tear down, and say it
        log.exception("pool %s: controller failed", name)
        failed = f"controller failed: {exc!r}"
    finally:
        db.set_info(state="stopping")
        if controller is not None:
            with contextlib.suppress(SfmpiError):
                controller.shutdown()
        balancer.stop()
        requests.stop()
        if info.get("own_checkpoint") or db.info().get("own_checkpoint"):
            with contextlib.suppress(SfmpiError):
                hostd.call("checkpoint.rm", id=db.info()["checkpoint"])
        db.set_info(state="failed" if failed else "stopped", error=failed, frontend="")
        db.event("down", None, failed or "pool down")
        db.close()
    if failed:
        log.error("pool %s: %s", name, failed)
        sys.exit(1)


def start_probe(hostd, name: str, spec: PoolSpec) -> None:
    """The given checkpoint's service must answer in its first clone."""
    from .workers import probe_argv
    out: list[bytes] = []
    code = hostd.call("vm.exec", name=name, argv=probe_argv(spec.port, spec.probe_timeout_s),
                      on_output=lambda fd, data: out.append(data))["code"]
    if code != 0:
        raise PoolError(f"no service answered on port {spec.port} within {spec.probe_timeout_s:g} s in a clone of "
                        f"{spec.checkpoint}: "
                        f"{b''.join(out).decode().strip()[-300:]}")


def _warm_checkpoint(db: PoolDb, hostd, spec: PoolSpec) -> str:
    """Boot one worker from the image, start its service, wait until it answers
    (warmed by the probe's requests), checkpoint it; the base VM then goes."""
    base = f"{spec.name}-base"
    with contextlib.suppress(SfmpiError):
        hostd.call("vm.stop", name=base)
    hostd.call("vm.start", name=base, image=spec.image, mem_mb=spec.mem_mb, cpus=spec.cpus, timeout=300.0)
    try:
        start_service(hostd, base, spec.command, spec.port, spec.probe_timeout_s)
        ckpt = hostd.call("checkpoint", name=base)
        checkpoint = ckpt["id"]
        db.set_info(own_checkpoint="1", checkpoint=checkpoint)
        db.event("checkpoint", base, f"warm checkpoint {checkpoint}")
        return checkpoint
    finally:
        with contextlib.suppress(SfmpiError):
            hostd.call("vm.stop", name=base)


def _reap_leftovers(db: PoolDb, hostd) -> None:
    """Workers of a controller that was killed: stopped, their rows gone."""
    for vm in db.vms():
        with contextlib.suppress(SfmpiError):
            hostd.call("vm.stop", name=vm["name"])
        db.remove_vm(vm["name"])
    for row in db.ip_pool():
        if row["reserve"]:
            db.release_ip(row["id_ip"])


def stop(home: Path, name: str, timeout: float = 120.0) -> dict:
    """`pool down`: the controller stops its workers and HAProxy; a dead
    controller's leftovers are stopped here."""
    db = open_pool(home, name)
    try:
        info = db.info()
        if controller_alive(info):
            pid = int(info["pid"])
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and controller_alive(db.info()):
                time.sleep(0.2)
            if controller_alive(db.info()):
                os.kill(pid, signal.SIGKILL)
                raise PoolError(f"pool {name}: its controller (pid {pid}) did not stop within {timeout:g} s; killed")
        else:
            from sfmpi.client import HostdClient
            from sfmpi.paths import Paths
            hostd = HostdClient(Paths(home), autostart=False)
            if hostd.running():
                _reap_leftovers(db, hostd)
            if db.info().get("state") not in ("stopped", "failed"):
                db.set_info(state="stopped", frontend="")
        return {"name": name, "state": db.info().get("state")}
    finally:
        db.close()


def stop_all(home: Path) -> list[str]:
    """Every pool with a live controller (`sfmpi down`)."""
    stopped = []
    for name in pool_names(home):
        db = open_pool(home, name)
        alive = controller_alive(db.info())
        db.close()
        if alive:
            stop(home, name)
            stopped.append(name)
    return stopped


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:]) or "(no log)"
    except OSError:
        return "(no log)"
