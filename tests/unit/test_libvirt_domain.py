"""The libvirt driver's pure parts: a parent's domain XML and the private
libvirtd's configuration (no libvirt needed: the XML is parsed here)."""
from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from sfmpi.hostd.vm.cmdline import MachineSpec, Nic, Qcow2Disk, Sockets
from sfmpi.hostd.vm.libvirt import daemon
from sfmpi.hostd.vm.libvirt.domain import QEMU_NS, Parent, domain_name, parent_xml

SPEC = MachineSpec(mem_mb=384, cpus=2, accel="tcg", kernel="/img/vmlinuz", initrd="/img/initrd.img",
                   append="root=/dev/vda rw console=ttyS0", disk_size=1 << 30, free_page_reporting=True)


def parent(**changes) -> Parent:
    base = dict(name="p", spec=SPEC, disk=Qcow2Disk("/home/disks/p-1.qcow2"),
                sockets=Sockets("/shm/p.qmp", "/shm/p.agent"), serial_log="/home/vms/p/serial.log",
                nic=Nic(mac="52:54:00:01:00:00", tap="sft1-0"), vmgenid="a91c4f13-2b03-41a3-b044-1b8656e9bf61")
    return Parent(**{**base, **changes})


def parsed(vm: Parent) -> ET.Element:
    return ET.fromstring(parent_xml(vm, domain_name("t1", vm.name)))


def test_a_parent_is_a_transient_domain_named_after_its_vm():
    d = parsed(parent())
    assert d.get("type") == "qemu" and d.findtext("name") == "sfmpi-t1-p"
    assert d.find("memory").attrib == {"unit": "MiB"} and d.findtext("memory") == "384"
    assert d.findtext("vcpu") == "2"
    assert d.find("os/type").attrib == {"arch": "x86_64", "machine": "q35"}
    assert (d.findtext("os/kernel"), d.findtext("os/initrd"), d.findtext("os/cmdline")) == \
        ("/img/vmlinuz", "/img/initrd.img", "root=/dev/vda rw console=ttyS0")
    assert d.find("cpu").get("mode") == "maximum"
    assert d.findtext("genid") == "a91c4f13-2b03-41a3-b044-1b8656e9bf61"
    assert [d.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3


def test_its_ram_is_libvirts_shared_file():
    d = parsed(parent())
    assert d.find("memoryBacking/source").get("type") == "file"
    assert d.find("memoryBacking/access").get("mode") == "shared"


def test_its_devices_are_the_direct_drivers():
    dev = parsed(parent()).find("devices")
    disk = dev.find("disk")
    assert disk.find("source").get("file") == "/home/disks/p-1.qcow2"
    assert disk.find("driver").attrib == {"name": "qemu", "type": "qcow2"}
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    nic = dev.find("interface")
    assert nic.get("type") == "ethernet" and nic.find("mac").get("address") == "52:54:00:01:00:00"
    assert nic.find("target").attrib == {"dev": "sft1-0", "managed": "no"} and nic.find("model").get("type") == "virtio"
    chan = dev.find("channel")
    assert chan.find("source").attrib == {"mode": "bind", "path": "/shm/p.agent"}
    assert chan.find("target").attrib == {"type": "virtio", "name": "org.sfmpi.0"}
    assert dev.find("serial/source").get("path") == "/home/vms/p/serial.log"
    assert dev.find("memballoon").attrib == {"model": "virtio", "freePageReporting": "on"}
    assert dev.find("controller").attrib == {"type": "usb", "model": "none"}
    assert parsed(parent(spec=MachineSpec(**{**SPEC.to_json(), "free_page_reporting": False}))) \
        .find("devices/memballoon").get("model") == "none"


def test_hostd_gets_its_own_qmp_monitor_and_commas_stay_in_the_path():
    args = [a.get("value") for a in parsed(parent(sockets=Sockets("/shm/a,b.qmp", "/shm/p.agent")))
            .findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    assert args == ["-qmp", "unix:/shm/a,,b.qmp,server=on,wait=off", "-no-reboot"]


def test_kvm_hosts_get_host_passthrough_without_arch_capabilities():
    d = parsed(parent(spec=MachineSpec(**{**SPEC.to_json(), "accel": "kvm"})))
    assert d.get("type") == "kvm"
    assert d.find("cpu").get("mode") == "host-passthrough"
    assert d.find("cpu/feature").attrib == {"policy": "disable", "name": "arch-capabilities"}


def test_text_is_escaped_not_interpreted():
    d = parsed(parent(spec=MachineSpec(**{**SPEC.to_json(), "append": "a=<b> & c='d'"})))
    assert d.findtext("os/cmdline") == "a=<b> & c='d'"


def test_a_nic_must_be_a_tap_by_name():
    with pytest.raises(ValueError, match="tap by name"):
        parent_xml(parent(nic=Nic(mac="52:54:00:01:00:00", tap_fd=7)), "sfmpi-t1-p")


def test_the_private_libvirtd_is_configured_for_sfmpis_qemus(tmp_path):
    conf = daemon.qemu_conf()
    for line in ('user = "root"', 'security_driver = "none"', "namespaces = [ ]", "cgroup_controllers = [ ]",
                 "dynamic_ownership = 0"):
        assert line in conf
    assert 'auth_unix_rw = "none"' in daemon.libvirtd_conf() and 'unix_sock_rw_perms = "0700"' in daemon.libvirtd_conf()
    script = daemon.start_script(tmp_path)
    for mine, system in daemon.SYSTEM_DIRS.items():
        assert f"mount --bind {tmp_path / mine} {system}\n" in script
    assert script.index("mount --make-rprivate /") < script.index("mount --bind")
    assert script.rstrip().endswith("exec libvirtd -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid")
    argv = daemon.start_argv(tmp_path, "/run/netns/sfmpi-x")
    assert argv[:4] == ["unshare", "--mount", "nsenter", "--net=/run/netns/sfmpi-x"]
    lv = daemon.LibvirtDaemon(tmp_path, "/run/netns/sfmpi-x")
    assert lv.uri == f"qemu+unix:///system?socket={tmp_path}/run/libvirt-sock"
    lv.stop()        # never started: nothing to end, and safe
    assert not Path(tmp_path / "run").exists()
