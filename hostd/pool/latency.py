"""Each request's response time, from HAProxy's own log, for a pool's percentiles.

Why the log: HAProxy's statistics (`show stat`) give only averages (rtime and
ttime over the last 1024 requests); a p95 needs every request's time. HAProxy
logs each request as it ends; the pool's configuration (haproxy.py) makes that
line just "%Ta %ST" (the request's total active time in ms, from its first
byte in to its last byte out, queueing included, and its HTTP status) and
sends it to a Unix datagram socket that this module owns. A reader thread
empties the socket at once, since the kernel queues only
net.unix.max_dgram_qlen (10 here) datagrams and HAProxy drops a log line that
does not fit (it counts them: DroppedLogs in `show info`). The controller
moves what was read into the pool's database on each tick (db.add_requests).
"""
from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections import deque
from pathlib import Path

# HAProxy's log-format for the pool's requests: what parse_line reads.
LOG_FORMAT = "%Ta %ST"
MAX_DATAGRAM = 512
# Requests not yet moved to the database; beyond this the oldest go (a tick that never comes).
MAX_PENDING = 100_000


def parse_line(data: bytes) -> tuple[int, int] | None:
    """b'12 200\\n' -> (12, 200); anything else (a truncated or foreign line) -> None."""
    parts = data.split()
    if len(parts) != 2 or not all(p.lstrip(b"-").isdigit() for p in parts):
        return None
    ms, status = int(parts[0]), int(parts[1])
    if not 0 <= ms <= 86_400_000 or not -1 <= status <= 999:
        return None
    return ms, status


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by nearest rank: a value some request really took."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return float(ordered[rank - 1])


class RequestLog:
    """The Unix datagram socket HAProxy logs each request to, and its reader thread."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.sock: socket.socket | None = None
        self.pending: deque[tuple[int, int, int]] = deque(maxlen=MAX_PENDING)   # (at ms, ms, status)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)     # so that stop() is noticed
        self._thread = threading.Thread(target=self._read, name="pool-request-log", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.sock is not None
        while not self._stop.is_set():
            try:
                data = self.sock.recv(MAX_DATAGRAM)
            except socket.timeout:
                continue
            except OSError:
                return
            parsed = parse_line(data)
            if parsed is not None:   # a truncated or foreign line is dropped
                self.pending.append((int(time.time() * 1000), *parsed))

    def drain(self) -> list[tuple[int, int, int]]:
        """What arrived since the last drain: (at ms, response ms, status) per request."""
        out = []
        while self.pending:
            out.append(self.pending.popleft())
        return out

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> "RequestLog":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
