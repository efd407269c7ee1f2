"""Where a parent VM's RAM lives: tmpfs (4 KiB pages) or hugetlbfs (2 MiB pages).

The parent's pause at a background checkpoint is mostly QEMU write-protecting
all of its RAM with userfaultfd, one page-table entry per page: with 4 KiB
pages that grows with RAM (measured under TCG: ~12 ms at 256 MiB, ~30 ms at
1 GiB); with 2 MiB pages there are 512 entries per GiB and the pause is a few
ms at any size. So a parent goes on hugetlbfs when the host offers it: a
hugetlbfs mount of 2 MiB pages with enough free pages. Reserving pages
(`vm.nr_hugepages`) and mounting hugetlbfs is the administrator's decision, so
sfmpi only uses what is there. Clones are unaffected: they map their
checkpoint's RAM file (in the checkpoint directory) privately.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sfmpi.errors import UsageError

HUGE_PAGE = 2 << 20
BACKINGS = ("auto", "hugepages", "tmpfs")
SYSFS_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")


@dataclass(frozen=True)
class Pool:
    mount: str         # a hugetlbfs mount point with 2 MiB pages
    free_pages: int    # free and not reserved by a mapping yet


def mounts_2m(proc_mounts: str, default_kb: int) -> list[str]:
    """hugetlbfs mount points whose page size is 2 MiB, from /proc/mounts text
    (a mount without `pagesize=` has the system default, `default_kb`)."""
    found = []
    for line in proc_mounts.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[2] != "hugetlbfs":
            continue
        opts = dict(o.split("=", 1) if "=" in o else (o, "") for o in parts[3].split(","))
        size = opts.get("pagesize", f"{default_kb}K").upper().rstrip("B")
        if size in ("2M", "2048K"):
            found.append(parts[1].replace("\\040", " "))
    return found


def _int(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def default_page_kb(meminfo: str) -> int:
    for line in meminfo.splitlines():
        if line.startswith("Hugepagesize:"):
            return int(line.split()[1])
    return 0


def host_mounts_2m() -> list[str]:
    return mounts_2m(Path("/proc/mounts").read_text(), default_page_kb(Path("/proc/meminfo").read_text()))


def free_pages() -> int:
    """2 MiB pages neither in use nor promised to a mapping already."""
    return max(_int(SYSFS_2M / "free_hugepages") - _int(SYSFS_2M / "resv_hugepages"), 0)


def pool() -> Pool | None:
    """The host's 2 MiB huge page pool, if it has one mounted."""
    mounts = host_mounts_2m()
    return Pool(mount=mounts[0], free_pages=free_pages()) if mounts else None


def ram_dir(backing: str, mem_mb: int, tmpfs_dir: Path, host_pool: Pool | None) -> tuple[Path, str]:
    """(directory for the RAM file, backing used) for a parent of mem_mb MiB.

    auto: hugetlbfs when it has room, else tmpfs; hugepages: hugetlbfs or a clear
    error; tmpfs: always tmpfs.
    """
    if backing not in BACKINGS:
        raise UsageError(f"RAM backing must be one of {', '.join(BACKINGS)} (got {backing!r})")
    if backing == "tmpfs":
        return tmpfs_dir, "tmpfs"
    pages = (mem_mb << 20) // HUGE_PAGE
    fits = host_pool is not None and (mem_mb << 20) % HUGE_PAGE == 0 and host_pool.free_pages >= pages
    if fits:
        return Path(host_pool.mount), "hugepages"
    if backing == "auto":
        return tmpfs_dir, "tmpfs"
    if host_pool is None:
        raise UsageError("no hugetlbfs mount with 2 MiB pages on this host: reserve pages "
                         "(sysctl vm.nr_hugepages=N) and mount one (mount -t hugetlbfs none /dev/hugepages), "
                         "or use --ram-backing tmpfs")
    if (mem_mb << 20) % HUGE_PAGE:
        raise UsageError(f"{mem_mb} MiB is not a whole number of 2 MiB huge pages")
    raise UsageError(f"{pages} free 2 MiB huge pages needed for {mem_mb} MiB, the host has "
                     f"{host_pool.free_pages} ({host_pool.mount}); or use --ram-backing tmpfs")


def ram_file_name(owner_tag: str, vm: str) -> str:
    """A parent's RAM file on a hugetlbfs mount shared with others: named by the
    state directory's tag (its tmpfs directory name) so `down` finds its own."""
    return f"{owner_tag}-{vm}.ram"


def leftover_files(owner_tag: str) -> list[Path]:
    """RAM files of this state directory still on any 2 MiB hugetlbfs mount."""
    return [f for m in host_mounts_2m() for f in Path(m).glob(ram_file_name(owner_tag, "*"))]
