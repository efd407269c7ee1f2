"""hostd: the per-host daemon. Serves the sfmpi CLI on a Unix socket.

Protocol: the client sends one JSON request line {"op": ..., "args": {...}}.
hostd answers with zero or more {"out": fd, "data": base64} lines (vm.exec
only) and then exactly one {"ok": result} or {"error": {"type", "message"}}.

Why JSON lines on a Unix socket rather than an HTTP framework: the only peers
are the CLI and the guest-facing parts of hostd on the same host, the socket's
file mode is the access control, and streaming exec output needs nothing more.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import socket
import struct

from sfmpi.errors import HostdError, SfmpiError, UsageError
from sfmpi.paths import Paths

from ..memory.options import ServedOptions
from ..policy.admission import Budget
from ..state.store import Store
from ..cluster.config import ClusterConfig
from ..cluster.spanning import Membership
from ..monitor.export import MetricsServer, exposition, metrics_port_from_env
from .host import Host
from .lock import HostLock

log = logging.getLogger("sfmpi.hostd")
PROTOCOL_VERSION = 1
# A client has this long to send its one request line (then it is dropped).
REQUEST_TIMEOUT = float(os.environ.get("SFMPI_REQUEST_TIMEOUT", "30"))
MAX_REQUEST = 1 << 20


def peer_uid(writer: asyncio.StreamWriter) -> int:
    sock = writer.get_extra_info("socket")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class Hostd:
    def __init__(self, paths: Paths, budget: Budget, stop_vms_on_signal: bool = False,
                 metrics_port: int | None = None):
        self.paths = paths
        self.metrics_port = metrics_port   # None: SFMPI_METRICS_PORT decides
        self.budget = budget
        # A batch job's hostd (jobs/runner.py): the scheduler ends a job by
        # signalling its processes, and the job's VMs must end with it. A
        # standalone hostd leaves them running for the next one to re-attach.
        self.stop_vms_on_signal = stop_vms_on_signal
        self.signalled = False
        self.lock = HostLock(paths)
        self.host: Host | None = None
        self.shutdown = asyncio.Event()

    async def run(self) -> None:
        # Everything hostd and its QEMUs create (state, RAM files, checkpoints,
        # sockets) is the owner's only: guest RAM and disks are other people's data.
        os.umask(0o077)
        self.lock.acquire()
        try:
            self.paths.ensure()
            store = Store(self.paths.db)
            cluster = ClusterConfig.from_env()
            self.host = Host(self.paths, store, self.budget, cluster)
            recovered = await self.host.recover()
            if recovered["attached"] or recovered["reaped"]:
                log.info("recovered: attached %s, reaped %s", recovered["attached"], recovered["reaped"])
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.paths.socket)
            server = await asyncio.start_unix_server(self._handle, path=str(self.paths.socket), limit=MAX_REQUEST)
            os.chmod(self.paths.socket, 0o600)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.add_signal_handler(sig, self._on_signal, sig)
            log.info("hostd %d serving %s (budget %d MiB, %d vCPUs)", os.getpid(), self.paths.socket,
                     self.budget.mem_mb, self.budget.vcpus)
            self.host.sampling.start()
            self.host.control.start()
            metrics = None
            metrics_port = self.metrics_port if self.metrics_port is not None else metrics_port_from_env()
            if metrics_port:
                metrics = MetricsServer(metrics_port, self.host.sampling.latest_samples).start()
                log.info("Prometheus metrics on http://127.0.0.1:%d/metrics", metrics.port)
            membership = None
            if self.host.span is not None:
                # A host of a cluster: the peer listener, and heartbeats to the master.
                membership = Membership(self.host.span, self.host.usage, self.budget, self.host.list_vms,
                                        self.host.sampling.latest_samples, self.host.resources.set)
                await membership.start()
            async with server:
                await self.shutdown.wait()
            if self.signalled and self.stop_vms_on_signal:
                stopped = await self.host.down()
                log.info("signalled: stopped %s", ", ".join(stopped["stopped"]) or "no VM")
            if membership is not None:
                await membership.stop()
            await self.host.control.stop()
            await self.host.sampling.stop()
            await self.host.driver.close(down=False)   # libvirtd runs on with the VMs kept
            if metrics is not None:
                metrics.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.paths.socket)
            self.host.sampling.history.close()
            store.close()
        finally:
            self.lock.release()

    def _on_signal(self, sig: int) -> None:
        log.info("hostd %d: %s", os.getpid(), signal.Signals(sig).name)
        self.signalled = True
        self.shutdown.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send(msg: dict) -> None:
            writer.write((json.dumps(msg) + "\n").encode())
            await writer.drain()

        op = None
        try:
            # The socket is 0600, and the kernel says who connected: only hostd's
            # own user (or root) may drive it, whatever the file mode became.
            uid = peer_uid(writer)
            if uid not in (0, os.geteuid()):
                log.warning("refused a control connection from uid %d", uid)
                raise HostdError(f"uid {uid} may not use this hostd")
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
            except asyncio.TimeoutError:
                raise UsageError(f"no request within {REQUEST_TIMEOUT:.0f} s") from None
            except ValueError:
                raise UsageError(f"request longer than {MAX_REQUEST} bytes") from None
            try:
                req = json.loads(line)
                op, args = req["op"], req.get("args") or {}
            except (ValueError, KeyError, TypeError):
                raise UsageError("malformed request to hostd")
            try:
                result = await self._dispatch(op, args, send, reader)
            except KeyError as exc:
                raise UsageError(f"hostd: {op} needs the argument {exc.args[0]!r}") from None
            await send({"ok": result})
        except SfmpiError as exc:
            with contextlib.suppress(Exception):
                await send({"error": {"type": type(exc).__name__, "message": str(exc)}})
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # a bug: report it rather than hang the client
            log.exception("hostd: internal error")
            with contextlib.suppress(Exception):
                await send({"error": {"type": "SfmpiError", "message": f"hostd internal error: {exc!r}"}})
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        if op == "down":
            self.shutdown.set()

    async def _dispatch(self, op: str, args: dict, send, reader: asyncio.StreamReader):
        m = self.host
        if op == "ping":
            used, (held_mb, held_cpus) = m.usage(), m.tickets.reserved()
            return {"pid": os.getpid(), "home": str(self.paths.home), "protocol": PROTOCOL_VERSION,
                    "budget": {"mem_mb": self.budget.mem_mb, "vcpus": self.budget.vcpus},
                    "used": {"mem_mb": used.mem_mb, "vcpus": used.vcpus},
                    "reserved": {"mem_mb": held_mb, "vcpus": held_cpus}}
        if op == "vm.start":
            return await m.start_vm(args["name"], args["image"], mem_mb=int(args.get("mem_mb", 512)),
                                    cpus=int(args.get("cpus", 1)), accel=args.get("accel"),
                                    timeout=float(args.get("timeout", 300)), nat=args.get("nat", False),
                                    open_ports=args.get("open_ports", []),
                                    ram_backing=args.get("ram_backing", "auto"),
                                    free_page_reporting=args.get("free_page_reporting", True) is True)
        if op == "vm.stop":
            return await m.stop_vm(args["name"])
        if op == "vm.list":
            return m.list_vms()
        if op == "vm.exec":
            async def sink(fd: int, data: bytes) -> None:
                await send({"out": fd, "data": base64.b64encode(data).decode()})

            job = asyncio.ensure_future(m.exec(args["name"], list(args["argv"]), sink,
                                               args.get("env"), args.get("cwd")))
            # The client hanging up (Ctrl-C) ends the guest command too.
            gone = asyncio.ensure_future(reader.read())
            done, _ = await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
            if job not in done:
                job.cancel()
                with contextlib.suppress(BaseException):
                    await job
                raise ConnectionError("client went away")
            gone.cancel()
            return {"code": job.result()}
        if op == "vm.set":
            if not isinstance(args["settings"], dict):
                raise UsageError("vm.set: settings must be an object")
            return await m.resources.set(str(args["name"]), args["settings"])
        if op == "vm.report_load":
            return await m.runtime.report_load(list(args["names"]), args.get("interval", 1.0))
        if op == "vm.loads":
            return m.runtime.loads()
        if op == "checkpoint":
            return await m.checkpoint(args["name"], args.get("mode"), args.get("keep"))
        if op == "checkpoint.list":
            return m.checkpoint_list()
        if op == "checkpoint.rm":
            return m.checkpoint_remove(args["id"])
        if op == "clone":
            return await m.clone(args["checkpoint"], int(args["n"]), bool(args.get("allow_fewer")),
                                 str(args.get("memory") or "local"), args.get("policy"),
                                 ServedOptions.from_json(args.get("served")))
        if op == "stats":
            return m.stats()
        if op == "control.add":
            params = args.get("params") or {}
            if not isinstance(params, dict):
                raise UsageError("control.add: params must be an object")
            return await m.control.add(str(args["name"]), args["class"], args.get("target"),
                                       str(args.get("group") or "default"), params)
        if op == "control.rm":
            return await m.control.remove(str(args["name"]))
        if op == "control.list":
            return m.control.list()
        if op == "control.log":
            since = args.get("since", 0.0)
            if isinstance(since, bool) or not isinstance(since, (int, float)):
                raise UsageError(f"--since must be a time (got {since!r})")
            return m.control.steps(str(args.get("group") or "default"), float(since))
        if op == "stats.vm":
            return m.vm_stats(str(args["name"]), args.get("since", 0.0), _count(args.get("last")))
        if op == "stats.latest":
            return m.sampling.latest_samples()
        if op == "stats.metrics":
            return {"text": exposition(m.sampling.latest_samples).decode()}
        if op == "down":
            return await m.down()
        if op == "shutdown":
            # Leave VMs running: a new hostd re-attaches to them.
            self.shutdown.set()
            return {"pid": os.getpid()}
        raise UsageError(f"hostd does not know the operation {op!r}")


def _count(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100_000:
        raise UsageError(f"a sample count must be 1-100000 (got {value!r})")
    return value


def serve(paths: Paths, budget: Budget, stop_vms_on_signal: bool = False, metrics_port: int | None = None) -> None:
    asyncio.run(Hostd(paths, budget, stop_vms_on_signal, metrics_port).run())
