"""Which VM driver a hostd runs: the environment's, unless its state directory
already runs one (until `sfmpi down`), and never a name it does not know."""
from __future__ import annotations

import pytest

from sfmpi.errors import UsageError
from sfmpi.hostd.vm.driver import choose_driver


@pytest.fixture
def recorded(tmp_path):
    return tmp_path / "driver"


def test_direct_is_the_default_and_is_recorded(recorded, monkeypatch):
    monkeypatch.delenv("SFMPI_DRIVER", raising=False)
    assert choose_driver(recorded) == "direct"
    assert recorded.read_text() == "direct\n"


def test_the_environment_chooses_a_new_state_directorys_driver(recorded, monkeypatch):
    monkeypatch.setenv("SFMPI_DRIVER", "libvirt")
    assert choose_driver(recorded) == "libvirt"
    assert recorded.read_text() == "libvirt\n"


def test_a_hostd_started_on_demand_keeps_the_recorded_driver(recorded, monkeypatch):
    # `sfmpi down` without SFMPI_DRIVER after a libvirt session must end libvirt's domains.
    recorded.write_text("libvirt\n")
    monkeypatch.delenv("SFMPI_DRIVER", raising=False)
    assert choose_driver(recorded) == "libvirt"


def test_asking_for_the_other_driver_before_down_is_refused(recorded, monkeypatch):
    recorded.write_text("libvirt\n")
    monkeypatch.setenv("SFMPI_DRIVER", "direct")
    with pytest.raises(UsageError, match="runs the libvirt driver until `sfmpi down`"):
        choose_driver(recorded)
    assert recorded.read_text() == "libvirt\n"


def test_an_unknown_driver_is_refused(recorded, monkeypatch):
    monkeypatch.setenv("SFMPI_DRIVER", "xen")
    with pytest.raises(UsageError, match="SFMPI_DRIVER must be one of direct, libvirt"):
        choose_driver(recorded)
    assert not recorded.exists()


def test_a_damaged_record_is_ignored(recorded, monkeypatch):
    recorded.write_text("garbage")
    monkeypatch.setenv("SFMPI_DRIVER", "libvirt")
    assert choose_driver(recorded) == "libvirt"
