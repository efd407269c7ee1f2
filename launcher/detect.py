"""--mpi auto: which MPI a program is linked against.

MPICH and Open MPI install side by side in the image and are not ABI
compatible, so the launcher must match the library the program loads: MPICH's
is libmpich.so.12 on Debian, Open MPI's libmpi.so.40. Python programs are
judged by the mpi4py extension they would import.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

from sfmpi.errors import UsageError

PYTHONS = ("python", "python3")


def flavour_of_libraries(ldd_output: str) -> str | None:
    """From `ldd` output: mpich, openmpi or None (not an MPI program)."""
    names = {line.split()[0] for line in ldd_output.splitlines() if line.strip()}
    if any(n.startswith(("libmpich.so", "libmpichcxx.so", "libmpichfort.so")) for n in names):
        return "mpich"
    if any(n.startswith(("libmpi.so.4", "libopen-rte.so", "libopen-pal.so")) for n in names):
        return "openmpi"
    if any(n.startswith("libmpi.so.12") for n in names):  # MPICH's upstream soname
        return "mpich"
    return None


def program_of(launcher_args: tuple[str, ...]) -> str | None:
    """The first word that names an executable: the program (options before it
    belong to the real launcher)."""
    for word in launcher_args:
        if word.startswith("-"):
            continue
        if shutil.which(word) or (os.path.sep in word and Path(word).is_file()):
            return word
    return None


def _ldd(path: str) -> str:
    p = subprocess.run(["ldd", path], capture_output=True, text=True)
    return p.stdout if p.returncode == 0 else ""


def _mpi4py_extension() -> str | None:
    spec = importlib.util.find_spec("mpi4py")
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        for ext in sorted(Path(d).glob("MPI*.so")):
            return str(ext)
    return None


def _is_python(path: str) -> bool:
    if Path(path).name.startswith(PYTHONS):
        return True
    try:
        with open(path, "rb") as f:
            first = f.readline(200)
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" in first


def detect(launcher_args: tuple[str, ...]) -> str:
    program = program_of(launcher_args)
    if program is None:
        raise UsageError(f"--mpi auto: no executable program among {' '.join(launcher_args)!r}; "
                         "give its path or --mpi mpich|openmpi")
    path = shutil.which(program) or program
    if _is_python(path):
        ext = _mpi4py_extension()
        flavour = flavour_of_libraries(_ldd(ext)) if ext else None
        if flavour is None:
            raise UsageError("--mpi auto: a Python program, but mpi4py is not installed here; "
                             "give --mpi mpich|openmpi")
        return flavour
    flavour = flavour_of_libraries(_ldd(path))
    if flavour is None:
        raise UsageError(f"--mpi auto: {program} is not linked against MPICH or Open MPI; "
                         "give --mpi mpich|openmpi")
    return flavour
