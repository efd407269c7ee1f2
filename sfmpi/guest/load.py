"""The guest's load reports (a pool's workers; docs/pool.md): CPU and memory in use.

hostd asks with {"op": "load", "interval": s} (0 stops); the agent then sends
{"ev": "load", "cpu": percent of the guest's CPUs, "ram": bytes in use,
"ram_total": bytes} every interval. Measured in the guest, as the service's own
module did in the design: the host sees only QEMU's process, and under TCG its
CPU time is the emulator's, not the guest's. A clone inherits a running
reporter with the rest of its memory, and simply goes on reporting.
"""
from __future__ import annotations

import threading
from typing import Callable


def cpu_times(text: str) -> tuple[int, int]:
    """(busy, total) jiffies from /proc/stat's first line."""
    fields = [int(x) for x in text.split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user
    return total - idle, total


def mem_used(text: str) -> tuple[int, int]:
    """(used, total) bytes from /proc/meminfo: what is not available to programs."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0]) * 1024
    total = values["MemTotal"]
    return total - values.get("MemAvailable", values.get("MemFree", 0)), total


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


class LoadReporter:
    def __init__(self, send: Callable[[dict], bool]):
        self.send = send
        self.interval = 0.0
        self.changed = threading.Condition()
        self.thread: threading.Thread | None = None

    def set_interval(self, seconds: float) -> None:
        with self.changed:
            self.interval = max(0.0, min(float(seconds), 3600.0))
            self.changed.notify_all()
            if self.interval and self.thread is None:
                self.thread = threading.Thread(target=self._run, daemon=True, name="load-reports")
                self.thread.start()

    def _run(self) -> None:
        last = cpu_times(_read("/proc/stat"))
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.interval > 0)
                self.changed.wait(self.interval)
            now = cpu_times(_read("/proc/stat"))
            busy, total = now[0] - last[0], now[1] - last[1]
            last = now
            used, mem_total = mem_used(_read("/proc/meminfo"))
            if self.interval > 0:
                self.send({"ev": "load", "cpu": round(100.0 * busy / total, 1) if total > 0 else 0.0,
                           "ram": used, "ram_total": mem_total})
