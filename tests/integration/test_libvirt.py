"""The libvirt driver's parts on a real libvirtd (issue 21, in progress): the
private libvirtd and virtlogd in a network namespace and a mount namespace of
their own, and a parent VM as the transient domain parent_xml() describes,
booted from the sfmpi image under TCG. Seen by virsh, reached over hostd's own
QMP monitor and the agent's channel; nothing is left after."""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import psutil
import pytest
from qemu.qmp import QMPClient

from sfmpi.hostd.guestapi.channel import AgentChannel
from sfmpi.hostd.vm.cmdline import MachineSpec, Nic, Qcow2Disk, Sockets, overlay_argv
from sfmpi.hostd.vm.libvirt.daemon import LibvirtDaemon
from sfmpi.hostd.vm.libvirt.domain import Parent, domain_name, parent_xml

pytestmark = [pytest.mark.libvirt, pytest.mark.timeout(600)]


@pytest.fixture
def netns():
    name = f"sfmpi-lv{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "tuntap", "add", "sft1x0", "mode", "tap"], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "sft1x0", "up"], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=True)


def virsh(lv: LibvirtDaemon, *args: str) -> str:
    return subprocess.run(["virsh", "-c", lv.uri, *args], capture_output=True, text=True, check=True,
                          timeout=60).stdout


def test_a_parent_runs_as_a_libvirt_domain_on_the_private_libvirtd(netns):
    from sfmpi.image import Image, default_image
    img = Image.load(default_image())
    work = Path(tempfile.mkdtemp(prefix="sfmpi-lvt-", dir="/tmp"))
    lv = LibvirtDaemon(work / "libvirt", f"/run/netns/{netns}")
    domain = domain_name("t", "p")
    try:
        lv.start()
        assert virsh(lv, "list", "--all", "--name").strip() == ""
        subprocess.run(overlay_argv(str(work / "p.qcow2"), str(img.disk)), check=True)
        spec = MachineSpec(mem_mb=256, cpus=1, accel="tcg", kernel=str(img.kernel), initrd=str(img.initrd),
                           append=img.append, disk_size=img.virtual_size)
        vm = Parent(name="p", spec=spec, disk=Qcow2Disk(str(work / "p.qcow2")),
                    sockets=Sockets(str(work / "p.qmp"), str(work / "p.agent")), serial_log=str(work / "serial.log"),
                    nic=Nic(mac="52:54:00:01:00:00", tap="sft1x0"), vmgenid=str(uuid.uuid4()))
        (work / "p.xml").write_text(parent_xml(vm, domain))
        virsh(lv, "create", str(work / "p.xml"))
        assert virsh(lv, "list", "--name").split() == [domain]
        info = dict(line.split(":", 1) for line in virsh(lv, "dominfo", domain).splitlines() if ":" in line)
        assert info["Max memory"].strip() == "262144 KiB" and info["Persistent"].strip() == "no"
        pid = int((work / "libvirt" / "run" / "qemu" / f"{domain}.pid").read_text())
        # QEMU is in the namespace the daemon was started in, with the tap libvirt opened there.
        with open(f"/run/netns/{netns}") as ns:
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.fstat(ns.fileno()).st_ino

        async def talk() -> tuple[dict, str, dict]:
            qmp = QMPClient("p")         # hostd's own monitor, beside libvirt's
            await qmp.connect(vm.sockets.qmp)
            try:
                status = await qmp.execute("query-status")
                ram = await qmp.execute("qom-get", {"path": "/objects/pc.ram", "property": "mem-path"})
            finally:
                await qmp.disconnect()
            agent = AgentChannel("p", vm.sockets.agent)
            await agent.connect()
            try:
                ready = await agent.wait_ready(240)
            finally:
                await agent.close()
            return status, ram, ready
        status, ram, ready = asyncio.run(talk())
        assert status["status"] == "running"
        # libvirt's shared RAM file, in its memory directory (our bind of /var/lib/libvirt).
        assert ram.startswith("/var/lib/libvirt/qemu/ram/") and ram.endswith("/pc.ram")
        assert ready.get("hostname"), ready
        virsh(lv, "destroy", domain)
        assert virsh(lv, "list", "--all", "--name").strip() == ""
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        if lv.alive():   # a failure above may have left the domain running: libvirtd's end would not end it
            subprocess.run(["virsh", "-c", lv.uri, "destroy", domain], capture_output=True, timeout=60)
        lv.stop()
        left = [p.info["name"] for p in psutil.process_iter(["name", "cmdline"])
                if str(work) in " ".join(p.info["cmdline"] or [])
                or (p.info["name"] in ("libvirtd", "virtlogd") and str(work) in _mounts_of(p.pid))]
        assert not lv.alive() and left == [], left
        assert str(work) not in Path("/proc/self/mountinfo").read_text()
        shutil.rmtree(work, ignore_errors=True)


def _mounts_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/mountinfo").read_text()
    except OSError:
        return ""
