"""Image recipe hashes and Image.load's errors."""
from __future__ import annotations

import json

import pytest

from sfmpi import image
from sfmpi.errors import ImageError
from sfmpi.image import Image, Recipe


@pytest.fixture
def agent(tmp_path, monkeypatch):
    """A copy of the guest modules whose agent the test may change."""
    for module in image.GUEST_MODULES:
        (tmp_path / module).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / module).write_bytes((image.PACKAGE_DIR / module).read_bytes())
    monkeypatch.setattr(image, "PACKAGE_DIR", tmp_path)
    src = tmp_path / "guest/agent.py"
    src.write_text("print('agent v1')\n")
    return src


def test_same_recipe_same_hash(agent):
    assert Recipe().image_hash() == Recipe().image_hash()
    assert Recipe().rootfs_hash() == Recipe().rootfs_hash()
    assert len(Recipe().image_hash()) == 16


def test_extra_package_changes_both_hashes(agent):
    a, b = Recipe(), Recipe(extra_packages=("htop",))
    assert a.rootfs_hash() != b.rootfs_hash()
    assert a.image_hash() != b.image_hash()
    assert b.all_packages[-1] == "htop"


def test_package_order_and_duplicates_do_not_matter(agent):
    base = Recipe()
    dup = Recipe(extra_packages=(base.packages[0],))
    assert dup.all_packages == base.all_packages
    assert dup.image_hash() == base.image_hash()
    reordered = Recipe(packages=tuple(reversed(base.packages)))
    assert reordered.rootfs_hash() == base.rootfs_hash()


def test_suite_is_part_of_hash(agent):
    assert Recipe(suite="trixie").rootfs_hash() != Recipe().rootfs_hash()


def test_agent_source_in_image_hash_only(agent):
    before_img, before_root = Recipe().image_hash(), Recipe().rootfs_hash()
    agent.write_text("print('agent v2')\n")
    assert Recipe().image_hash() != before_img
    assert Recipe().rootfs_hash() == before_root


def test_load_missing_path(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        Image.load(tmp_path / "nope" / "disk.qcow2")


def test_load_dir_without_metadata(tmp_path):
    (tmp_path / "disk.qcow2").write_bytes(b"")
    with pytest.raises(ImageError, match="is not an sfmpi image"):
        Image.load(tmp_path)
    with pytest.raises(ImageError, match="image.json is missing"):
        Image.load(tmp_path / "disk.qcow2")


@pytest.mark.parametrize("body", ["{broken", "[]", "null", '{"disk": "/x"}',
                                  '{"disk": "d", "kernel": "k", "initrd": "i", "append": "", "virtual_size": "big"}'])
def test_load_bad_metadata(tmp_path, body):
    (tmp_path / "image.json").write_text(body)
    with pytest.raises(ImageError, match="unreadable"):
        Image.load(tmp_path)


def make_image(d):
    files = {n: d / n for n in ("disk.qcow2", "vmlinuz", "initrd.img")}
    for f in files.values():
        f.write_bytes(b"x")
    meta = {"disk": str(files["disk.qcow2"]), "kernel": str(files["vmlinuz"]),
            "initrd": str(files["initrd.img"]), "append": "root=/dev/vda", "virtual_size": 1 << 30,
            "recipe": {"hash": "abc"}}
    (d / "image.json").write_text(json.dumps(meta))
    return meta


def test_load_good_image_and_to_json(tmp_path):
    meta = make_image(tmp_path)
    img = Image.load(tmp_path / "disk.qcow2")
    assert img == Image.load(tmp_path)
    assert img.to_json() == meta


def test_load_incomplete_image(tmp_path):
    make_image(tmp_path)
    (tmp_path / "vmlinuz").unlink()
    with pytest.raises(ImageError, match="incomplete: .*vmlinuz is missing"):
        Image.load(tmp_path)
