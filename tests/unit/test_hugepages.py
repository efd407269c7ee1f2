"""Where a parent's RAM goes: the choice between hugetlbfs and tmpfs (no VM)."""
from __future__ import annotations

from pathlib import Path

import pytest

from sfmpi.errors import UsageError
from sfmpi.hostd.vm.hugepages import Pool, default_page_kb, mounts_2m, ram_dir

MOUNTS = """\
sysfs /sys sysfs rw,nosuspend 0 0
hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0
none /mnt/giant hugetlbfs rw,relatime,pagesize=1024M 0 0
none /mnt/plain hugetlbfs rw,relatime 0 0
tmpfs /dev/shm tmpfs rw 0 0
"""
SHM = Path("/dev/shm/sfmpi-x")


def test_only_2m_hugetlbfs_mounts_count():
    assert mounts_2m(MOUNTS, 2048) == ["/dev/hugepages", "/mnt/plain"]
    # A mount without pagesize= has the system default size.
    assert mounts_2m(MOUNTS, 1048576) == ["/dev/hugepages"]
    assert mounts_2m("tmpfs /dev/shm tmpfs rw 0 0\n", 2048) == []


def test_default_page_size_from_meminfo():
    assert default_page_kb("MemTotal: 1 kB\nHugepagesize:       2048 kB\n") == 2048
    assert default_page_kb("MemTotal: 1 kB\n") == 0


def test_auto_uses_huge_pages_only_when_they_fit():
    pool = Pool(mount="/dev/hugepages", free_pages=256)
    assert ram_dir("auto", 512, SHM, pool) == (Path("/dev/hugepages"), "hugepages")
    assert ram_dir("auto", 1024, SHM, pool) == (SHM, "tmpfs")      # 512 pages needed
    assert ram_dir("auto", 511, SHM, pool) == (SHM, "tmpfs")       # not whole 2 MiB pages
    assert ram_dir("auto", 512, SHM, None) == (SHM, "tmpfs")
    assert ram_dir("tmpfs", 512, SHM, pool) == (SHM, "tmpfs")


def test_asking_for_huge_pages_that_are_not_there_is_a_clear_error():
    with pytest.raises(UsageError, match="no hugetlbfs mount"):
        ram_dir("hugepages", 512, SHM, None)
    with pytest.raises(UsageError, match="512 free 2 MiB huge pages needed for 1024 MiB, the host has 100"):
        ram_dir("hugepages", 1024, SHM, Pool(mount="/h", free_pages=100))
    with pytest.raises(UsageError, match="not a whole number"):
        ram_dir("hugepages", 511, SHM, Pool(mount="/h", free_pages=1000))
    with pytest.raises(UsageError, match="RAM backing must be one of"):
        ram_dir("ssd", 512, SHM, None)
