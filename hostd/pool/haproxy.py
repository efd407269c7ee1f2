"""HAProxy, the pool's balancer: its configuration, its process, its runtime API.

Why HAProxy runs inside hostd's network namespace with its front end's socket
passed in: dynamic servers (`add server`) do not take the `namespace` keyword
(HAProxy 2.6: "'namespace' option is not accepted for dynamic server",
measured), so to reach workers on a family's bridge HAProxy must live where the
bridge is. The listening socket on the host's loopback is made here, in the
host's namespace, and handed over as `bind fd@N`: clients connect to
127.0.0.1:PORT, and every packet to a worker stays inside sfmpi's namespace.

`balance first` with a per-server maxconn makes "a free VM" HAProxy's own
notion: a request goes to the first worker with a free slot, or waits in the
backend's queue (qcur in `show stat`), which is the controller's signal to
clone. Dynamic servers start in maintenance; the controller readies them.
"""
from __future__ import annotations

import contextlib
import csv
import ctypes
import io
import logging
import signal
import socket
import subprocess
import time
from pathlib import Path

from sfmpi.errors import PoolError, UsageError

from .latency import LOG_FORMAT, MAX_DATAGRAM

log = logging.getLogger("sfmpi.pool.haproxy")
BACKEND = "workers"
FRONTEND = "front"
PR_SET_PDEATHSIG = 1


def haproxy_config(api_socket: Path, listen_fd: int, queue_timeout_s: float = 60.0,
                   request_log: Path | None = None) -> str:
    """The whole configuration (pure). Workers are added at run time.
    request_log: the datagram socket each request's time goes to (latency.py)."""
    log_global = log_defaults = ""
    if request_log is not None:
        log_global = f"\n    log {request_log} len {MAX_DATAGRAM} format raw local0 info"
        log_defaults = f'\n    log global\n    log-format "{LOG_FORMAT}"'
    return f"""\
global
    stats socket {api_socket} mode 600 level admin
    maxconn 4096{log_global}

defaults
    mode http{log_defaults}
    timeout connect 3s
    timeout client 120s
    timeout server 120s
    # A request that finds no free worker waits this long for one (a new clone included).
    timeout queue {queue_timeout_s:g}s
    retries 3
    option redispatch

frontend {FRONTEND}
    bind fd@{listen_fd}
    default_backend {BACKEND}

backend {BACKEND}
    balance first
"""


def haproxy_argv(config: Path, netns_path: str) -> list[str]:
    return ["nsenter", f"--net={netns_path}", "--", "haproxy", "-f", str(config), "-db"]


def listen_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"pool front end: cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None
    sock.listen(1024)
    return sock


def _die_with_parent() -> None:
    # HAProxy must not outlive a controller that was SIGKILLed (the pool's
    # front end would answer 503 for a pool nobody runs).
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class HAProxy:
    """The balancer process of one pool (start, stop safe twice, context manager)."""

    def __init__(self, workdir: Path, netns_path: str, port: int, queue_timeout_s: float = 60.0,
                 request_log: Path | None = None):
        self.workdir = Path(workdir)
        self.request_log = request_log
        self.netns_path = netns_path
        self.port = port
        self.queue_timeout_s = queue_timeout_s
        self.config = self.workdir / "haproxy.cfg"
        self.api_socket = self.workdir / "haproxy.sock"
        self.log_path = self.workdir / "haproxy.log"
        self.proc: subprocess.Popen | None = None
        self.api = RuntimeApi(self.api_socket)

    def start(self, timeout: float = 10.0) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.api_socket.unlink()
        sock = listen_socket(self.port)
        self.port = sock.getsockname()[1]
        try:
            # The child keeps the socket under the same number (pass_fds).
            self.config.write_text(haproxy_config(self.api_socket, sock.fileno(), self.queue_timeout_s,
                                                   self.request_log))
            argv = haproxy_argv(self.config, self.netns_path)
            log.info("starting %s", " ".join(argv))
            with open(self.log_path, "ab") as out:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                             pass_fds=(sock.fileno(),), preexec_fn=_die_with_parent)
        finally:
            sock.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PoolError(f"HAProxy exited at start: {self.tail()}")
            with contextlib.suppress(OSError):
                self.api.command("show info")
                return
            time.sleep(0.1)
        self.stop()
        raise PoolError(f"HAProxy's runtime API did not answer within {timeout:g} s: {self.tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        with contextlib.suppress(FileNotFoundError):
            self.api_socket.unlink()

    def __enter__(self) -> "HAProxy":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class RuntimeApi:
    """HAProxy's runtime API over its Unix socket, one command per connection."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def command(self, text: str, timeout: float = 5.0) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.path))
            s.sendall(text.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace").strip()

    def _checked(self, text: str, ok: tuple[str, ...] = ("",)) -> str:
        out = self.command(text)
        if not any(out.startswith(prefix) for prefix in ok):
            raise PoolError(f"HAProxy refused `{text}`: {out.splitlines()[0] if out else '(no answer)'}")
        return out

    def add_server(self, name: str, address: str, port: int, maxconn: int) -> None:
        self._checked(f"add server {BACKEND}/{name} {address}:{port} maxconn {maxconn}",
                      ok=("New server registered",))

    def set_state(self, name: str, state: str) -> None:
        if state not in ("ready", "drain", "maint"):
            raise ValueError(state)
        self._checked(f"set server {BACKEND}/{name} state {state}")

    def set_maxconn(self, name: str, maxconn: int) -> None:
        self._checked(f"set maxconn server {BACKEND}/{name} {maxconn}")

    def shutdown_sessions(self, name: str) -> None:
        self._checked(f"shutdown sessions server {BACKEND}/{name}")

    def del_server(self, name: str) -> None:
        self._checked(f"del server {BACKEND}/{name}", ok=("Server deleted",))

    def stat(self) -> dict[str, dict]:
        """`show stat` of the backend: its row under "BACKEND", one per server under its name."""
        text = self.command("show stat").lstrip("# ")
        rows = {}
        for row in csv.DictReader(io.StringIO(text)):
            if row.get("pxname") == BACKEND:
                rows[row["svname"]] = row
        return rows
