"""Checkpoint manifests: write/load round trip, and every kind of damage is named."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from sfmpi.errors import CheckpointError
from sfmpi.hostd.fork.capture import pause_from_events
from sfmpi.hostd.fork.manifest import Checkpoint
from sfmpi.hostd.vm.cmdline import MachineSpec

SPEC = MachineSpec(mem_mb=64, cpus=1, accel="tcg", kernel="/k", initrd="/i", append="x", disk_size=1 << 30)
STATE = b"QEVM device state \x00\x01\x02" * 100
RAM_SIZE = 64 << 20


@pytest.fixture
def ckpt(tmp_path) -> Checkpoint:
    d = tmp_path / "checkpoints" / "ck-1"
    d.mkdir(parents=True)
    (d / "state").write_bytes(STATE)
    with open(d / "ram", "wb") as f:
        f.truncate(RAM_SIZE)  # sparse: all holes
    disks = tmp_path / "disks"
    disks.mkdir()
    chain = [disks / "base.qcow2", disks / "mid.qcow2"]
    for p in chain + [disks / "top.qcow2"]:
        p.write_bytes(b"QFI\xfb")
    c = Checkpoint(
        id="ck-1", vm="vm1", path=str(d), machine=SPEC.to_json(), disk=str(disks / "top.qcow2"),
        disk_chain=tuple(map(str, chain)), state_sha256=hashlib.sha256(STATE).hexdigest(),
        state_size=len(STATE), ram_size=RAM_SIZE, ram_allocated=os.stat(d / "ram").st_blocks * 512,
        mode="precopy", pause_ms=12.5, qemu_version="QEMU emulator version 7.2.0",
        created=1700000000.123456, timings={"precopy_ms": 40.0}, family="fam")
    c.write()
    return c


def load_error(ckpt) -> str:
    with pytest.raises(CheckpointError) as ei:
        Checkpoint.load(ckpt.path)
    return str(ei.value)


def edit_manifest(ckpt, change):
    m = os.path.join(ckpt.path, "manifest.json")
    d = json.loads(open(m).read())
    change(d)
    with open(m, "w") as f:
        json.dump(d, f)


def test_round_trip(ckpt):
    loaded = Checkpoint.load(ckpt.path)
    assert loaded == ckpt
    assert isinstance(loaded.disk_chain, tuple)
    assert loaded.spec == SPEC
    assert not os.path.exists(os.path.join(ckpt.path, "manifest.tmp"))


def test_write_into_other_directory(ckpt, tmp_path):
    other = tmp_path / "building"
    other.mkdir()
    ckpt.write(other)
    d = json.loads((other / "manifest.json").read_text())
    assert d["format"] == "sfmpi-checkpoint" and d["version"] == 2 and d["id"] == "ck-1"


def test_disk_paths_are_relative_to_the_checkpoint(ckpt, tmp_path):
    d = json.loads(open(os.path.join(ckpt.path, "manifest.json")).read())
    assert d["disk"] == "../../disks/top.qcow2"
    assert d["disk_chain"] == ["../../disks/base.qcow2", "../../disks/mid.qcow2"]
    assert "path" not in d  # where it is found, not what it says
    # A file outside the state directory (the image cache) stays absolute.
    outside = Checkpoint(**{**ckpt.__dict__, "disk_chain": ("/var/lib/images/base.qcow2",)})
    assert outside.to_json()["disk_chain"] == ["/var/lib/images/base.qcow2"]
    # The checkpoint and its disks move together.
    moved = tmp_path.parent / (tmp_path.name + "-moved")
    os.rename(tmp_path, moved)
    loaded = Checkpoint.load(moved / "checkpoints" / "ck-1")
    assert loaded.disk == str(moved / "disks" / "top.qcow2")
    assert loaded.path == str(moved / "checkpoints" / "ck-1")


def test_version_1_manifest_with_absolute_paths_still_loads(ckpt):
    edit_manifest(ckpt, lambda d: d.update(version=1, disk=ckpt.disk, disk_chain=list(ckpt.disk_chain)))
    assert Checkpoint.load(ckpt.path) == ckpt


@pytest.mark.parametrize("target", ["/etc/passwd", "state"])
def test_a_disk_that_is_not_a_qcow2_layer_is_refused(ckpt, target):
    edit_manifest(ckpt, lambda d: d.update(disk=target))
    assert "is not a qcow2 disk layer" in load_error(ckpt)


@pytest.mark.parametrize("bad", [{"disk": 5}, {"disk": ""}, {"disk_chain": "x"}, {"state_size": -1},
                                 {"ram_size": "big"}, {"guest_req": "1"}, {"id": 7}])
def test_fields_of_the_wrong_type_are_refused(ckpt, bad):
    edit_manifest(ckpt, lambda d: d.update(bad))
    assert "manifest is corrupt" in load_error(ckpt)


def test_missing_manifest(ckpt):
    os.unlink(os.path.join(ckpt.path, "manifest.json"))
    assert "no manifest" in load_error(ckpt)


def test_manifest_not_json(ckpt):
    with open(os.path.join(ckpt.path, "manifest.json"), "w") as f:
        f.write("{not json")
    assert "ck-1: manifest is corrupt" in load_error(ckpt)


def test_manifest_not_an_object(ckpt):
    with open(os.path.join(ckpt.path, "manifest.json"), "w") as f:
        f.write("[1, 2]")
    assert "ck-1: manifest is corrupt" in load_error(ckpt)


@pytest.mark.parametrize("change", [{"format": "something-else"}, {"version": 3}, {"format": None}])
def test_wrong_format_or_version(ckpt, change):
    edit_manifest(ckpt, lambda d: d.update(change))
    assert "ck-1: not a sfmpi-checkpoint v2 manifest" in load_error(ckpt)


def test_missing_field(ckpt):
    edit_manifest(ckpt, lambda d: d.pop("state_sha256"))
    msg = load_error(ckpt)
    assert "manifest is corrupt" in msg and "state_sha256" in msg


def test_bad_machine(ckpt):
    edit_manifest(ckpt, lambda d: d["machine"].pop("mem_mb"))
    assert "manifest is corrupt" in load_error(ckpt)


def test_state_altered(ckpt):
    data = bytearray(STATE)
    data[5] ^= 0xFF
    with open(ckpt.state_file, "wb") as f:
        f.write(data)
    assert "checksum does not match" in load_error(ckpt)


def test_state_truncated(ckpt):
    with open(ckpt.state_file, "r+b") as f:
        f.truncate(10)
    assert "device state has the wrong size" in load_error(ckpt)


def test_ram_wrong_size(ckpt):
    with open(ckpt.ram_file, "r+b") as f:
        f.truncate(RAM_SIZE // 2)
    assert "RAM file has the wrong size" in load_error(ckpt)


@pytest.mark.parametrize("which", ["disk", "chain", "state", "ram"])
def test_missing_file(ckpt, which):
    victim = {"disk": ckpt.disk, "chain": ckpt.disk_chain[0],
              "state": str(ckpt.state_file), "ram": str(ckpt.ram_file)}[which]
    os.unlink(victim)
    msg = load_error(ckpt)
    assert msg == f"checkpoint ck-1: {victim} is missing"


def ev(name, seconds, micro):
    return {"event": name, "timestamp": {"seconds": seconds, "microseconds": micro}}


def test_pause_from_events():
    events = [ev("MIGRATION", 99, 0), ev("STOP", 100, 250_000), ev("MIGRATION", 100, 260_000),
              ev("RESUME", 100, 265_500)]
    assert pause_from_events(events) == pytest.approx(15.5)


def test_pause_uses_first_stop_and_last_resume():
    events = [ev("STOP", 10, 0), ev("RESUME", 10, 1000), ev("STOP", 10, 2000), ev("RESUME", 10, 5000)]
    assert pause_from_events(events) == pytest.approx(5.0)


@pytest.mark.parametrize("events", [[], [ev("STOP", 1, 0)], [ev("RESUME", 1, 0)]])
def test_pause_without_both_events_is_zero(events):
    assert pause_from_events(events) == 0.0


def test_sparse_copy_ranges_cover_the_file_once(tmp_path):
    from sfmpi.hostd.fork.capture import SPARSE_BLOCK, sparse_copy_argvs
    size = 512 << 20
    for parts in (1, 2, 3, 4):
        argvs = sparse_copy_argvs("/src", "/dst", size, parts)
        assert len(argvs) == parts
        ranges = []
        for argv in argvs:
            opts = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
            assert opts["skip"] == opts["seek"] and opts["bs"] == str(SPARSE_BLOCK) and "notrunc" in opts["conv"]
            ranges.append((int(opts["skip"]), int(opts["skip"]) + int(opts["count"])))
        assert ranges[0][0] == 0 and ranges[-1][1] >= size // SPARSE_BLOCK
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_sparse_copy_copies_data_and_leaves_holes(tmp_path):
    import asyncio
    import os
    from sfmpi.hostd.fork.capture import SPARSE_BLOCK, sparse_copy
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = bytearray(8 * SPARSE_BLOCK + 4096)  # a size that is not a whole number of blocks
    data[5] = 1
    data[3 * SPARSE_BLOCK + 7] = 2
    data[-1] = 3
    src.write_bytes(bytes(data))
    asyncio.run(sparse_copy(str(src), str(dst)))
    assert dst.read_bytes() == bytes(data)
    assert os.stat(dst).st_blocks * 512 < len(data) // 2  # the zero blocks are holes


def test_the_driver_is_kept_and_a_manifest_without_one_was_the_direct_drivers(ckpt):
    assert Checkpoint.load(ckpt.path).driver == "direct"
    edit_manifest(ckpt, lambda d: d.update(driver="libvirt"))
    assert Checkpoint.load(ckpt.path).driver == "libvirt"
    edit_manifest(ckpt, lambda d: d.pop("driver"))
    assert Checkpoint.load(ckpt.path).driver == "direct"
    edit_manifest(ckpt, lambda d: d.update(driver=["libvirt"]))
    assert "corrupt" in load_error(ckpt)
