"""The host's cgroups, probed, and the cgroups sfmpi makes for its VMs.

Hosts differ: most run cgroup v2 (one unified hierarchy), some only v1 (one
hierarchy per controller; this project's CI machines mount v1 cpu, memory,
blkio... and a v2 hierarchy with no controller in it). probe() reads
/proc/self/mounts and /proc/self/cgroup (pure, so both layouts are unit-tested)
and says, per controller sfmpi uses (cpu, memory), where it is and where hostd is.

sfmpi never touches a cgroup it did not create. It makes one cgroup of its own,
`sfmpi-<tag>` (tag: the state directory's), and one child per VM:
- v1: at the root of the controller's hierarchy, and only if hostd itself is
  in the root there. A hostd that something else placed in a cgroup of that
  controller (a supervisor's memory cgroup) is refused for that controller: a
  VM moved out would escape that manager's limit, and a child made in its
  cgroup would be a change to a cgroup sfmpi did not create.
- v2: under SFMPI_CGROUP_PARENT (a cgroup delegated to sfmpi, e.g. systemd's
  Delegate=yes), else the root. The controller must already be enabled for the
  parent's children (its cgroup.subtree_control): sfmpi enables it only in
  its own cgroup.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from sfmpi.errors import HostdError, UsageError

CONTROLLERS = ("cpu", "memory")
CFS_PERIOD_US = 100_000


@dataclass(frozen=True)
class Hierarchy:
    controller: str
    version: int        # 1 or 2
    mount: str          # where the hierarchy is mounted
    hostd_path: str     # hostd's cgroup in it ("/" = the root)


@dataclass(frozen=True)
class Layout:
    hierarchies: dict   # controller -> Hierarchy (only the ones found)
    refused: dict       # controller -> why sfmpi may not use it here

    def require(self, controller: str, setting: str) -> Hierarchy:
        if controller in self.hierarchies:
            return self.hierarchies[controller]
        why = self.refused.get(controller, f"no cgroup hierarchy on this host has the {controller} controller")
        raise UsageError(f"{setting} needs the {controller} cgroup controller: {why}")


def probe(mounts: str, self_cgroup: str, v2_parent: str | None = None, v2_controllers=None) -> Layout:
    """mounts: /proc/self/mounts; self_cgroup: /proc/self/cgroup; v2_controllers(path) -> (available,
    enabled-for-children) of a v2 cgroup, read from its cgroup.controllers and cgroup.subtree_control."""
    v1_mounts, v2_mount = {}, None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        if fields[2] == "cgroup2":
            v2_mount = v2_mount or fields[1]
        elif fields[2] == "cgroup":
            for opt in fields[3].split(","):
                if opt in CONTROLLERS:
                    v1_mounts[opt] = fields[1]
    v1_paths = {}
    for line in self_cgroup.splitlines():
        _num, _, rest = line.partition(":")
        names, _, path = rest.partition(":")
        for name in names.split(","):
            if name in CONTROLLERS:
                v1_paths[name] = path
    found, refused = {}, {}
    for ctrl in CONTROLLERS:
        if ctrl in v1_mounts:
            path = v1_paths.get(ctrl, "/")
            if path != "/":
                refused[ctrl] = (f"hostd runs in the {ctrl} cgroup {path} (v1), which sfmpi did not create; "
                                 "sfmpi will neither move VMs out of it nor add to it")
            else:
                found[ctrl] = Hierarchy(ctrl, 1, v1_mounts[ctrl], "/")
        elif v2_mount is not None and v2_controllers is not None:
            parent = v2_parent or "/"
            available, enabled = v2_controllers(parent)
            if ctrl not in available:
                refused[ctrl] = f"the cgroup v2 hierarchy at {v2_mount} has no {ctrl} controller"
            elif ctrl not in enabled:
                refused[ctrl] = (f"cgroup v2: {ctrl} is not enabled for the children of {parent} "
                                 f"({v2_mount}{parent.rstrip('/')}/cgroup.subtree_control); enable it there, "
                                 "or set SFMPI_CGROUP_PARENT to a cgroup delegated to sfmpi")
            else:
                found[ctrl] = Hierarchy(ctrl, 2, v2_mount, parent)
    return Layout(found, refused)


def _v2_controllers(mount: str):
    def read(parent: str) -> tuple[set, set]:
        base = Path(mount) / parent.lstrip("/")
        try:
            return (set((base / "cgroup.controllers").read_text().split()),
                    set((base / "cgroup.subtree_control").read_text().split()))
        except OSError:
            return set(), set()
    return read


def probe_host() -> Layout:
    mounts = Path("/proc/self/mounts").read_text()
    v2 = next((ln.split()[1] for ln in mounts.splitlines() if ln.split()[2:3] == ["cgroup2"]), None)
    return probe(mounts, Path("/proc/self/cgroup").read_text(), os.environ.get("SFMPI_CGROUP_PARENT"),
                 _v2_controllers(v2) if v2 else None)


# -- what to write (pure) ---------------------------------------------------
def cpu_files(version: int, shares: int | None, limit_percent: float | None) -> dict[str, str]:
    """Files of a VM's cgroup for its shares and its CPU ceiling (None: the default)."""
    quota = int(limit_percent / 100.0 * CFS_PERIOD_US) if limit_percent is not None else None
    if version == 1:
        return {"cpu.shares": str(shares if shares is not None else 1024),
                "cpu.cfs_period_us": str(CFS_PERIOD_US),
                "cpu.cfs_quota_us": str(quota if quota is not None else -1)}
    # v2's weight is 1..10000 around 100, v1's shares 2..262144 around 1024: the same ratios.
    weight = 100 if shares is None else max(1, min(10000, round(shares * 100 / 1024)))
    return {"cpu.weight": str(weight), "cpu.max": f"{quota if quota is not None else 'max'} {CFS_PERIOD_US}"}


def memory_files(version: int, limit_bytes: int | None) -> dict[str, str]:
    if version == 1:
        return {"memory.limit_in_bytes": str(limit_bytes if limit_bytes is not None else -1)}
    return {"memory.max": str(limit_bytes if limit_bytes is not None else "max")}


class VmCgroups:
    """sfmpi's own cgroups: `sfmpi-<tag>` and one child per VM, in each hierarchy used."""

    def __init__(self, tag: str, layout: Layout):
        self.base_name = f"sfmpi-{tag}"
        self.layout = layout

    def _base(self, h: Hierarchy) -> Path:
        return Path(h.mount) / h.hostd_path.lstrip("/") / self.base_name

    def path(self, h: Hierarchy, vm: str) -> Path:
        return self._base(h) / vm

    def place(self, h: Hierarchy, vm: str, pid: int, files: dict[str, str]) -> Path:
        """Make the VM's cgroup (and sfmpi's), write its settings, move QEMU in (every thread)."""
        base = self._base(h)
        try:
            base.mkdir(exist_ok=True)
            if h.version == 2:
                wanted = {c for c, hh in self.layout.hierarchies.items() if hh.version == 2}
                (base / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in sorted(wanted)))
            cg = base / vm
            cg.mkdir(exist_ok=True)
            for name, value in files.items():
                (cg / name).write_text(value)
            (cg / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            raise HostdError(f"cgroup {h.controller} of VM {vm}: {exc.strerror} ({exc.filename})") from None
        return cg

    def remove(self, vm: str) -> list[str]:
        """Remove the VM's cgroups (empty once its QEMU is gone); what could not go is returned."""
        left = []
        for h in self.layout.hierarchies.values():
            cg = self.path(h, vm)
            if not cg.exists():
                continue
            try:
                cg.rmdir()
            except OSError as exc:
                if exc.errno not in (errno.ENOENT,):
                    left.append(f"{cg}: {exc.strerror}")
        return left

    def remove_all(self) -> list[str]:
        left = []
        for h in self.layout.hierarchies.values():
            base = self._base(h)
            if not base.exists():
                continue
            for child in base.iterdir():
                if child.is_dir():
                    try:
                        child.rmdir()
                    except OSError as exc:
                        left.append(f"{child}: {exc.strerror}")
            try:
                base.rmdir()
            except OSError as exc:
                left.append(f"{base}: {exc.strerror}")
        return left

    def existing(self) -> list[Path]:
        return [self._base(h) for h in self.layout.hierarchies.values() if self._base(h).exists()]
