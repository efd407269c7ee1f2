"""Pure builder of an sfmpi VM's libvirt domain XML (the libvirt driver's, issue 21).

What the direct driver says on QEMU's command line (hostd/vm/cmdline.py) is
said here in libvirt's elements where libvirt has them: memory and vCPUs,
direct kernel boot, the qcow2 disk, the NIC on the family's tap (opened by a
libvirtd that runs in hostd's network namespace), the agent's virtio-serial
port, the serial log, the generation ID, what happens at power-off and reboot.
Where it has none, `<qemu:commandline>` adds the QEMU options: the QMP monitor
of hostd's own beside libvirt's (hostd's checkpoint and clone steps speak QMP),
and -no-reboot. docs/platform.md ("libvirt 9.0") has what was measured.

A parent's RAM is libvirt's file-backed shared memory
(`<memoryBacking><source type='file'/><access mode='shared'/>`): QEMU's
memory-backend-file `pc.ram`, in libvirt's memory directory, whose path hostd
asks QEMU for (qom-get /objects/pc.ram mem-path) when it checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass
from xml.etree import ElementTree as ET

from ..cmdline import AGENT_PORT_NAME, MachineSpec, Nic, Qcow2Disk, Sockets, opt

QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
EMULATOR = "/usr/bin/qemu-system-x86_64"
# The memory backend libvirt makes for a domain's RAM: its id is the RAM block's name in a migration stream.
RAM_BACKEND_ID = "pc.ram"
DOMAIN_PREFIX = "sfmpi-"

ET.register_namespace("qemu", QEMU_NS)


@dataclass(frozen=True)
class Parent:
    """A VM booted from an image, RAM in a shared file of libvirt's."""
    name: str                  # the VM's name in sfmpi
    spec: MachineSpec
    disk: Qcow2Disk
    sockets: Sockets
    serial_log: str
    nic: Nic
    vmgenid: str


def domain_name(tag: str, vm: str) -> str:
    """The domain of VM `vm` of the hostd whose state directory has tag `tag`:
    named after the VM, and unique across state directories on one libvirtd."""
    return f"{DOMAIN_PREFIX}{tag}-{vm}"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    e = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items()})
    if text is not None:
        e.text = text
    return e


def _cpu(domain: ET.Element, accel: str) -> None:
    if accel == "kvm":
        # As the direct driver's -cpu host,-arch-capabilities (docs/platform.md: PVM hosts).
        cpu = _sub(domain, "cpu", mode="host-passthrough", check="none")
        _sub(cpu, "feature", policy="disable", name="arch-capabilities")
    else:
        _sub(domain, "cpu", mode="maximum", check="none")   # QEMU's -cpu max


def parent_xml(vm: Parent, domain: str, emulator: str = EMULATOR) -> str:
    """The transient domain of a parent VM (pure: the tests parse what it returns)."""
    if vm.nic.tap is None:
        raise ValueError("a libvirt domain's NIC is a tap by name (libvirt opens it)")
    spec = vm.spec
    root = ET.Element("domain", type="kvm" if spec.accel == "kvm" else "qemu")
    _sub(root, "name", domain)
    _sub(root, "title", f"sfmpi VM {vm.name}")
    _sub(root, "memory", str(spec.mem_mb), unit="MiB")
    _sub(root, "vcpu", str(spec.cpus))
    backing = _sub(root, "memoryBacking")
    _sub(backing, "source", type="file")
    _sub(backing, "access", mode="shared")
    os_ = _sub(root, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine="q35")
    _sub(os_, "kernel", spec.kernel)
    _sub(os_, "initrd", spec.initrd)
    _sub(os_, "cmdline", spec.append)
    _cpu(root, spec.accel)
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
    _sub(disk, "driver", name="qemu", type="qcow2", **({"cache": "unsafe"} if vm.disk.ephemeral else {}))
    _sub(disk, "source", file=vm.disk.path)
    _sub(disk, "target", dev="vda", bus="virtio")
    nic = _sub(devices, "interface", type="ethernet")
    _sub(nic, "mac", address=vm.nic.mac)
    _sub(nic, "target", dev=vm.nic.tap, managed="no")
    _sub(nic, "model", type="virtio")
    channel = _sub(devices, "channel", type="unix")
    _sub(channel, "source", mode="bind", path=vm.sockets.agent)
    _sub(channel, "target", type="virtio", name=AGENT_PORT_NAME)
    serial = _sub(devices, "serial", type="file")
    _sub(serial, "source", path=vm.serial_log)
    _sub(serial, "target", port="0")
    extra = _sub(root, f"{{{QEMU_NS}}}commandline")
    for arg in ("-qmp", f"unix:{opt(vm.sockets.qmp)},server=on,wait=off", "-no-reboot"):
        _sub(extra, f"{{{QEMU_NS}}}arg", value=arg)
    return ET.tostring(root, encoding="unicode")

