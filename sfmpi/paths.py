"""Where sfmpi keeps things on a host.

SFMPI_HOME (default /var/lib/sfmpi) holds the state database, VM directories,
checkpoints and sockets of one hostd. Guest images are cached separately
(SFMPI_IMAGE_DIR, default /var/lib/sfmpi/images) so that several state
directories (tests, users) share one image build. Guest RAM of running VMs
lives on tmpfs under /dev/shm/sfmpi-<tag> so that `sfmpi down` can prove it
left nothing behind.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = "/var/lib/sfmpi"
DEFAULT_IMAGE_DIR = "/var/lib/sfmpi/images"
SHM_ROOT = "/dev/shm"


@dataclass(frozen=True)
class Paths:
    home: Path

    @classmethod
    def from_env(cls) -> "Paths":
        return cls(Path(os.environ.get("SFMPI_HOME", DEFAULT_HOME)).resolve())

    @property
    def db(self) -> Path:
        return self.home / "state.db"

    @property
    def lock(self) -> Path:
        return self.home / "hostd.lock"

    @property
    def socket(self) -> Path:
        return self.home / "hostd.sock"

    @property
    def hostd_log(self) -> Path:
        return self.home / "hostd.log"

    @property
    def vms(self) -> Path:
        return self.home / "vms"

    @property
    def disks(self) -> Path:
        """Every qcow2 layer of every VM: active overlays and frozen checkpoint layers."""
        return self.home / "disks"

    @property
    def accel_cache(self) -> Path:
        return self.home / "accel.json"

    @property
    def checkpoints(self) -> Path:
        return self.home / "checkpoints"

    @property
    def shm(self) -> Path:
        # One tmpfs directory per state dir, named by a hash so the path is short
        # and two homes never share RAM files.
        tag = hashlib.sha256(str(self.home).encode()).hexdigest()[:8]
        return Path(SHM_ROOT) / f"sfmpi-{tag}"

    def vm_dir(self, name: str) -> Path:
        return self.vms / name

    def ensure(self) -> None:
        for d in (self.home, self.vms, self.disks, self.checkpoints, self.shm):
            d.mkdir(parents=True, exist_ok=True)


def image_dir() -> Path:
    return Path(os.environ.get("SFMPI_IMAGE_DIR", DEFAULT_IMAGE_DIR)).resolve()
