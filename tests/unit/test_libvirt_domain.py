"""The libvirt driver's pure parts: the domain XML of a parent, a receiver and
a clone, and the private libvirtd's configuration (no libvirt needed: the XML
is parsed here)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from sfmpi.hostd.vm.cmdline import Launch, MachineSpec, NbdBacking, Nic, NullDisk, Qcow2Disk, Sockets, launch_argv
from sfmpi.hostd.vm.libvirt import daemon
from sfmpi.hostd.vm.libvirt.domain import QEMU_NS, domain_name, domain_xml

SPEC = MachineSpec(mem_mb=384, cpus=2, accel="tcg", kernel="/img/vmlinuz", initrd="/img/initrd.img",
                   append="root=/dev/vda rw console=ttyS0", disk_size=1 << 30, free_page_reporting=True)


def parent(**changes) -> Launch:
    base = dict(name="p", spec=SPEC, ram_path="/shm/p.ram", share_ram=True, disk=Qcow2Disk("/home/disks/p-1.qcow2"),
                sockets=Sockets("/shm/p.qmp", "/shm/p.agent"), serial_log="/home/vms/p/serial.log",
                nic=Nic(mac="52:54:00:01:00:00", tap="sft1-0"), vmgenid="a91c4f13-2b03-41a3-b044-1b8656e9bf61",
                prealloc=True)
    return Launch(**{**base, **changes})


def clone(**changes) -> Launch:
    base = dict(name="p-1", ram_path="/home/checkpoints/c1/ram", share_ram=False,
                disk=Qcow2Disk("/home/disks/p-1-7.qcow2", ephemeral=True), prealloc=False,
                sockets=Sockets("/shm/p-1.qmp", "/shm/p-1.agent"), incoming="defer",
                nic=Nic(mac="52:54:00:01:00:01", tap="sft1-1"),
                env=(("LD_PRELOAD", "/lib/keepram.so"), ("SFMPI_KEEP_FILE", "/home/checkpoints/c1/ram")))
    return dataclasses.replace(parent(), **{**base, **changes})


def receiver() -> Launch:
    return dataclasses.replace(parent(), name="r", ram_path="/home/checkpoints/c2/ram", disk=NullDisk(1 << 30),
                               nic=Nic(mac="52:54:00:01:00:00"), incoming="unix:/shm/r.mig", paused=True,
                               prealloc=False)


def parsed(vm: Launch, null_disk: str | None = None) -> ET.Element:
    return ET.fromstring(domain_xml(vm, domain_name("t1", vm.name), null_disk))


def qemu_args(d: ET.Element) -> list[str]:
    return [a.get("value") for a in d.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]


def test_a_parent_is_a_transient_domain_named_after_its_vm():
    d = parsed(parent())
    assert d.get("type") == "qemu" and d.findtext("name") == "sfmpi-t1-p"
    assert d.find("memory").attrib == {"unit": "MiB"} and d.findtext("memory") == "384"
    assert d.findtext("vcpu") == "2"
    assert d.find("os/type").attrib == {"arch": "x86_64", "machine": "q35"}
    assert (d.findtext("os/kernel"), d.findtext("os/initrd"), d.findtext("os/cmdline")) == \
        ("/img/vmlinuz", "/img/initrd.img", "root=/dev/vda rw console=ttyS0")
    assert d.find("cpu") is None   # the CPU is hostd's -cpu, as under the direct driver
    cpu = qemu_args(d).index("-cpu")
    assert qemu_args(d)[cpu + 1] == "max"
    assert d.findtext("genid") == "a91c4f13-2b03-41a3-b044-1b8656e9bf61"
    assert [d.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy"] * 3


def test_its_ram_is_sfmpis_file_shared_and_preallocated_as_under_the_direct_driver():
    d = parsed(parent())
    assert d.find("memoryBacking") is None
    args = qemu_args(d)
    ram = args[args.index("-object") + 1]
    assert ram == launch_argv(parent())[launch_argv(parent()).index("-object") + 1]
    assert ram.startswith("memory-backend-file,id=ram0,size=384M,mem-path=/shm/p.ram,share=on")
    assert "prealloc=on" in ram
    assert args[args.index("-machine") + 1] == "memory-backend=ram0"


def test_a_clone_maps_the_checkpoints_ram_privately_waits_for_its_state_and_gets_its_shims():
    d = parsed(clone())
    args = qemu_args(d)
    ram = args[args.index("-object") + 1]
    assert "mem-path=/home/checkpoints/c1/ram,share=off" in ram and "prealloc" not in ram
    assert args[args.index("-incoming") + 1] == "defer"
    env = {e.get("name"): e.get("value") for e in d.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}env")}
    assert env == {"LD_PRELOAD": "/lib/keepram.so", "SFMPI_KEEP_FILE": "/home/checkpoints/c1/ram"}
    disk = d.find("devices/disk")
    assert disk.find("driver").get("cache") == "unsafe" and disk.find("alias").get("name") == "ua-vblk0"
    assert d.find("devices/interface/target").get("dev") == "sft1-1"


def test_a_receiver_has_a_raw_never_read_disk_and_a_tap_of_libvirts():
    d = parsed(receiver(), null_disk="/home/vms/r/null-disk.raw")
    disk = d.find("devices/disk")
    assert disk.find("driver").attrib == {"name": "qemu", "type": "raw"}
    assert disk.find("source").get("file") == "/home/vms/r/null-disk.raw"
    assert d.find("devices/interface/target") is None      # libvirt makes the tap, on no bridge
    args = qemu_args(d)
    assert args[args.index("-incoming") + 1] == "unix:/shm/r.mig"
    assert "mem-path=/home/checkpoints/c2/ram,share=on" in args[args.index("-object") + 1]
    with pytest.raises(ValueError, match="never-read disk"):
        domain_xml(receiver(), "sfmpi-t1-r")


def test_parent_receiver_and_clone_have_the_same_devices_in_the_same_order():
    """A migration stream loads only into the same devices (one builder for every role)."""
    def shape(d: ET.Element) -> list[tuple]:
        return [(e.tag, e.get("type"), e.get("model"), e.get("device")) for e in d.find("devices")]
    assert shape(parsed(parent())) == shape(parsed(clone())) == shape(parsed(receiver(), "/n.raw"))


def test_its_devices_are_the_direct_drivers():
    dev = parsed(parent()).find("devices")
    disk = dev.find("disk")
    assert disk.find("source").get("file") == "/home/disks/p-1.qcow2"
    assert disk.find("driver").attrib == {"name": "qemu", "type": "qcow2"}
    assert disk.find("alias").get("name") == "ua-vblk0"   # hostd finds the disk by it
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
    args = qemu_args(parsed(parent(sockets=Sockets("/shm/a,b.qmp", "/shm/p.agent"))))
    assert args[:3] == ["-qmp", "unix:/shm/a,,b.qmp,server=on,wait=off", "-no-reboot"]


def test_kvm_hosts_get_the_host_cpu_without_arch_capabilities():
    d = parsed(parent(spec=MachineSpec(**{**SPEC.to_json(), "accel": "kvm"})))
    assert d.get("type") == "kvm" and d.find("cpu") is None
    args = qemu_args(d)
    assert args[args.index("-cpu") + 1] == "host,-arch-capabilities"


def test_text_is_escaped_not_interpreted():
    d = parsed(parent(spec=MachineSpec(**{**SPEC.to_json(), "append": "a=<b> & c='d'"})))
    assert d.findtext("os/cmdline") == "a=<b> & c='d'"


def test_what_libvirt_cannot_run_is_refused():
    with pytest.raises(ValueError, match="tap libvirt opens"):
        domain_xml(parent(nic=Nic(mac="52:54:00:01:00:00", tap_fd=7)), "sfmpi-t1-p")
    with pytest.raises(ValueError, match="tap libvirt opens"):
        domain_xml(parent(in_families_netns=False), "sfmpi-t1-p")
    nbd = Qcow2Disk("/d.qcow2", ephemeral=True, backing=NbdBacking(host="10.0.0.1", port=10809, export="e",
                                                                   tls_dir="/t", server_name="h2"))
    with pytest.raises(ValueError, match="no NBD"):
        domain_xml(clone(disk=nbd), "sfmpi-t1-p-1")


def test_the_private_libvirtd_is_configured_for_sfmpis_qemus(tmp_path):
    conf = daemon.qemu_conf()
    for line in ('user = "root"', 'security_driver = "none"', "namespaces = [ ]", "cgroup_controllers = [ ]",
                 "seccomp_sandbox = 0",
                 "dynamic_ownership = 0"):
        assert line in conf
    assert 'auth_unix_rw = "none"' in daemon.libvirtd_conf() and 'unix_sock_rw_perms = "0700"' in daemon.libvirtd_conf()
    script = daemon.start_script(tmp_path)
    for mine, system in daemon.SYSTEM_DIRS.items():
        assert f"mount --bind {tmp_path / mine} {system}\n" in script
    assert "make-rprivate" not in script      # a private namespace would not see memtap's later mounts
    assert script.rstrip().endswith("exec libvirtd -f /etc/libvirt/libvirtd.conf -p /run/libvirt/libvirtd.pid")
    argv = daemon.start_argv(tmp_path, "/run/netns/sfmpi-x")
    assert argv[:6] == ["unshare", "--mount", "--propagation", "slave", "nsenter", "--net=/run/netns/sfmpi-x"]
    # A shared directory: bound over itself, then shared, so that libvirtd's slave namespace gets its mounts.
    assert daemon.share_argvs(tmp_path / "memory") == [
        ["mount", "--bind", f"{tmp_path}/memory", f"{tmp_path}/memory"],
        ["mount", "--make-shared", f"{tmp_path}/memory"]]
    lv = daemon.LibvirtDaemon(tmp_path, "/run/netns/sfmpi-x")
    assert lv.uri == f"qemu+unix:///system?socket={tmp_path}/run/libvirt-sock"
    lv.stop()        # never started: nothing to end, and safe
    assert not Path(tmp_path / "run").exists()
