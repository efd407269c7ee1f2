"""Guest image builder: debootstrap Debian bookworm, add the sfmpi agent, ext4, qcow2.

An image is a directory `<image dir>/<recipe hash>/` holding `disk.qcow2`, the
kernel and initrd for direct kernel boot, and `image.json`. The hash covers
everything that goes into the image (suite, packages, agent source, guest
configuration), so a second build with the same recipe returns at once.

The debootstrapped root tree is cached separately, keyed by the package list
only, so changing the agent re-runs the quick steps (configure, mkfs) and not
the download.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import proc
from .errors import ImageError, UsageError
from .paths import image_dir

# debootstrap and apt download from a mirror: minutes, not the default bound of a command.
IMAGE_STEP_TIMEOUT = 3600.0

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# What debootstrap installs. Python packages with compiled parts (bcrypt, under
# paramiko) fail debootstrap's configure stage, so everything else goes in with
# apt in the chroot afterwards (STAGE2_PACKAGES, and the user's --packages).
BASE_PACKAGES = (
    "linux-image-cloud-amd64", "systemd-sysv", "udev", "kmod", "python3",
    "mpich", "openmpi-bin", "python3-mpi4py", "openssh-server", "iproute2",
)
STAGE2_PACKAGES = (
    # Users compile MPI and clone-API programs inside the VM (libsfclone needs json-c).
    "gcc", "libc6-dev", "make", "pkg-config", "libmpich-dev", "libopenmpi-dev", "libjson-c-dev",
    # sfclone (click), sfmpirun's SSH agent (paramiko), parallel sections (numpy
    # is what their users compute with), and stock DHCP clients for the family network.
    "python3-click", "python3-paramiko", "python3-numpy", "isc-dhcp-client", "busybox",
)
# Bump when the guest configuration below changes in a way the hash of the agent
# source does not capture.
GUEST_CONFIG_VERSION = 3
# mitigations=off: speculative-execution defences only slow an emulated guest down.
# ipv6.disable=1: family networks are IPv4 (nft allows each tap one MAC and IPv4
# address), and a clone would keep its parent's IPv6 link-local address, made
# from the parent's MAC: the same address on every clone of the family.
KERNEL_APPEND = ("root=/dev/vda rw console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off "
                 "ipv6.disable=1")
PACKAGE_DIR = Path(__file__).parent
# The part of the sfmpi package a guest runs: the agent and the clone API
# (host-only modules such as hostd stay out of the image).
GUEST_MODULES = (
    "__init__.py", "errors.py", "api.py", "sfclone.py", "sections.py", "section_wire.py", "section_mpi.py",
    "forkpool.py", "family_auth.py",
    "guest/__init__.py", "guest/agent.py", "guest/load.py", "guest/service.py",
)
GUEST_PYTHON_DIR = "usr/lib/python3/dist-packages/sfmpi"
# sfmpirun (launcher/ in the repository, sfmpi.launcher installed): it runs in the guest.
LAUNCHER_DIR = PACKAGE_DIR.parent / "launcher"
# All of it: a module left off a hand-kept list breaks sfmpirun only inside the guest.
LAUNCHER_MODULES = tuple(sorted(p.name for p in LAUNCHER_DIR.glob("*.py")))
# libsfclone, the clone API for C and C++, and sfmpirun's MPICH finalize fix
# (built on the host, Debian bookworm too).
NATIVE_DIR = PACKAGE_DIR.parent / "native"
NATIVE_SOURCES = ("Makefile", "sfclone/sfclone.c", "sfclone/sfclone.h", "mpich-finalize/sfmpirun_finalize.c",
                  "pmi1/sfmpi_pmi1.c", "sfmpirun-agent/sfmpirun_agent.c",
                  # sfmpi-agentd (native/Makefile's AGENTD_SOURCES and AGENTD_HEADERS)
                  "agent/agentd.c", "agent/hostd_channel.c", "agent/hostd_channel.h", "agent/clone_api.c",
                  "agent/clone_api.h", "agent/jobs_runner.c", "agent/jobs_runner.h", "agent/line_io.c",
                  "agent/line_io.h", "agent/identity.c", "agent/identity.h", "agent/identity_steps.h",
                  "agent/identity_system.c", "agent/identity_network.c", "agent/identity_hosts.c",
                  "agent/identity_hooks.c")
SFCLONE_WRAPPER = "#!/usr/bin/python3\nfrom sfmpi.sfclone import run\nrun()\n"
SFMPIRUN_WRAPPER = "#!/usr/bin/python3\nfrom sfmpi.launcher.run import main\nmain()\n"

AGENT_UNIT = """\
[Unit]
Description=sfmpi guest agent (virtio-serial channel to hostd)
# No udev and no local-fs ordering: the root file system is mounted rw by the
# kernel, devtmpfs creates /dev/vport*, and the agent loads virtio_console
# itself. Waiting for udev cost ~25 s of a TCG boot.
DefaultDependencies=no
After=systemd-journald.socket

[Service]
ExecStart=/usr/local/lib/sfmpi/sfmpi-agentd
Restart=always
RestartSec=0.2

[Install]
WantedBy=sysinit.target
"""

# Timers and services that only cost boot time in a short-lived guest.
MASKED_UNITS = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer",
    "man-db.timer", "dpkg-db-backup.timer", "getty@tty1.service", "e2scrub_reap.service",
)


@dataclass(frozen=True)
class Recipe:
    packages: tuple[str, ...] = BASE_PACKAGES
    extra_packages: tuple[str, ...] = ()
    suite: str = SUITE
    stage2: tuple[str, ...] = STAGE2_PACKAGES

    @property
    def apt_packages(self) -> tuple[str, ...]:
        """Installed with apt after debootstrap: stage 2, then the user's."""
        seen = set(self.packages)
        out = []
        for p in tuple(self.stage2) + tuple(self.extra_packages):
            if p not in seen:
                seen.add(p)
                out.append(p)
        return tuple(out)

    @property
    def all_packages(self) -> tuple[str, ...]:
        return tuple(self.packages) + self.apt_packages

    def base_hash(self) -> str:
        return _sha({"suite": self.suite, "packages": sorted(self.packages)})

    def rootfs_hash(self) -> str:
        return _sha({"suite": self.suite, "packages": sorted(self.packages),
                     "apt": sorted(self.apt_packages)})

    def image_hash(self) -> str:
        return _sha({
            "rootfs": self.rootfs_hash(),
            "guest_modules": {m: hashlib.sha256((PACKAGE_DIR / m).read_bytes()).hexdigest()
                              for m in GUEST_MODULES},
            "launcher": {m: hashlib.sha256((LAUNCHER_DIR / m).read_bytes()).hexdigest()
                         for m in LAUNCHER_MODULES},
            "native": {m: hashlib.sha256((NATIVE_DIR / m).read_bytes()).hexdigest()
                       for m in NATIVE_SOURCES if (NATIVE_DIR / m).exists()},
            "unit": AGENT_UNIT, "masked": MASKED_UNITS, "append": KERNEL_APPEND,
            "config": GUEST_CONFIG_VERSION,
        })


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Image:
    """A built guest image (what `vm start --image` needs)."""
    disk: Path
    kernel: Path
    initrd: Path
    append: str
    virtual_size: int
    recipe: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "Image":
        """Accept the qcow2 path printed by `image build`, or its directory."""
        p = Path(path)
        meta = (p if p.is_dir() else p.parent) / "image.json"
        if not p.exists():
            raise ImageError(f"image {path} does not exist (build one with `sfmpi image build`)")
        if not meta.exists():
            raise ImageError(f"{path} is not an sfmpi image: {meta} is missing")
        try:
            d = json.loads(meta.read_text())
            img = cls(disk=Path(d["disk"]), kernel=Path(d["kernel"]), initrd=Path(d["initrd"]),
                      append=d["append"], virtual_size=int(d["virtual_size"]), recipe=d.get("recipe", {}))
        except (ValueError, KeyError, TypeError) as exc:
            raise ImageError(f"image metadata {meta} is unreadable: {exc}") from exc
        for f in (img.disk, img.kernel, img.initrd):
            if not f.exists():
                raise ImageError(f"image {path} is incomplete: {f} is missing")
        return img

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


Progress = Callable[[str], None]


def build(recipe: Recipe = Recipe(), out: Path | None = None, mirror: str | None = None,
          progress: Progress = lambda s: None, force: bool = False) -> Path:
    """Build (or find in the cache) the image for `recipe`; return the qcow2 path."""
    mirror = mirror or os.environ.get("SFMPI_MIRROR", DEFAULT_MIRROR)
    root = image_dir()
    final = root / recipe.image_hash()
    if (final / "image.json").exists() and not force:
        progress("cached")
        disk = final / "disk.qcow2"
        return _export(disk, out)
    root.mkdir(parents=True, exist_ok=True)
    rootfs = _rootfs(recipe, mirror, root, progress)
    progress("configuring guest")
    _configure(rootfs)
    work = root / f".build-{recipe.image_hash()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        kernel, initrd = _kernel_files(rootfs)
        shutil.copy2(kernel, work / "vmlinuz")
        shutil.copy2(initrd, work / "initrd.img")
        progress("making ext4 file system")
        raw = work / "disk.raw"
        size = _tree_bytes(rootfs) * 13 // 10 + (512 << 20)
        size = (size + (1 << 20) - 1) & ~((1 << 20) - 1)
        proc.run(["mkfs.ext4", "-q", "-F", "-L", "sfmpi-root", "-d", rootfs, raw, f"{size // 1024}K"])
        progress("converting to qcow2")
        proc.run(["qemu-img", "convert", "-O", "qcow2", raw, work / "disk.qcow2"])
        raw.unlink()
        meta = Image(disk=final / "disk.qcow2", kernel=final / "vmlinuz", initrd=final / "initrd.img",
                     append=KERNEL_APPEND, virtual_size=size,
                     recipe={"suite": recipe.suite, "packages": list(recipe.all_packages),
                             "hash": recipe.image_hash()})
        (work / "image.json").write_text(json.dumps(meta.to_json(), indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)
        os.rename(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    progress("done")
    return _export(final / "disk.qcow2", out)


def _export(disk: Path, out: Path | None) -> Path:
    """--out: place a copy of the whole image directory where the user asked."""
    if out is None:
        return disk
    out = Path(out)
    if out.exists():
        raise ImageError(f"--out {out} already exists")
    shutil.copytree(disk.parent, out)
    meta = json.loads((out / "image.json").read_text())
    for key, name in (("disk", "disk.qcow2"), ("kernel", "vmlinuz"), ("initrd", "initrd.img")):
        meta[key] = str((out / name).resolve())
    (out / "image.json").write_text(json.dumps(meta, indent=2) + "\n")
    return (out / "disk.qcow2").resolve()


def _rootfs(recipe: Recipe, mirror: str, root: Path, progress: Progress) -> Path:
    """The root tree: debootstrap (cached by its package list), then apt (cached
    by the whole list), each step in its own directory marked done at the end."""
    base = _debootstrap(recipe, mirror, root, progress)
    if not recipe.apt_packages:
        return base
    rootfs = root / f"rootfs-{recipe.rootfs_hash()}"
    done = rootfs.with_suffix(".done")
    if done.exists():
        return rootfs
    shutil.rmtree(rootfs, ignore_errors=True)
    progress(f"copying the base tree, then apt-get install {len(recipe.apt_packages)} packages")
    proc.run(["cp", "-a", "--reflink=auto", base, rootfs])
    log = root / f"apt-{recipe.rootfs_hash()}.log"
    try:
        _apt_install(rootfs, recipe.apt_packages, log)
    except Exception as exc:
        shutil.rmtree(rootfs, ignore_errors=True)
        tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
        raise ImageError(f"apt-get install in the guest tree failed (log {log}): {' | '.join(tail)}") from exc
    done.touch()
    return rootfs


# In a private mount namespace (unshare -m), so /proc goes away with it whatever
# happens; no services start in the chroot (policy-rc.d).
APT_SCRIPT = """set -e
mount -t proc proc "$1/proc"
cp /etc/resolv.conf "$1/etc/resolv.conf"
printf '#!/bin/sh\nexit 101\n' > "$1/usr/sbin/policy-rc.d"; chmod +x "$1/usr/sbin/policy-rc.d"
shift_root="$1"; shift
chroot "$shift_root" apt-get update -q
chroot "$shift_root" apt-get install -y -q --no-install-recommends "$@"
chroot "$shift_root" apt-get clean
rm -f "$shift_root/usr/sbin/policy-rc.d" "$shift_root/etc/resolv.conf"
rm -rf "$shift_root/var/lib/apt/lists/"*
"""


def _apt_install(rootfs: Path, packages: tuple[str, ...], log: Path) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    with open(log, "wb") as logf:
        proc.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", APT_SCRIPT, "sh",
                  rootfs, *packages], capture=False, stdout=logf, stderr=logf, env=env,
                 timeout=IMAGE_STEP_TIMEOUT)


def _debootstrap(recipe: Recipe, mirror: str, root: Path, progress: Progress) -> Path:
    rootfs = root / f"rootfs-{recipe.base_hash()}"
    done = rootfs.with_suffix(".done")
    if done.exists():
        return rootfs
    shutil.rmtree(rootfs, ignore_errors=True)
    cache = root / "debs"
    cache.mkdir(exist_ok=True)
    progress(f"debootstrap {recipe.suite} ({len(recipe.packages)} packages, a few minutes)")
    log = root / f"debootstrap-{recipe.base_hash()}.log"
    argv = ["debootstrap", "--variant=minbase", f"--cache-dir={cache}",
            "--include=" + ",".join(recipe.packages), recipe.suite, str(rootfs), mirror]
    with open(log, "wb") as logf:
        try:
            proc.run(argv, capture=False, stdout=logf, stderr=logf, timeout=IMAGE_STEP_TIMEOUT)
        except Exception as exc:
            shutil.rmtree(rootfs, ignore_errors=True)
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise ImageError(f"debootstrap failed (log {log}): {' | '.join(tail)}") from exc
    for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    done.touch()
    return rootfs


def _configure(rootfs: Path) -> None:
    """Write the guest files sfmpi owns. Idempotent: rewrites them every build."""
    (rootfs / "etc/hostname").write_text("sfmpi\n")
    (rootfs / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 sfmpi\n")
    (rootfs / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    # virtio_balloon: the free page reporting of parents (hostd/vm/cmdline.py balloon_args).
    (rootfs / "etc/modules-load.d/sfmpi.conf").write_text("virtio_console\nvirtio_balloon\n")
    shutil.rmtree(rootfs / "usr/lib/sfmpi", ignore_errors=True)
    pkg = rootfs / GUEST_PYTHON_DIR
    shutil.rmtree(pkg, ignore_errors=True)
    for module in GUEST_MODULES:
        (pkg / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACKAGE_DIR / module, pkg / module)
    for module in LAUNCHER_MODULES:
        (pkg / "launcher").mkdir(parents=True, exist_ok=True)
        shutil.copy2(LAUNCHER_DIR / module, pkg / "launcher" / module)
    # Compiled now, not at first import in every VM booted from the image (the
    # agent at boot, sfmpirun's first job), where it costs the one vCPU under TCG.
    proc.run(["chroot", rootfs, "python3", "-m", "compileall", "-q", "/" + GUEST_PYTHON_DIR])
    for name, text in (("sfclone", SFCLONE_WRAPPER), ("sfmpirun", SFMPIRUN_WRAPPER)):
        (rootfs / "usr/bin" / name).write_text(text)
        (rootfs / "usr/bin" / name).chmod(0o755)
    proc.run(["make", "-s", "-C", NATIVE_DIR, "install", f"DESTDIR={rootfs}", "PREFIX=/usr/local"])
    proc.run(["chroot", rootfs, "ldconfig"])
    # Members of group sfmpi may fork the VM (the API socket is root:sfmpi 0660).
    if proc.run(["chroot", rootfs, "getent", "group", "sfmpi"], check=False).returncode != 0:
        proc.run(["chroot", rootfs, "groupadd", "--system", "sfmpi"])
    (rootfs / "etc/sfmpi/clone.d").mkdir(parents=True, exist_ok=True)
    units = rootfs / "etc/systemd/system"
    (units / "sfmpi-agent.service").write_text(AGENT_UNIT)
    wants = units / "sysinit.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "sfmpi-agent.service"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to("/etc/systemd/system/sfmpi-agent.service")
    for unit in MASKED_UNITS:
        target = units / unit
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to("/dev/null")
    # No password login: the agent is the way in. '*' (no password) rather than
    # `passwd -l` ('!'): sfmpirun's per-job sshd runs without PAM, and sshd
    # without PAM refuses a locked account even a key login.
    proc.run(["chroot", rootfs, "usermod", "-p", "*", "root"])


def _kernel_files(rootfs: Path) -> tuple[Path, Path]:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    initrds = sorted((rootfs / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise ImageError(f"no kernel or initrd in {rootfs}/boot")
    return kernels[-1], initrds[-1]


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


def default_image(missing: str = "no --image given", where: str = "") -> str:
    """The default recipe's image if it is built; `missing` and `where` finish the error's sentence."""
    candidate = image_dir() / Recipe().image_hash() / "disk.qcow2"
    if not candidate.exists():
        raise UsageError(f"{missing} and the default image is not built (run `sfmpi image build`{where})")
    return str(candidate)
