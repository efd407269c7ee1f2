"""The QEMU command-line builders: parent, clone and receiver share one machine."""
from __future__ import annotations

import json

import pytest

from sfmpi.hostd.vm.cmdline import (AGENT_PORT_NAME, LINUX_BOOT_ROM, MachineSpec, Nic, NullDisk, Qcow2Disk, Sockets,
                                      Launch, cpu_args, launch_argv, nic_args, overlay_argv, probe_argv, vm_argv)

SPEC = MachineSpec(mem_mb=512, cpus=2, accel="tcg", kernel="/img/vmlinuz", initrd="/img/initrd.img",
                   append="root=/dev/vda rw", disk_size=3 << 30)


def _argv(spec=SPEC, **kw):
    base = dict(name="vm1", ram_path="/shm/ram", share_ram=True, disk=Qcow2Disk("/d/vm1.qcow2"),
                sockets=Sockets(qmp="/s/qmp.sock", agent="/s/agent.sock"), serial_log="/s/serial.log",
                nic=Nic(mac="0a:5f:00:01:00:00", tap="sft1x0"), vmgenid="11111111-2222-3333-4444-555555555555")
    base.update(kw)
    return vm_argv(spec, **base)


def parent():
    return _argv()


def clone():
    return _argv(name="c1", ram_path="/ck/ram", share_ram=False, disk=Qcow2Disk("/d/c1.qcow2"),
                 incoming="defer")


def receiver():
    return _argv(name="rx", ram_path="/ck/ram", share_ram=True, disk=NullDisk(SPEC.disk_size),
                 paused=True, incoming="unix:/s/rx-migrate.sock")


def opt(argv, flag):
    """Every value following `flag`."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def ram_object(argv):
    objs = [o for o in opt(argv, "-object") if o.startswith("memory-backend-file,")]
    assert len(objs) == 1
    return dict(kv.split("=", 1) for kv in objs[0].split(",")[1:])


def machine_parts(argv):
    ram = ram_object(argv)
    ram.pop("mem-path"), ram.pop("share")
    return {
        "machine": opt(argv, "-machine"), "m": opt(argv, "-m"), "smp": opt(argv, "-smp"),
        "accel": opt(argv, "-accel"), "cpu": opt(argv, "-cpu"), "ram": ram,
        "devices": opt(argv, "-device"), "nodefaults": "-nodefaults" in argv,
    }


def test_parent_shares_ram_boots_from_qcow2_without_incoming():
    a = parent()
    assert a[0] == "qemu-system-x86_64"
    ram = ram_object(a)
    assert ram == {"id": "ram0", "size": "512M", "mem-path": "/shm/ram", "share": "on"}
    assert "driver=file,filename=/d/vm1.qcow2,node-name=disk0-file" in opt(a, "-blockdev")
    assert "driver=qcow2,file=disk0-file,node-name=disk0" in opt(a, "-blockdev")
    assert "-incoming" not in a and "-S" not in a
    assert opt(a, "-name") == ["sfmpi:vm1"]
    assert opt(a, "-qmp") == ["unix:/s/qmp.sock,server=on,wait=off"]
    assert opt(a, "-serial") == ["file:/s/serial.log"]


def test_clone_has_private_ram_and_deferred_incoming():
    a = clone()
    assert ram_object(a)["share"] == "off"
    assert ram_object(a)["mem-path"] == "/ck/ram"
    assert opt(a, "-incoming") == ["defer"]
    assert "-S" not in a
    assert "driver=file,filename=/d/c1.qcow2,node-name=disk0-file" in opt(a, "-blockdev")


def test_receiver_uses_null_disk_paused_and_unix_incoming():
    a = receiver()
    assert opt(a, "-blockdev") == [f"driver=null-co,node-name=disk0,size={SPEC.disk_size}"]
    assert "-S" in a
    assert opt(a, "-incoming") == ["unix:/s/rx-migrate.sock"]
    assert not any("qcow2" in b for b in opt(a, "-blockdev"))


def test_machine_is_identical_for_parent_clone_and_receiver():
    p, c, r = machine_parts(parent()), machine_parts(clone()), machine_parts(receiver())
    assert p == c == r
    assert p["machine"] == ["q35,memory-backend=ram0"]
    assert p["m"] == ["512M"] and p["smp"] == ["2"]
    devices = p["devices"]
    assert "virtio-blk-pci,drive=disk0,id=vblk0" in devices
    assert "virtio-serial-pci,id=vser0" in devices
    assert f"virtserialport,chardev=agent0,name={AGENT_PORT_NAME},id=agentport0" in devices
    assert AGENT_PORT_NAME == "org.sfmpi.0"


def test_only_a_fresh_boot_loads_kernel_and_initrd():
    p = parent()
    assert opt(p, "-kernel") == ["/img/vmlinuz"] and opt(p, "-initrd") == ["/img/initrd.img"]
    assert opt(p, "-append") == ["root=/dev/vda rw"] and "-option-rom" not in p
    # A VM loading a stream gets only the RAM block -kernel would have added.
    for a in (clone(), receiver()):
        assert opt(a, "-option-rom") == [LINUX_BOOT_ROM]
        assert not {"-kernel", "-initrd", "-append"} & set(a)


def test_different_spec_changes_machine_parts():
    other = MachineSpec(**{**SPEC.to_json(), "mem_mb": 1024})
    assert machine_parts(_argv(other)) != machine_parts(parent())
    assert opt(_argv(other), "-m") == ["1024M"]


def test_cpu_args():
    assert cpu_args("kvm") == ["-accel", "kvm", "-cpu", "host,-arch-capabilities"]
    assert cpu_args("tcg") == ["-accel", "tcg", "-cpu", "max"]
    kvm = _argv(MachineSpec(**{**SPEC.to_json(), "accel": "kvm"}))
    assert opt(kvm, "-accel") == ["kvm"] and opt(kvm, "-cpu") == ["host,-arch-capabilities"]


def test_overlay_argv():
    assert overlay_argv("/d/top.qcow2", "/d/base.qcow2") == [
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "/d/base.qcow2", "/d/top.qcow2"]
    assert overlay_argv("a", "b", qemu_img="/opt/qemu-img")[0] == "/opt/qemu-img"


def test_probe_argv():
    a = probe_argv("kvm", "/k", "/i")
    assert a[0] == "qemu-system-x86_64"
    assert opt(a, "-accel") == ["kvm"] and opt(a, "-cpu") == ["host,-arch-capabilities"]
    assert opt(a, "-kernel") == ["/k"] and opt(a, "-initrd") == ["/i"]
    assert "panic=-1" in opt(a, "-append")[0]
    assert "-no-reboot" in a and opt(a, "-serial") == ["stdio"]
    assert opt(probe_argv("tcg", "/k", "/i", qemu="/q"), "-cpu") == ["max"]


def test_machine_spec_json_round_trip():
    d = json.loads(json.dumps(SPEC.to_json()))
    assert MachineSpec.from_json(d) == SPEC
    assert MachineSpec.from_json({**d, "extra": 1}) == SPEC


def test_nic_on_named_tap_or_inherited_fd():
    named = nic_args(Nic(mac="0a:5f:00:01:00:03", tap="sft1x3"))
    assert named == ["-netdev", "tap,id=net0,ifname=sft1x3,script=no,downscript=no,vhost=off",
                     "-device", "virtio-net-pci,netdev=net0,mac=0a:5f:00:01:00:03,id=nic0"]
    by_fd = nic_args(Nic(mac="0a:5f:00:01:00:00", tap_fd=7))
    assert by_fd[1] == "tap,id=net0,fd=7,vhost=off"
    with pytest.raises(ValueError):
        nic_args(Nic(mac="0a:5f:00:01:00:00"))


def test_every_vm_has_nic_and_vmgenid_with_its_own_guid():
    argv = _argv(vmgenid="abcdefab-0000-0000-0000-000000000001")
    assert "vmgenid,guid=abcdefab-0000-0000-0000-000000000001,id=vmgenid0" in argv
    assert any(a.startswith("virtio-net-pci,") for a in argv)


def test_only_an_ephemeral_disk_ignores_guest_flushes():
    assert not any("no-flush" in x for x in parent())
    a = _argv(name="c1", ram_path="/ck/ram", share_ram=False, disk=Qcow2Disk("/d/c1.qcow2", ephemeral=True),
              incoming="defer")
    assert "driver=file,filename=/d/c1.qcow2,node-name=disk0-file,cache.no-flush=on" in opt(a, "-blockdev")


def test_a_comma_in_a_path_is_doubled_and_adds_no_option():
    from sfmpi.hostd.vm.cmdline import opt
    assert opt("/a,share=on/b") == "/a,,share=on/b"
    spec = MachineSpec(mem_mb=64, cpus=1, accel="tcg", kernel="/k", initrd="/i", append="x", disk_size=1 << 20)
    argv = vm_argv(spec, name="v", ram_path="/r,share=on", share_ram=False, disk=Qcow2Disk("/d,x=1.qcow2"),
                   sockets=Sockets("/q,a", "/g,b"), serial_log="/s,l", nic=Nic(mac="0a:5f:00:01:00:00", tap="t"),
                   vmgenid="00000000-0000-0000-0000-000000000000")
    ram = argv[argv.index("-object") + 1]
    assert "mem-path=/r,,share=on,share=off" in ram
    assert "filename=/d,,x=1.qcow2," in " ".join(argv)
    assert "unix:/q,,a,server=on,wait=off" in argv and "file:/s,,l" in argv


def test_a_parent_reports_free_pages_through_a_balloon_only_when_its_spec_says_so():
    from sfmpi.hostd.vm.cmdline import balloon_args
    assert balloon_args(SPEC) == []
    on = MachineSpec(**{**SPEC.to_json(), "free_page_reporting": True})
    assert balloon_args(on) == ["-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on"]
    argv = _argv(on)
    assert "virtio-balloon-pci,id=balloon0,free-page-reporting=on" in argv
    assert not any("balloon" in a for a in _argv(SPEC))


def test_a_spec_from_before_free_page_reporting_loads_without_it():
    old = {k: v for k, v in SPEC.to_json().items() if k != "free_page_reporting"}
    assert MachineSpec.from_json(old) == SPEC and not MachineSpec.from_json(old).free_page_reporting
    with pytest.raises(KeyError):
        MachineSpec.from_json({k: v for k, v in old.items() if k != "mem_mb"})


def test_a_clone_gets_the_shims_it_needs():
    from sfmpi.hostd.fork.cloner import clone_env
    from sfmpi.native import keepram_path, nothp_path
    assert clone_env("/ck/ram", served=False, reports_free_pages=False) == ()
    assert clone_env("/mt/ram", served=True, reports_free_pages=False) == (("LD_PRELOAD", nothp_path()),)
    env = clone_env("/mt/ram", served=True, reports_free_pages=True)
    assert env == (("LD_PRELOAD", f"{nothp_path()}:{keepram_path()}"), ("SFMPI_KEEP_FILE", "/mt/ram"))
    # The direct driver says it with env(1) in front of QEMU.
    spec = MachineSpec(mem_mb=256, cpus=1, accel="tcg", kernel="/k", initrd="/i", append="", disk_size=1 << 30)
    launch = Launch(spec, name="c", ram_path="/mt/ram", share_ram=False, disk=Qcow2Disk("/d.qcow2"),
                    sockets=Sockets("/q", "/a"), serial_log="/s", nic=Nic(mac="52:54:00:01:00:01", tap="t"),
                    vmgenid="x", incoming="defer", env=env)
    argv = launch_argv(launch)
    assert argv[:3] == ["env", f"LD_PRELOAD={nothp_path()}:{keepram_path()}", "SFMPI_KEEP_FILE=/mt/ram"]
    assert argv[3].startswith("qemu-system") and argv[argv.index("-incoming") + 1] == "defer"