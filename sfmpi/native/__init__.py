"""sfmpi's C extension, sfmpi._native (native/memory/), loaded on first use.

The CLI's --help, the job scripts and the unit tests that do not serve memory
run without it; what needs it gets one clear error when it is not built.
"""
from __future__ import annotations

from types import ModuleType

from sfmpi.errors import LazyMemoryError


def load() -> ModuleType:
    try:
        from sfmpi import _native
    except ImportError as exc:
        raise LazyMemoryError(f"the extension sfmpi._native is not built ({exc}): run `make native` "
                              "(it needs gcc and libfuse3-dev)") from None
    return _native
