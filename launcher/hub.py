"""sfmpirun's SSH hub: one SSH connection per clone, opened by sfmpirun itself
right after the fork, lent to the real launcher's remote-shell agent.

Hydra's `-launcher-exec` and Open MPI's `plm_rsh_agent` start an agent per
host, called like ssh: `AGENT [opts] HOST COMMAND...`. A Python agent that
imports paramiko and logs in costs seconds per host on a TCG guest's one vCPU
(measured: 3-4 s each, 2 of them the import), every launch. So the agent is a
small C program (native/sfmpirun-agent) that hands its argv and its stdin,
stdout and stderr (SCM_RIGHTS) to this hub over a Unix socket in the job
directory and waits for one line back, the exit status. The hub runs the
command on the clone through the remote shell over the connection it already
holds, relays the three descriptors, and answers.

The connections use the job's key and accept only the pinned host key (the
one the parent's sshd had at the fork, so every clone has it): a host that
shows another key is not one of this job's clones.
"""
from __future__ import annotations

import base64
import contextlib
import getpass
import os
import select
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from . import plan

SOCKET = "hub.sock"
CONNECT_TIMEOUT = 15.0
REQUEST_MAX = 1 << 16       # the agent's argv, NUL-separated (Open MPI's orted line is ~2 KiB)
CHUNK = 32768
# ssh options launchers may pass (-x, -q, ...) are skipped; these take a value, skipped too.
WITH_VALUE = {"-l", "-o", "-p", "-i", "-F"}
NO_STATUS = 255             # what ssh exits with when the connection fails


def split_argv(argv: list[str]) -> tuple[str, list[str], str | None]:
    """(host, command words, user from -l or user@host), as ssh reads them."""
    user = None
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] in WITH_VALUE:
            if argv[i] == "-l" and i + 1 < len(argv):
                user = argv[i + 1]
            i += 2
        else:
            i += 1
    if i >= len(argv) - 1:
        raise ValueError("usage: sfmpirun-agent [ssh options] HOST COMMAND...")
    host = argv[i]
    if "@" in host:
        user, host = host.split("@", 1)
    return host, argv[i + 1:], user


def parse_request(data: bytes) -> list[str]:
    """The agent's argv: each word followed by a NUL."""
    if not data.endswith(b"\0"):
        raise ValueError("truncated request")
    return [w.decode(errors="surrogateescape") for w in data[:-1].split(b"\0")]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class SshHub:
    """Owns the job's SSH connections and the agents' socket, from `start` to `close`."""

    def __init__(self, job_dir: Path, key: Path, host_key: str, port: int = 22,
                 say: Callable[[str], None] = lambda text: None):
        self.say = say    # sfmpirun -v
        self.job_dir = job_dir
        self.path = job_dir / SOCKET
        self.key = key
        self.host_key = host_key
        self.port = port
        self._lock = threading.Lock()
        self._failures: list[str] = []           # of this launch's sessions
        self._connect_failures: list[str] = []   # logins, made once per job
        self._reached: set[str] = set()
        self._connections: dict[tuple[str, str], Future] = {}
        self._clients: set[socket.socket] = set()
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="sfmpirun-ssh")
        self._server: socket.socket | None = None
        self._closed = threading.Event()

    # -- what sfmpirun asks -----------------------------------------------
    def failures(self) -> list[str]:
        with self._lock:
            return self._connect_failures + self._failures

    def reached(self) -> set[str]:
        """Hosts on which the launcher's command started."""
        with self._lock:
            return set(self._reached)

    def forget_launch(self) -> None:
        """A new launch on the same connections: nothing failed or was reached yet
        (a connection that failed stays failed: it is not tried again)."""
        with self._lock:
            self._failures.clear()
            self._reached.clear()

    def start(self, hosts: list[str] | set[str]) -> None:
        """Listen for agents and begin logging in to `hosts` (in the background)."""
        server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server.bind(str(self.path))
        os.chmod(self.path, 0o600)
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept_loop, name="sfmpirun-hub", daemon=True).start()
        for host in sorted(hosts):
            self.connection(host)

    def close(self) -> None:
        self._closed.set()
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
        with self._lock:
            clients, self._clients = list(self._clients), set()
            connections = list(self._connections.values())
        for c in clients:  # the agents' sessions end, the agents exit
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for f in connections:
            if f.done() and f.exception() is None:
                f.result().close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # -- connections ------------------------------------------------------
    def connection(self, host: str, user: str | None = None) -> Future:
        user = user or getpass.getuser()
        with self._lock:
            f = self._connections.get((host, user))
            new = f is None
            if new:
                f = self._connections[(host, user)] = self._pool.submit(self._connect, host, user)
        if new:  # outside the lock: a future already done runs the callback here
            f.add_done_callback(lambda f, host=host: self._note_connect_failure(host, f))
        return f

    def _note_connect_failure(self, host: str, f: Future) -> None:
        if not f.cancelled() and f.exception() is not None:
            exc = f.exception()
            with self._lock:
                self._connect_failures.append(f"{host}: cannot connect over SSH: {type(exc).__name__}: {exc}")

    def _fail(self, host: str, reason: str) -> None:
        with self._lock:
            self._failures.append(f"{host}: {reason}")

    def _connect(self, host: str, user: str):
        import paramiko
        kind, blob = self.host_key.split()[:2]
        if kind != "ssh-ed25519":
            raise ValueError(f"pinned host key of unsupported type {kind}")
        client = paramiko.SSHClient()
        client.get_host_keys().add(host if self.port == 22 else f"[{host}]:{self.port}", kind,
                                   paramiko.Ed25519Key(data=base64.b64decode(blob)))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(host, port=self.port, username=user,
                       pkey=paramiko.Ed25519Key.from_private_key_file(str(self.key)),
                       allow_agent=False, look_for_keys=False, timeout=CONNECT_TIMEOUT,
                       banner_timeout=CONNECT_TIMEOUT, auth_timeout=CONNECT_TIMEOUT)
        self.say(f"hub: logged in to {host}")
        return client

    # -- agents ---------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self._clients.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="sfmpirun-agent", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        fds: list[int] = []
        status = NO_STATUS
        try:
            data, fds, flags, _ = socket.recv_fds(conn, REQUEST_MAX, 3)
            if len(fds) != 3 or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ValueError("the agent sent a malformed request")
            status = self._run(parse_request(data), fds, conn)
        except (OSError, ValueError) as exc:
            if fds:
                with contextlib.suppress(OSError):
                    _write_all(fds[2], f"sfmpirun-agent: {exc}\n".encode())
        finally:
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(OSError):
                conn.send(f"{status}\n".encode())
            with self._lock:
                self._clients.discard(conn)
            conn.close()

    def _run(self, argv: list[str], fds: list[int], conn: socket.socket) -> int:
        host, command, user = split_argv(argv)
        try:
            client = self.connection(host, user).result()
        except Exception as exc:  # any failure to reach the clone ends the job (recorded by the callback)
            _write_all(fds[2], f"sfmpirun-agent: {host}: cannot connect over SSH: {type(exc).__name__}: {exc}\n"
                       .encode())
            return NO_STATUS
        try:
            channel = client.get_transport().open_session()
            channel.exec_command(plan.remote_command(command))
        except Exception as exc:
            self._fail(host, f"connection lost: {type(exc).__name__}: {exc}")
            return NO_STATUS
        with self._lock:
            self._reached.add(host)
        self.say(f"hub: {host}: {plan.remote_command(command)[:100]}")
        try:
            status = _relay(channel, fds, conn)
            self.say(f"hub: {host}: exited {status}")
            return status
        except Exception as exc:
            if not self._closed.is_set():
                self._fail(host, f"connection lost: {type(exc).__name__}: {exc}")
            return NO_STATUS
        finally:
            channel.close()


def _relay(channel, fds: list[int], conn: socket.socket) -> int:
    """Copy between the agent's descriptors and the remote command until it
    exits (its status) or the agent goes away (the launcher killed it)."""
    stdin, stdout, stderr = fds
    watch = [channel, conn, stdin]
    while True:
        ready, _, _ = select.select(watch, [], [], 1.0)
        if conn in ready:
            return NO_STATUS        # the agent is gone: nobody to answer
        if stdin in ready:
            try:
                data = os.read(stdin, CHUNK)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""      # like end of input
            if data:
                channel.sendall(data)
            elif data == b"":
                watch.remove(stdin)
                channel.shutdown_write()
        moved = False
        while channel.recv_ready():
            _write_all(stdout, channel.recv(CHUNK))
            moved = True
        while channel.recv_stderr_ready():
            _write_all(stderr, channel.recv_stderr(CHUNK))
            moved = True
        if channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
            return channel.recv_exit_status()
        if channel.closed and not moved:
            return NO_STATUS
