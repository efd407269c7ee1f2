"""A VM's record: what hostd knows of one VM it started, kept in the store.

Frozen: a change is a new record, written through the VM registry
(hostd/vm/registry.py), which is the one place that changes a live VM's record.
Lifecycle: starting -> running (-> paused) -> removed on stop; crashed if QEMU
exits on its own (kept, with QEMU's stderr, until `vm stop` or `down`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from enum import Enum


class VmState(str, Enum):
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    CRASHED = "crashed"


class VmRole(str, Enum):
    PARENT = "parent"      # booted from an image
    CLONE = "clone"        # resumed from a checkpoint
    RECEIVER = "receiver"  # transient: takes the pre-copy of a checkpoint


@dataclass(frozen=True)
class VmRecord:
    name: str
    role: VmRole
    state: VmState
    spec: dict                 # MachineSpec.to_json()
    overlay: str               # the VM's own writable disk layer
    ram_path: str
    qmp_path: str
    agent_path: str
    log_path: str
    serial_log: str
    pid: int | None = None
    image: str = ""
    checkpoint: str = ""       # clones: the checkpoint they came from
    error: str = ""
    family: str = ""           # the family (parent VM's name) this VM belongs to
    family_no: int = 0         # its number: bridge, subnet, MACs (hostd/netplan.py)
    netid: int = 0             # the VM's ID in the family: 0 parent, 1.. clones
    ticket: str = ""           # clones made for a ticket of the clone API
    # The files under `overlay`, nearest first (frozen layers, the image): what
    # this VM needs on disk while it lives (hostd/fork/retention.py).
    backing: tuple[str, ...] = ()
    # `sfmpi vm set`'s settings (hostd/resources/settings.py), applied whenever the VM comes up.
    resources: dict = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    def with_(self, **changes) -> "VmRecord":
        return replace(self, **changes)
