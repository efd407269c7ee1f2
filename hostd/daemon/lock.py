"""One hostd per state directory: an exclusive flock held for hostd's life."""
from __future__ import annotations

import fcntl
import os

from sfmpi.errors import HostdError
from sfmpi.paths import Paths


class HostLock:
    """One hostd per state directory: an exclusive flock held for hostd's life."""

    def __init__(self, paths: Paths):
        self.path = paths.lock
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode().strip() or "?"
            os.close(fd)
            raise HostdError(f"another hostd (pid {holder}) already runs on state directory "
                             f"{self.path.parent}") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
