"""The parent's line to each clone's copy of sfmpirun.

The listening socket is opened before the fork, so every clone has it too,
bound to the same port on its own address. After the fork the clone's copy of
sfmpirun waits on it for one word from the parent, the status to exit with,
and then calls sfmpi.exit(): the clone ends when the job ends, not before
(the ranks run in it) and not after.

Any process of the family could reach that port; only the parent knows the
key made with the socket, before the fork (family_auth). A connection that
fails the handshake is refused and the clone goes on waiting for its parent,
so no one else can end a clone or hand it an exit status.
"""
from __future__ import annotations

import contextlib
import socket
import sys
import time

from sfmpi import family_auth
from sfmpi.errors import LaunchError

# A clone whose parent never calls (sfmpirun killed between fork and connect)
# gives up after this long; hostd's ticket timeout is the backstop.
CLONE_WAIT = 3600.0
NO_WORD = 255


def _log(text: str) -> None:
    sys.stderr.write(f"sfmpirun: {text}\n")
    sys.stderr.flush()


def listen() -> family_auth.AuthListener:
    """The control port and its key. Call it before the fork."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 0))
    s.listen(8)
    return family_auth.AuthListener(s, family_auth.new_key(), log=_log)


def wait_for_exit_word(listener: family_auth.AuthListener, timeout: float = CLONE_WAIT) -> int:
    """In a clone: the status the parent sends, or NO_WORD if it never does."""
    try:
        conn = listener.accept(timeout)
    except OSError:
        return NO_WORD
    with conn:
        data = b""
        while not data.endswith(b"\n"):
            chunk = conn.recv(64)
            if not chunk:
                return NO_WORD
            data += chunk
    try:
        return int(data.split()[-1]) & 255
    except (ValueError, IndexError):
        return NO_WORD


class CloneLines:
    """The parent's open connections, one per clone, by clone ID."""

    def __init__(self):
        self.conns: dict[int, socket.socket] = {}

    def connect(self, clone_id: int, ip: str, port: int, authkey: bytes, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.conns[clone_id] = family_auth.connect((ip, port), authkey, timeout=5.0)
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise LaunchError(f"clone {clone_id} ({ip}) does not answer sfmpirun's control port: {exc}")
                time.sleep(0.1)

    def send_exit(self, status: int) -> None:
        for conn in self.conns.values():
            with contextlib.suppress(OSError):
                conn.sendall(f"exit {status & 255}\n".encode())
        self.close()

    def close(self) -> None:
        for conn in self.conns.values():
            with contextlib.suppress(OSError):
                conn.close()
        self.conns.clear()
