"""Pure builder of an sfmpi VM's libvirt domain XML (the libvirt driver's, issue 21).

What the direct driver says on QEMU's command line (hostd/vm/cmdline.py) is
said here in libvirt's elements where libvirt has them: memory and vCPUs,
direct kernel boot, the qcow2 disk, the NIC on the family's tap (opened by a
libvirtd that runs in hostd's network namespace), the agent's virtio-serial
port, the serial log, the generation ID, what happens at power-off and reboot,
the environment QEMU runs with. Where it has none, `<qemu:commandline>` adds
the QEMU options: the QMP monitor of hostd's own beside libvirt's (hostd's
checkpoint and clone steps speak QMP), the incoming migration, -no-reboot,
and the guest's RAM.

The RAM (docs/libvirt.md, "Why the RAM is sfmpi's"): libvirt's
`<memoryBacking>` makes a file of its own, in its own directory, under a name
hostd cannot choose, and a clone's RAM must be the checkpoint's RAM file
mapped privately (the receiver's, that file shared). So every sfmpi domain has
sfmpi's memory backend, the direct driver's `ram0` on the file hostd names,
and `-machine memory-backend=ram0` overrides libvirt's (QEMU merges -machine
options, the last wins); libvirt's own `pc.ram` stays an untouched anonymous
mapping. Parents, receivers and clones thus have the same RAM block and the
same devices at the same PCI addresses (one builder), and migration streams
load between them as between direct VMs.
"""
from __future__ import annotations

from dataclasses import dataclass
from xml.etree import ElementTree as ET

from ..cmdline import AGENT_PORT_NAME, DISK_DEVICE, RAM_BACKEND_ID, Launch, NullDisk, cpu_args, opt, ram_args

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
EMULATOR = "/usr/bin/qemu-system-x86_64"
DOMAIN_PREFIX = "sfmpi-"
# libvirt names a device it was given an alias for "ua-" + the alias (user aliases).
DISK_ALIAS = f"ua-{DISK_DEVICE}"

ET.register_namespace("qemu", QEMU_NS)


def domain_name(tag: str, vm: str) -> str:
    """The domain of VM `vm` of the hostd whose state directory has tag `tag`:
    named after the VM, and unique across state directories on one libvirtd."""
    return f"{DOMAIN_PREFIX}{tag}-{vm}"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    e = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        e.text = text
    return e


def domain_xml(vm: Launch, domain: str, null_disk: str | None = None, emulator: str = EMULATOR) -> str:
    """The transient domain of one VM, parent, receiver or clone (pure: the tests
    parse what it returns). null_disk: the sparse raw file standing in for a
    receiver's disk (libvirt has no null block driver; the file is never read)."""
    if vm.nic.tap_fd is not None or not vm.in_families_netns:
        raise ValueError("a libvirt domain's NIC is a tap libvirt opens in the families' namespace")
    if isinstance(vm.disk, NullDisk) and null_disk is None:
        raise ValueError("a receiver's domain needs a file for its never-read disk")
    if not isinstance(vm.disk, NullDisk) and vm.disk.backing is not None:
        raise ValueError("a libvirt domain's disk is a local file (no NBD backing)")
    spec = vm.spec
    root = ET.Element("domain", type="kvm" if spec.accel == "kvm" else "qemu")
    _sub(root, "name", domain)
    _sub(root, "title", f"sfmpi VM {vm.name}")
    _sub(root, "memory", str(spec.mem_mb), unit="MiB")
    _sub(root, "vcpu", str(spec.cpus))
    os_ = _sub(root, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine="q35")
    # Every role boots the same way: the kernel loader's option ROM is a RAM
    # block of the migration stream, so a clone must have it too.
    _sub(os_, "kernel", spec.kernel)
    _sub(os_, "initrd", spec.initrd)
    _sub(os_, "cmdline", spec.append)
    # A new generation ID per VM tells the guest kernel to reseed its RNG (as -device vmgenid).
    _sub(root, "genid", vm.vmgenid)
    for event in ("on_poweroff", "on_reboot", "on_crash"):
        _sub(root, event, "destroy")
    devices = _sub(root, "devices")
    _sub(devices, "emulator", emulator)
    _sub(devices, "controller", type="usb", model="none")
    if spec.free_page_reporting:
        _sub(devices, "memballoon", model="virtio", freePageReporting="on")
    else:
        _sub(devices, "memballoon", model="none")
    disk = _sub(devices, "disk", type="file", device="disk")
    if isinstance(vm.disk, NullDisk):
        _sub(disk, "driver", name="qemu", type="raw")
        _sub(disk, "source", file=null_disk)
    else:
        _sub(disk, "driver", name="qemu", type="qcow2", **({"cache": "unsafe"} if vm.disk.ephemeral else {}))
        _sub(disk, "source", file=vm.disk.path)
    _sub(disk, "target", dev="vda", bus="virtio")
    _sub(disk, "alias", name=DISK_ALIAS)   # hostd finds the disk by it (throttling, checkpoints)
    nic = _sub(devices, "interface", type="ethernet")
    _sub(nic, "mac", address=vm.nic.mac)
    if vm.nic.tap is not None:
        _sub(nic, "target", dev=vm.nic.tap, managed="no")
    # else (the receiver's): libvirt makes a tap of its own, on no bridge, and removes it with the domain.
    _sub(nic, "model", type="virtio")
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "source", mode="bind", path=vm.sockets.agent)
    _sub(channel, "target", type="virtio", name=AGENT_PORT_NAME)
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=vm.serial_log)
    _sub(serial, "target", port="0")
    extra = _sub(root, f"{{{QEMU_NS}}}commandline")
    args = ["-qmp", f"unix:{opt(vm.sockets.qmp)},server=on,wait=off", "-no-reboot",
            # The CPU exactly as the direct driver gives it, and no <cpu>
            # element for libvirt to compare and update (docs/libvirt.md);
            # QEMU takes the last -cpu it is given.
            *cpu_args(spec.accel)[2:],
            *ram_args(spec, vm.ram_path, vm.share_ram, vm.prealloc)[2:],   # libvirt gives -m
            "-machine", f"memory-backend={RAM_BACKEND_ID}"]
    if vm.incoming is not None:
        args += ["-incoming", vm.incoming]
    for arg in args:
        _sub(extra, f"{{{QEMU_NS}}}arg", value=arg)
    for name, value in vm.env:
        _sub(extra, f"{{{QEMU_NS}}}env", name=name, value=value)
    return ET.tostring(root, encoding="unicode")
