"""Pure builders for QEMU command lines. No I/O here: tests assert on the lists.

A parent VM, the checkpoint receiver and every clone are built from the same
MachineSpec, because a migration stream only loads into a machine with exactly
the same devices, ROMs and RAM layout. What differs between the three is where
RAM comes from (the parent's own file on tmpfs or hugetlbfs, shared; the
checkpoint's RAM file, shared for the receiver and private for a clone), which disk backs the virtio-blk device, and whether the VM waits for
an incoming migration.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass
from typing import Literal

QEMU_BINARY = "qemu-system-x86_64"
AGENT_PORT_NAME = "org.sfmpi.0"
RAM_BACKEND_ID = "ram0"
DISK_NODE = "disk0"
NBD_TLS_ID = "nbdtls0"
DISK_DEVICE = "vblk0"
NET_ID = "net0"
NIC_DEVICE = "nic0"
BALLOON_DEVICE = "balloon0"
# The option ROM QEMU adds for -kernel on q35 (fw_cfg DMA): a RAM block of its own.
LINUX_BOOT_ROM = "linuxboot_dma.bin"


@dataclass(frozen=True)
class MachineSpec:
    """What must be identical for a migration stream to load."""
    mem_mb: int
    cpus: int
    accel: Literal["kvm", "tcg"]
    kernel: str
    initrd: str
    append: str
    disk_size: int  # virtual size of the guest disk, bytes
    # A virtio-balloon with free page reporting: pages the guest frees leave
    # its RAM file, so they are neither checkpointed nor ever sent. Part of
    # the spec because a clone must have the parent's devices; False for a
    # checkpoint of a parent started before it existed.
    free_page_reporting: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "MachineSpec":
        fields = cls.__dataclass_fields__
        return cls(**{k: d[k] for k in fields if k in d or fields[k].default is MISSING})


@dataclass(frozen=True)
class Qcow2Disk:
    path: str
    # A clone's overlay dies with the clone: the guest's flushes (ext4's journal
    # commits) need not reach the host's disk, and many clones flushing at once
    # would only make each other wait. Reads by later clones of a checkpointed
    # clone go through the host's page cache either way.
    ephemeral: bool = False
    # Where reads of clusters the overlay lacks go, when not to the backing
    # file its header names (a local layer): a remote clone's NBD backing.
    backing: NbdBacking | None = None


@dataclass(frozen=True)
class NbdBacking:
    """A frozen disk on another host, exported read-only over NBD with TLS: a
    remote clone's overlay reads through to it (hostd/cluster/nbd.py)."""
    host: str
    port: int
    export: str
    tls_dir: str          # QEMU's tls-creds-x509 directory (ca-cert.pem, client-cert.pem, client-key.pem)
    server_name: str      # the exporting host's name: its certificate's, checked instead of the address


@dataclass(frozen=True)
class NullDisk:
    """A disk that is never read: the checkpoint receiver needs a virtio-blk device
    of the right size for the device state to load, but never runs the guest."""
    size: int


@dataclass(frozen=True)
class Nic:
    """The VM's one NIC, on a tap of its family bridge.

    Every VM of a family has it, the checkpoint receiver included, because
    virtio-net's negotiated features (offloads need a tap's vnet header) are part
    of the migrated state. `tap` names a persistent tap on the bridge; `tap_fd`
    is an open tap (the receiver's, unattached) that QEMU inherits.
    """
    mac: str
    tap: str | None = None
    tap_fd: int | None = None


@dataclass(frozen=True)
class Sockets:
    qmp: str
    agent: str


def opt(value: object) -> str:
    """A value inside a QEMU option string (key=value,key=value): a comma in it
    is written twice, QEMU's own escape, so a path with a comma stays one value
    and cannot add options of its own."""
    return str(value).replace(",", ",,")


def cpu_args(accel: str) -> list[str]:
    # Under KVM on PVM hosts `-cpu host` aborts on MSR 0x10a (docs/platform.md);
    # dropping arch-capabilities keeps it portable across KVM hosts.
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host,-arch-capabilities"]
    return ["-accel", "tcg", "-cpu", "max"]


def ram_args(spec: MachineSpec, ram_path: str, share: bool, prealloc: bool = False) -> list[str]:
    # prealloc: a parent's RAM is populated at start, because the first background
    # checkpoint would otherwise populate it while the parent is stopped (345 ms
    # measured for 512 MiB). prealloc is not part of the migrated machine.
    return [
        "-m", f"{spec.mem_mb}M",
        "-object",
        f"memory-backend-file,id={RAM_BACKEND_ID},size={spec.mem_mb}M,"
        f"mem-path={opt(ram_path)},share={'on' if share else 'off'}" + (",prealloc=on" if prealloc else ""),
    ]


def boot_args(spec: MachineSpec, incoming: str | None) -> list[str]:
    """Direct kernel boot for a fresh VM; only the boot ROM for one that loads a stream.

    A VM that waits for a migration stream never runs its firmware: the kernel
    and initrd (30 MB read and parsed at every start, 10-20 ms of CPU per clone
    measured) would only sit in fw_cfg. But the stream names the RAM blocks of
    the source, and `-kernel` adds one, the option ROM that loads the kernel;
    `-option-rom` adds the same block under the same name. (A clone's guest
    never reboots through it: VMs run with -no-reboot.)
    """
    if incoming is not None:
        return ["-option-rom", LINUX_BOOT_ROM]
    return ["-kernel", spec.kernel, "-initrd", spec.initrd, "-append", spec.append]


def disk_args(disk: Qcow2Disk | NullDisk) -> list[str]:
    if isinstance(disk, NullDisk):
        blockdev = f"driver=null-co,node-name={DISK_NODE},size={disk.size}"
        return ["-blockdev", blockdev, "-device", f"virtio-blk-pci,drive={DISK_NODE},id={DISK_DEVICE}"]
    no_flush = ",cache.no-flush=on" if disk.ephemeral else ""
    remote: list[str] = []
    backing = ""
    if disk.backing is not None:
        b = disk.backing
        remote = ["-object", f"tls-creds-x509,id={NBD_TLS_ID},endpoint=client,dir={opt(b.tls_dir)}",
                  "-blockdev", f"driver=nbd,server.type=inet,server.host={opt(b.host)},server.port={int(b.port)},"
                               f"export={opt(b.export)},tls-creds={NBD_TLS_ID},tls-hostname={opt(b.server_name)},read-only=on,"
                               f"node-name={DISK_NODE}-backing"]
        backing = f",backing={DISK_NODE}-backing"
    return [
        *remote,
        "-blockdev", f"driver=file,filename={opt(disk.path)},node-name={DISK_NODE}-file{no_flush}",
        "-blockdev", f"driver=qcow2,file={DISK_NODE}-file,node-name={DISK_NODE}{backing}",
        "-device", f"virtio-blk-pci,drive={DISK_NODE},id={DISK_DEVICE}",
    ]


def nic_args(nic: Nic) -> list[str]:
    if nic.tap_fd is not None:
        netdev = f"tap,id={NET_ID},fd={nic.tap_fd},vhost=off"
    elif nic.tap is not None:
        netdev = f"tap,id={NET_ID},ifname={opt(nic.tap)},script=no,downscript=no,vhost=off"
    else:
        raise ValueError("a NIC needs a tap name or an open tap descriptor")
    return ["-netdev", netdev, "-device", f"virtio-net-pci,netdev={NET_ID},mac={opt(nic.mac)},id={NIC_DEVICE}"]


def balloon_args(spec: MachineSpec) -> list[str]:
    """The balloon only reports free pages: it is never inflated (hostd
    counts every VM at its full RAM, policy/admission.py)."""
    if not spec.free_page_reporting:
        return []
    return ["-device", f"virtio-balloon-pci,id={BALLOON_DEVICE},free-page-reporting=on"]


def vm_argv(
    spec: MachineSpec,
    *,
    name: str,
    ram_path: str,
    share_ram: bool,
    disk: Qcow2Disk | NullDisk,
    sockets: Sockets,
    serial_log: str,
    nic: Nic,
    vmgenid: str,
    incoming: str | None = None,
    paused: bool = False,
    prealloc: bool = False,
    qemu: str = QEMU_BINARY,
) -> list[str]:
    """The whole command line of one VM.

    incoming: None for a fresh boot, "defer" for a clone (the stream is given
    later with migrate-incoming, after x-ignore-shared is set), or a URI for the
    checkpoint receiver.
    """
    argv = [
        qemu, "-name", f"sfmpi:{opt(name)}",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", f"q35,memory-backend={RAM_BACKEND_ID}",
        *cpu_args(spec.accel),
        "-smp", str(spec.cpus),
        *ram_args(spec, ram_path, share_ram, prealloc),
        *boot_args(spec, incoming),
        *disk_args(disk),
        *nic_args(nic),
        # A new generation ID per clone tells the guest kernel to reseed its RNG.
        "-device", f"vmgenid,guid={vmgenid},id=vmgenid0",
        *balloon_args(spec),
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agent0,path={opt(sockets.agent)},server=on,wait=off",
        "-device", f"virtserialport,chardev=agent0,name={AGENT_PORT_NAME},id=agentport0",
        "-serial", f"file:{opt(serial_log)}",
        "-qmp", f"unix:{opt(sockets.qmp)},server=on,wait=off",
        "-no-reboot",
    ]
    if paused:
        argv.append("-S")
    if incoming is not None:
        argv += ["-incoming", incoming]
    return argv


@dataclass(frozen=True)
class Launch:
    """One VM to start, whichever driver starts it (hostd/vm/driver.py): what
    vm_argv takes, and what goes around the command line.

    A NIC with neither a tap name nor a descriptor is an unattached tap the
    driver makes (the checkpoint receiver's). env: variables QEMU runs with
    (a clone's preloaded shims). in_families_netns False: QEMU runs in hostd's
    own namespace (it reaches the hosts' network, for a remote disk).
    """
    spec: MachineSpec
    name: str
    ram_path: str
    share_ram: bool
    disk: Qcow2Disk | NullDisk
    sockets: Sockets
    serial_log: str
    nic: Nic
    vmgenid: str
    incoming: str | None = None
    paused: bool = False
    prealloc: bool = False
    env: tuple[tuple[str, str], ...] = ()
    in_families_netns: bool = True


def launch_argv(launch: Launch, nic: Nic | None = None) -> list[str]:
    """The direct driver's command line for `launch` (nic: the NIC as opened, if
    the driver opened it)."""
    argv = vm_argv(launch.spec, name=launch.name, ram_path=launch.ram_path, share_ram=launch.share_ram,
                   disk=launch.disk, sockets=launch.sockets, serial_log=launch.serial_log,
                   nic=nic or launch.nic, vmgenid=launch.vmgenid, incoming=launch.incoming,
                   paused=launch.paused, prealloc=launch.prealloc)
    return ["env", *(f"{k}={v}" for k, v in launch.env), *argv] if launch.env else argv


def remote_overlay_argv(path: str, backing: NbdBacking, size: int, qemu_img: str = "qemu-img") -> list[str]:
    """An overlay on a remote frozen disk (raw over NBD). -u: the backing is not
    opened here (it needs TLS credentials QEMU's command line gives it), so the
    size is given; the header's backing name is for people, QEMU gets the node."""
    url = f"nbd://{backing.host}:{int(backing.port)}/{backing.export}"
    return [qemu_img, "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", url, path, str(int(size))]


def overlay_argv(path: str, backing: str, qemu_img: str = "qemu-img") -> list[str]:
    """A qcow2 overlay whose reads fall through to `backing` (copy-on-write disk)."""
    return [qemu_img, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, path]


def probe_argv(accel: str, kernel: str, initrd: str, qemu: str = QEMU_BINARY) -> list[str]:
    """A guest that boots the kernel to the point of looking for init and panics.

    Reaching that point proves the accelerator really runs this kernel: PVM's
    /dev/kvm exists but hangs a stock kernel early in boot (docs/platform.md).
    """
    return [
        qemu, "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", "q35", *cpu_args(accel), "-m", "256M",
        "-kernel", kernel, "-initrd", initrd,
        "-append", "console=ttyS0 panic=-1 rdinit=/sfmpi-accel-probe",
        "-serial", "stdio", "-no-reboot",
    ]
