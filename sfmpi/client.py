"""The CLI's side of the hostd socket (protocol in hostd/server.py).

hostd starts on demand (the embedded default): the first command that needs
it spawns `sfmpi hostd` in the background and waits for its socket.
"""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from typing import Callable

from .errors import HostdError, from_wire
from .paths import Paths

START_TIMEOUT = 30.0


class HostdClient:
    def __init__(self, paths: Paths | None = None, autostart: bool = True):
        self.paths = paths or Paths.from_env()
        self.autostart = autostart

    # -- connection ------------------------------------------------------
    def _connect(self) -> socket.socket | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.paths.socket))
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            return None

    def running(self) -> bool:
        s = self._connect()
        if s is None:
            return False
        s.close()
        return True

    def ensure_running(self) -> None:
        if self.running():
            return
        if not self.autostart:
            raise HostdError(f"hostd is not running on {self.paths.home}")
        self.paths.home.mkdir(parents=True, exist_ok=True)
        with open(self.paths.hostd_log, "ab") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "sfmpi.cli", "hostd"], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, start_new_session=True, env=dict(os.environ),
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.running():
                return
            if child.poll() is not None:
                # Lost a race with another starter? Then its hostd answers soon.
                if self.running():
                    return
                raise HostdError(f"hostd did not start: {_last_line(self.paths.hostd_log)}")
            time.sleep(0.05)
        raise HostdError(f"hostd did not come up in {START_TIMEOUT:.0f} s (log: {self.paths.hostd_log})")

    # -- requests --------------------------------------------------------
    def call(self, op: str, on_output: Callable[[int, bytes], None] | None = None, **args):
        self.ensure_running()
        s = self._connect()
        if s is None:
            raise HostdError(f"hostd on {self.paths.home} went away")
        with s, s.makefile("rb") as replies:
            try:
                s.sendall((json.dumps({"op": op, "args": args}) + "\n").encode())
                for line in replies:
                    msg = json.loads(line)
                    if "out" in msg:
                        if on_output is not None:
                            on_output(int(msg["out"]), base64.b64decode(msg["data"]))
                        continue
                    if "error" in msg:
                        raise from_wire(msg["error"]["type"], msg["error"]["message"])
                    return msg["ok"]
            except (ConnectionResetError, BrokenPipeError) as exc:
                # A hostd that stops meanwhile (signalled by a scheduler while a job's
                # runner asks it to go down) resets the connection: one of our errors, not an OSError.
                raise HostdError(f"hostd on {self.paths.home} went away during {op} ({exc.strerror})") from None
        raise HostdError(f"hostd on {self.paths.home} closed the connection during {op} "
                         f"(see {self.paths.hostd_log})")


def wait_gone(pid: int, timeout: float = 15.0) -> bool:
    """Wait for a process to end; a zombie (dead, not yet reaped) counts as ended."""
    import psutil
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _last_line(path) -> str:
    try:
        lines = [l for l in open(path, errors="replace").read().splitlines() if l.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "no log"
