"""A hugetlbfs of 2 MiB pages for a test or a benchmark, given back afterwards.

Hosts here have no huge pages reserved: this reserves some more
(vm.nr_hugepages), mounts a hugetlbfs on a temporary directory, and on exit
unmounts it and restores the reservation. Shared by the tests and bench/fork.py.
"""
from __future__ import annotations

import contextlib
import subprocess
import tempfile
from pathlib import Path

NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")


@contextlib.contextmanager
def hugetlbfs(extra_pages: int):
    before = int(NR_HUGEPAGES.read_text())
    want = before + extra_pages
    NR_HUGEPAGES.write_text(f"{want}\n")
    mount = Path(tempfile.mkdtemp(prefix="sfmpi-huge-", dir="/tmp"))
    try:
        got = int(NR_HUGEPAGES.read_text())
        if got != want:
            raise RuntimeError(f"the kernel reserved {got - before} of {extra_pages} huge pages asked for")
        subprocess.run(["mount", "-t", "hugetlbfs", "-o", "pagesize=2M", "none", str(mount)], check=True)
        try:
            yield mount
        finally:
            subprocess.run(["umount", str(mount)], check=True)
    finally:
        mount.rmdir()
        NR_HUGEPAGES.write_text(f"{before}\n")
