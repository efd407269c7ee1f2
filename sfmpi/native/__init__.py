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


def _shim(name: str) -> str:
    import importlib.machinery
    from pathlib import Path
    here = Path(__file__).resolve().parent.parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        if (here / f"{name}{suffix}").exists():
            return str(here / f"{name}{suffix}")
    raise LazyMemoryError(f"sfmpi/{name} is not built: run `make native`")


def nothp_path() -> str:
    """The shim preloaded into a served clone's QEMU (native/qemu-nothp/nothp.c)."""
    return _shim("_nothp")


def keepram_path() -> str:
    """The shim that keeps a clone's free page reports off its checkpoint's RAM file
    (native/qemu-keepram/keepram.c)."""
    return _shim("_keepram")
