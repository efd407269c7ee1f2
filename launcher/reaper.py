"""The job's session ends even when sfmpirun is killed outright.

mpiexec runs in a session of its own with a parent-death SIGTERM, but a
SIGTERM is a request: Open MPI's mpirun, told to stop while its remote
daemons vanish with their clones, was seen to wait for them for minutes.
So a reaper, forked from sfmpirun before mpiexec starts, waits for sfmpirun
to end (the pipe between them closes, however it ends) and then ends the
session: SIGTERM, a grace, SIGKILL. A fork, not a new Python: no start-up
cost inside a guest that runs under emulation.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Callable


def session_members(sid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) == sid:
                out.append(int(entry))
        except (ProcessLookupError, PermissionError):
            continue
    return out


def end_session(sid: int, grace: float, reap: Callable[[], None] = lambda: None) -> None:
    """SIGTERM to every process of session `sid`, SIGKILL to what is left after `grace`."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in session_members(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            reap()
            if not session_members(sid):
                return
            time.sleep(0.1)


class SessionReaper:
    """States: forked (waiting for the session's id) -> watching -> done."""

    def __init__(self, grace: float):
        self.grace = grace
        self._pid: int | None = None
        self._w: int | None = None

    def fork(self) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                       # the reaper
            try:
                os.close(w)
                self._become_reaper(r)
            finally:
                os._exit(0)
        os.close(r)
        self._pid, self._w = pid, w

    def watch(self, sid: int) -> None:
        """The session to end once sfmpirun is gone."""
        assert self._w is not None
        os.write(self._w, f"{sid}\n".encode())

    def release(self) -> None:
        """sfmpirun ends by itself: the reaper finds the session empty (or ends
        what is left of it) and exits; wait for it."""
        if self._w is None:
            return
        os.close(self._w)
        self._w = None
        if self._pid is not None:
            try:
                os.waitpid(self._pid, 0)
            except ChildProcessError:
                pass
            self._pid = None

    def _become_reaper(self, r: int) -> None:
        # Hold nothing of sfmpirun's: the clones' control lines must close when it dies.
        os.closerange(3, r)
        os.closerange(r + 1, os.sysconf("SC_OPEN_MAX"))
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        _name_me(b"sfmpirun-reaper")                              # what ps -o comm shows
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):   # sfmpirun's to handle
            signal.signal(sig, signal.SIG_IGN)
        data = b""
        while chunk := os.read(r, 64):
            data += chunk
        if data.strip().isdigit():
            end_session(int(data.strip()), self.grace)


PR_SET_NAME = 15


def _name_me(name: bytes) -> None:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]))
