"""Choose the accelerator: KVM if a probe guest really boots under it, else TCG.

The presence of /dev/kvm proves nothing: on PVM hosts it exists but a stock
guest kernel hangs early in boot (docs/platform.md). So boot the image's own kernel
under KVM until it looks for init; if it gets there in time, KVM works. The
answer is cached per boot of the host and per kernel.
"""
from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import time
from pathlib import Path

from .cmdline import probe_argv

log = logging.getLogger("sfmpi.hostd.accel")

# Lines a kernel prints only once it has run its whole early boot.
BOOT_MARKERS = (b"Kernel panic", b"Failed to execute /sfmpi-accel-probe", b"Run /", b"VFS:")
PROBE_TIMEOUT = 8.0


def kvm_boots(kernel: str, initrd: str, timeout: float = PROBE_TIMEOUT) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    argv = probe_argv("kvm", kernel, initrd)
    log.debug("accel probe: %s", " ".join(argv))
    # Not proc.run: we read the console while the guest runs and stop it early.
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([p.stdout], [], [], 0.2)
            if r:
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    break
                seen += chunk
                if any(m in seen for m in BOOT_MARKERS):
                    return True
        return False
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def choose(kernel: str, initrd: str, cache: Path, override: str | None = None) -> str:
    override = override or os.environ.get("SFMPI_ACCEL")
    if override:
        if override not in ("kvm", "tcg"):
            from sfmpi.errors import UsageError
            raise UsageError(f"--accel must be kvm or tcg, not {override!r}")
        return override
    key = {"boot_id": boot_id(), "kernel": kernel}
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached["accel"]
    except (OSError, ValueError):
        pass
    accel = "kvm" if kvm_boots(kernel, initrd) else "tcg"
    log.info("accelerator probe: %s", accel)
    cache.write_text(json.dumps({"key": key, "accel": accel}))
    return accel
