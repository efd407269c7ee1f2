"""Each lab host's RAM directory is a tmpfs of its own, as a real host's
/dev/shm is: its size is that host's, so one host filling its RAM directory
does not take another's room (on one shared /dev/shm they would all see the
machine's). Made before the host's hostd starts, removed after it stopped.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from sfmpi import proc
from sfmpi.errors import HostdError

log = logging.getLogger("sfmpi.lab")


def mount_argv(path: Path, size_mb: int, host: str) -> list[str]:
    """Pure: the tmpfs of lab host `host`, private to root like hostd's own RAM directory."""
    return ["mount", "-t", "tmpfs", "-o", f"size={size_mb}M,mode=0700,nosuid,nodev", f"sfmpi-lab-{host}",
            str(path)]


def mounted(path: Path) -> bool:
    target = str(path)
    return any(line.split()[1] == target for line in Path("/proc/mounts").read_text().splitlines()
               if len(line.split()) > 1)


def make(path: Path, size_mb: int, host: str) -> None:
    if mounted(path):
        return
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        proc.run(mount_argv(path, size_mb, host))
    except Exception as exc:
        raise HostdError(f"lab host {host}: cannot mount its RAM directory {path}: {exc}") from exc


def remove(path: Path) -> None:
    """Unmount and remove (safe twice). A mount still busy is detached (-l):
    whatever holds it is gone with its host's hostd a moment later."""
    if mounted(path):
        done = proc.run(["umount", str(path)], check=False)
        if done.returncode != 0:
            log.warning("lab RAM directory %s busy (%s): detached", path,
                        done.stderr.decode(errors="replace").strip())
            proc.run(["umount", "-l", str(path)], check=False)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("lab RAM directory %s not removed: %s", path, exc)
