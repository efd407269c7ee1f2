"""Checkpoints (SnowFlock's VM descriptor): an immutable directory with a manifest.

    <home>/checkpoints/<id>/
        manifest.json   what is below, sizes, checksum of the device state
        state           device state saved with x-ignore-shared (about 1 MB)
        ram             guest RAM, sparse: holes are zero pages
        overlay.qcow2   an empty overlay on the frozen disk (clones copy it)
    and the frozen disk layer, <home>/disks/<layer>.qcow2, with the rest of its
    backing chain (older frozen layers, the image).

The manifest names the disk layers of its state directory relative to the
checkpoint directory, so a state directory can move as a whole (the guest
image, cached elsewhere, stays absolute); a manifest is not trusted
on load (`sfmpi clone DIR` takes any directory): every file it names must be a
regular qcow2 file, and the device state must match its size and checksum.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sfmpi.errors import CheckpointError

from ..vm.cmdline import MachineSpec

FORMAT = "sfmpi-checkpoint"
# 2: disk paths relative to the checkpoint directory (1: absolute; still read).
VERSION = 2
READABLE_VERSIONS = (1, 2)
# An empty qcow2 overlay on the frozen disk; each clone starts on a copy of it.
OVERLAY_TEMPLATE = "overlay.qcow2"
QCOW2_MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class Checkpoint:
    id: str
    vm: str
    path: str                 # the checkpoint directory
    machine: dict             # MachineSpec.to_json()
    disk: str                 # frozen top layer (qcow2, absolute); clones put overlays on it
    disk_chain: tuple[str, ...]
    state_sha256: str
    state_size: int
    ram_size: int
    ram_allocated: int
    mode: str
    pause_ms: float
    qemu_version: str
    created: float = field(default_factory=time.time)
    timings: dict = field(default_factory=dict)
    # The family (named after its parent VM) whose network the clones join.
    family: str = ""
    # Taken by checkpoint_parent() in the guest: the id of that pending call,
    # which clones created from this checkpoint are answered on.
    guest_req: int | None = None
    # The VM's resource settings when it was taken: its clones start with them.
    resources: dict = field(default_factory=dict)
    # The VM driver that ran the VM (hostd/vm/driver.py): a libvirt domain's
    # state loads only into a libvirt domain, a direct QEMU's only into a
    # direct QEMU. Manifests without it were taken when direct was the only one.
    driver: str = "direct"

    @property
    def state_file(self) -> Path:
        return Path(self.path) / "state"

    @property
    def ram_file(self) -> Path:
        return Path(self.path) / "ram"

    @property
    def overlay_template(self) -> Path:
        return Path(self.path) / OVERLAY_TEMPLATE

    @property
    def spec(self) -> MachineSpec:
        return MachineSpec.from_json(self.machine)

    def to_json(self) -> dict:
        d = asdict(self)
        d["disk"] = self._portable(self.disk)
        d["disk_chain"] = [self._portable(p) for p in self.disk_chain]
        del d["path"]  # where it is found
        return {"format": FORMAT, "version": VERSION, **d}

    def _portable(self, path: str) -> str:
        """A layer of this state directory (home/disks/...) relative to the
        checkpoint directory (home/checkpoints/ID), so they move together; a file
        outside it (the guest image, in its own cache) stays absolute."""
        home = Path(self.path).parent.parent
        return os.path.relpath(path, self.path) if Path(path).is_relative_to(home) else path

    def write(self, directory: str | Path | None = None) -> None:
        """Write the manifest atomically (into `directory` while it is still being
        built: relative paths are the same from there, since it is renamed in place)."""
        manifest = Path(directory or self.path) / "manifest.json"
        tmp = manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, manifest)

    @classmethod
    def load(cls, path: str | Path) -> "Checkpoint":
        """Read and verify a checkpoint; CheckpointError says what is wrong."""
        path = Path(path).resolve()
        manifest = path / "manifest.json"
        if not manifest.is_file():
            raise CheckpointError(f"checkpoint {path.name}: no manifest at {manifest}")
        try:
            if manifest.stat().st_size > 1 << 20:
                raise ValueError("larger than 1 MiB")
            d = json.loads(manifest.read_text())
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {path.name}: manifest is corrupt ({exc})") from exc
        ckpt = cls.parse(d, path)
        ckpt.verify()
        return ckpt

    @classmethod
    def parse(cls, d, path: Path, remote: bool = False) -> "Checkpoint":
        """A manifest's JSON (from its file, or from another host) as a checkpoint
        at `path`, its types checked. remote: the disk and RAM stay on the host
        that sent it (NBD, memory server), so no path of that host is taken in."""
        try:
            if not isinstance(d, dict):
                raise TypeError("not a JSON object")
            if d.get("format") != FORMAT or d.get("version") not in READABLE_VERSIONS:
                raise CheckpointError(f"checkpoint {path.name}: not a {FORMAT} v{VERSION} manifest")
            fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
            fields["path"] = str(path)
            if remote:
                fields["disk"], fields["disk_chain"] = "", ()
            else:
                fields["disk"] = _disk_path(path, fields["disk"])
                chain = fields.get("disk_chain", ())
                if not isinstance(chain, (list, tuple)):
                    raise TypeError("disk_chain is not a list")
                fields["disk_chain"] = tuple(_disk_path(path, p) for p in chain)
            ckpt = cls(**fields)
            _check_types(ckpt)
            MachineSpec.from_json(ckpt.machine)
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {path.name}: manifest is corrupt ({exc})") from exc
        return ckpt

    def verify_state(self) -> None:
        """The device state is the one the manifest describes (size, checksum)."""
        if not self.state_file.is_file() or self.state_file.stat().st_size != self.state_size:
            raise CheckpointError(f"checkpoint {self.id}: device state has the wrong size")
        if sha256_file(self.state_file) != self.state_sha256:
            raise CheckpointError(f"checkpoint {self.id}: device state checksum does not match")

    def verify(self) -> None:
        name = self.id
        for f in (self.state_file, self.ram_file, Path(self.disk), *map(Path, self.disk_chain)):
            if not f.exists():
                raise CheckpointError(f"checkpoint {name}: {f} is missing")
        for f in (Path(self.disk), *map(Path, self.disk_chain)):
            if not f.is_file() or not _is_qcow2(f):
                raise CheckpointError(f"checkpoint {name}: {f} is not a qcow2 disk layer")
        if self.state_file.stat().st_size != self.state_size:
            raise CheckpointError(f"checkpoint {name}: device state has the wrong size")
        if sha256_file(self.state_file) != self.state_sha256:
            raise CheckpointError(f"checkpoint {name}: device state checksum does not match")
        if self.ram_file.stat().st_size != self.ram_size:
            raise CheckpointError(f"checkpoint {name}: RAM file has the wrong size")


def _disk_path(ckpt_dir: Path, value) -> str:
    """A manifest's disk path (relative to the checkpoint directory; absolute in v1) as an absolute path."""
    if not isinstance(value, str) or not value or "\0" in value or len(value) > 4096:
        raise ValueError(f"bad disk path {value!r}")
    return os.path.normpath(os.path.join(ckpt_dir, value))


def _check_types(ckpt: Checkpoint) -> None:
    ints = ("state_size", "ram_size", "ram_allocated")
    for k in ints:
        v = getattr(ckpt, k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise TypeError(f"{k} is not a non-negative integer")
    for k in ("id", "vm", "state_sha256", "mode", "qemu_version", "family", "driver"):
        if not isinstance(getattr(ckpt, k), str):
            raise TypeError(f"{k} is not a string")
    if not isinstance(ckpt.machine, dict) or not isinstance(ckpt.timings, dict) \
            or not isinstance(ckpt.resources, dict):
        raise TypeError("machine, timings and resources must be objects")
    if ckpt.guest_req is not None and (isinstance(ckpt.guest_req, bool) or not isinstance(ckpt.guest_req, int)):
        raise TypeError("guest_req is not an integer")


def _is_qcow2(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == QCOW2_MAGIC
    except OSError:
        return False


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
