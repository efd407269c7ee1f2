"""Where sfmpi keeps things on a host.

SFMPI_HOME (default /var/lib/sfmpi) holds the state database, VM directories,
checkpoints and sockets of one hostd. Guest images are cached separately
(SFMPI_IMAGE_DIR, default /var/lib/sfmpi/images) so that several state
directories (tests, users) share one image build. Runtime files (sockets, and a
parent's RAM unless it is on huge pages) live under /dev/shm/sfmpi-<tag>, and
the family networks in the network namespace sfmpi-<tag>, so that `sfmpi down`
can prove it left nothing behind.
"""
from __future__ import annotations

import hashlib
import os
import stat
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
    def driver_file(self) -> Path:
        """The VM driver this state directory runs until `sfmpi down` (hostd/vm/driver.py)."""
        return self.home / "driver"

    @property
    def accel_cache(self) -> Path:
        return self.home / "accel.json"

    @property
    def checkpoints(self) -> Path:
        return self.home / "checkpoints"

    @property
    def memory(self) -> Path:
        """Served memory's daemons and memtap's FUSE mounts (hostd/memory)."""
        return self.home / "memory"

    @property
    def tag(self) -> str:
        """A short name of this state directory (a hash: two homes never share one)."""
        return hashlib.sha256(str(self.home).encode()).hexdigest()[:8]

    @property
    def shm(self) -> Path:
        # One tmpfs directory per state dir, short enough for socket paths.
        return Path(SHM_ROOT) / f"sfmpi-{self.tag}"

    @property
    def netns(self) -> str:
        """hostd's own network namespace, where its family networks live."""
        return f"sfmpi-{self.tag}"

    def vm_dir(self, name: str) -> Path:
        return self.vms / name

    def ensure(self) -> None:
        """Make hostd's directories, private to their owner. The runtime
        directory on the shared /dev/shm is made exclusively, and one that is
        not a plain directory of ours, private, is refused: another user could
        otherwise plant or read sockets and RAM files there."""
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.home.stat().st_uid == os.geteuid():
            os.chmod(self.home, 0o700)
        for d in (self.vms, self.disks, self.checkpoints):
            d.mkdir(mode=0o700, exist_ok=True)
        ensure_private_dir(self.shm)


def ensure_private_dir(path: Path) -> None:
    from .errors import HostdError
    try:
        os.mkdir(path, 0o700)
        return
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise HostdError(f"{path} exists but is not a private directory of uid {os.geteuid()} "
                         f"(owner {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}): refusing to use it")


def image_dir() -> Path:
    return Path(os.environ.get("SFMPI_IMAGE_DIR", DEFAULT_IMAGE_DIR)).resolve()
