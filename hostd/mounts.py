"""Mount points as this process's mount namespace sees them."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


def mounted(path: Path) -> bool:
    """Is `path` a mount point here (field 5 of /proc/self/mountinfo)?"""
    target = os.path.realpath(path)
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)
    return False
