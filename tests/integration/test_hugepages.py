"""A parent whose RAM is on 2 MiB huge pages: checkpoint, clone, nothing left.

The host here has no huge pages of its own: the fixture reserves some
(vm.nr_hugepages) and mounts a hugetlbfs for the test, and gives both back.
"""
from __future__ import annotations

import pytest

from sfmpi.hostd.vm.hugepages import free_pages
from tests import hugetlb

pytestmark = pytest.mark.timeout(600)

MEM_MB = 256


@pytest.fixture(scope="module")
def hugetlbfs():
    with hugetlb.hugetlbfs(MEM_MB // 2 + 16) as mount:
        yield mount


def test_a_parent_on_huge_pages_checkpoints_and_clones(cli, hugetlbfs):
    free = free_pages()
    started = cli.json("vm", "start", "hp", "--mem", f"{MEM_MB}M", "--ram-backing", "hugepages")
    try:
        assert started["ram_backing"] == "hugepages"
        # Free page reporting is off on huge pages: the reservation must hold.
        assert started["free_page_reporting"] is False
        assert [f.name for f in hugetlbfs.iterdir()] == [f"{cli.paths.shm.name}-hp.ram"]
        assert free - free_pages() == MEM_MB // 2
        cli.exec("hp", "echo on-huge-pages > /dev/shm/mark")
        for mode in ("background", "paused"):
            ck = cli.json("checkpoint", "hp", "--mode", mode)
            assert ck["mode"] == mode and ck["pause_ms"] > 0
            (clone,) = cli.json("clone", ck["id"], "-n", "1")["clones"]
            try:
                assert cli.exec(clone, "cat /dev/shm/mark").stdout == "on-huge-pages\n"
            finally:
                cli("vm", "stop", clone)
        assert cli.exec("hp", "cat /dev/shm/mark").stdout == "on-huge-pages\n"
    finally:
        cli("vm", "stop", "hp", check=False)
    assert list(hugetlbfs.iterdir()) == []
    assert free_pages() == free


def test_huge_pages_asked_for_but_too_few_is_a_clear_error(cli, hugetlbfs):
    p = cli("vm", "start", "hp2", "--mem", "4096M", "--ram-backing", "hugepages", check=False)
    assert p.returncode != 0
    assert "free 2 MiB huge pages needed for 4096 MiB" in p.stderr
    assert "hp2" not in {r["name"] for r in cli.json("vm", "list")}
    assert list(hugetlbfs.iterdir()) == []
