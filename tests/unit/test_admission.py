"""Admission control: sizes, and how many VMs a budget admits."""
from __future__ import annotations

import pytest

from sfmpi.errors import CapacityError, UsageError
from sfmpi.hostd.policy.admission import Budget, Usage, admit, parse_size_mb


@pytest.mark.parametrize("text,mb", [
    ("512M", 512), ("512", 512), ("1G", 1024), ("1g", 1024), ("1.5GiB", 1536), ("2048K", 2),
    (" 256 MB ", 256), ("1T", 1024 * 1024), (512, 512),
])
def test_parse_size_mb(text, mb):
    assert parse_size_mb(text) == mb


@pytest.mark.parametrize("text", ["", "abc", "12X", "1.G", "-1G", "0M", "100K", "G"])
def test_parse_size_mb_rejects(text):
    with pytest.raises(UsageError) as ei:
        parse_size_mb(text)
    assert repr(text) in str(ei.value)


BUDGET = Budget(mem_mb=4096, vcpus=16)


def test_admit_all_fit():
    assert admit(BUDGET, Usage(0, 0), 4, 1024, 1) == 4
    assert admit(BUDGET, Usage(1024, 2), 3, 1024, 1, allow_fewer=True) == 3


def test_admit_trims_with_allow_fewer():
    assert admit(BUDGET, Usage(1024, 0), 8, 1024, 1, allow_fewer=True) == 3


def test_admit_refuses_without_allow_fewer():
    with pytest.raises(CapacityError) as ei:
        admit(BUDGET, Usage(1024, 2), 8, 1024, 1)
    msg = str(ei.value)
    assert "clone of 8 refused" in msg
    assert "room for 3 more" in msg
    assert "1024/4096 MiB" in msg and "2/16" in msg
    assert "--allow-fewer" in msg


@pytest.mark.parametrize("n", [0, -1])
def test_admit_n_must_be_positive(n):
    with pytest.raises(UsageError, match="at least 1"):
        admit(BUDGET, Usage(0, 0), n, 512, 1, allow_fewer=True)


def test_admit_no_room_refused_even_with_allow_fewer():
    with pytest.raises(CapacityError) as ei:
        admit(BUDGET, Usage(3800, 0), 2, 512, 1, allow_fewer=True, what="vm start")
    msg = str(ei.value)
    assert msg.startswith("vm start of 2 refused")
    assert "room for 0 more" in msg
    assert "--allow-fewer" not in msg  # it would not help


def test_admit_over_budget_usage_is_no_room():
    with pytest.raises(CapacityError):
        admit(BUDGET, Usage(5000, 20), 1, 512, 1, allow_fewer=True)


def test_admit_vcpu_bound():
    # Memory would hold 8, vCPUs only 16 // 4 - 1 = 3.
    assert admit(BUDGET, Usage(0, 4), 8, 512, 4, allow_fewer=True) == 3
    with pytest.raises(CapacityError, match="room for 3 more"):
        admit(BUDGET, Usage(0, 4), 8, 512, 4)


def test_budget_default_from_env(monkeypatch):
    monkeypatch.setenv("SFMPI_MEM_BUDGET", "2G")
    monkeypatch.setenv("SFMPI_VCPU_BUDGET", "5")
    assert Budget.default() == Budget(2048, 5)


def test_a_ram_directory_counts_what_sparse_files_may_still_claim(tmp_path):
    """A tmpfs of 64 MiB: a 40 MiB sparse RAM file (a VM that touched 8 MiB of it)
    leaves room for 24 MiB, not 56; a VM of 32 MiB is refused with the reason."""
    import subprocess

    from sfmpi.errors import CapacityError
    from sfmpi.hostd.policy.admission import check_ram_dir, ram_dir_free_mb
    d = tmp_path / "ram"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M,mode=0700", "sfmpi-test-ramdir", str(d)], check=True)
    try:
        assert 63 <= ram_dir_free_mb(d) <= 64
        with open(d / "vm.ram", "wb") as f:
            f.truncate(40 << 20)
            f.write(b"x" * (8 << 20))
        assert 23 <= ram_dir_free_mb(d) <= 24
        check_ram_dir(d, 16, "start of VM a")
        with pytest.raises(CapacityError, match=r"start of VM b refused: its RAM directory .* has 2\d MiB free"):
            check_ram_dir(d, 32, "start of VM b")
        with pytest.raises(CapacityError):
            check_ram_dir(d, 16, "start of VM c", pending_mb=16)
    finally:
        subprocess.run(["umount", str(d)], check=True)
