"""What an sfmpi test run must leave behind on the host: nothing running, nothing mounted.

Shared by the integration tests and the benchmarks.
"""
from __future__ import annotations

from pathlib import Path

import psutil


def leaks(home: Path, shm: Path) -> list[str]:
    found = []
    for p in psutil.process_iter(["pid", "name", "cmdline", "status"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue  # already dead, only not yet reaped by its parent
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "qemu-system" in (p.info["name"] or "") and str(shm) in cmd:
            found.append(f"QEMU process {p.info['pid']}: {cmd[:120]}")
        if "sfmpi.cli hostd" in cmd and p.info["pid"] and _env_home(p) == str(home):
            found.append(f"hostd process {p.info['pid']}")
    if shm.exists() and any(shm.iterdir()):
        found.append(f"tmpfs files left: {sorted(x.name for x in shm.iterdir())}")
    for line in Path("/proc/mounts").read_text().splitlines():
        if str(home) in line or str(shm) in line:
            found.append(f"mount left: {line}")
    if (home / "hostd.sock").exists():
        found.append("hostd socket left")
    return found


def _env_home(p: psutil.Process) -> str | None:
    try:
        return p.environ().get("SFMPI_HOME")
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
