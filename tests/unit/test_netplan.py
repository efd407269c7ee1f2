"""The address plan of docs/clone-api.md, value by value."""
from __future__ import annotations

import ipaddress

import pytest

from sfmpi.errors import UsageError
from sfmpi.hostd.net import netplan


def test_first_family():
    assert netplan.subnet(1) == ipaddress.IPv4Network("10.100.1.0/24")
    assert str(netplan.gateway(1)) == "10.100.1.1"
    assert str(netplan.ip(1, 0)) == "10.100.1.2"
    assert str(netplan.ip(1, 250)) == "10.100.1.252"
    assert netplan.mac(1, 0) == "0a:5f:00:01:00:00"


def test_family_across_the_third_octet():
    assert netplan.subnet(256) == ipaddress.IPv4Network("10.101.0.0/24")
    assert str(netplan.ip(300, 7)) == "10.101.44.9"
    assert netplan.mac(300, 7) == "0a:5f:01:2c:00:07"


def test_last_family_stays_in_ten_slash_eight():
    assert netplan.subnet(38399) == ipaddress.IPv4Network("10.249.255.0/24")
    assert str(netplan.ip(38399, 250)) == "10.249.255.252"
    assert netplan.mac(38399, 250) == "0a:5f:95:ff:00:fa"


def test_mac_is_locally_administered_unicast():
    first = int(netplan.mac(1234, 5).split(":")[0], 16)
    assert first & 0b10 and not first & 0b01


@pytest.mark.parametrize("f,k", [(1, 0), (255, 1), (256, 250), (38399, 17)])
def test_parse_mac_round_trips(f, k):
    assert netplan.parse_mac(netplan.mac(f, k)) == (f, k)
    assert netplan.parse_mac(netplan.mac(f, k).upper()) == (f, k)


@pytest.mark.parametrize("address", [
    "52:54:00:12:34:56",      # QEMU's default: not ours
    "0a:5f:00:00:00:01",      # family 0 does not exist
    "0a:5f:96:00:00:01",      # family 38400 is out of range
    "0a:5f:00:05:00:fb",      # ID 251
    "0a:5f:00:05:ff:ff",      # the bridge's own MAC
    "0a:5f:00:05:00",         # too short
    "not a mac",
])
def test_parse_mac_refuses_others(address):
    assert netplan.parse_mac(address) is None


def test_gateway_mac_is_no_vms():
    assert netplan.gateway_mac(5) == "0a:5f:00:05:ff:ff"
    assert all(netplan.mac(5, k) != netplan.gateway_mac(5) for k in range(netplan.MAX_ID + 1))


def test_names():
    assert netplan.hostname("web", 0) == "web"
    assert netplan.hostname("web", 3) == "web-3"
    assert netplan.bridge_name(7) == "sfbr7"
    assert netplan.tap_name(7, 12) == "sft7x12"


def test_interface_names_fit_ifnamsiz():
    assert len(netplan.bridge_name(netplan.LAST_FAMILY)) <= 15
    assert len(netplan.tap_name(netplan.LAST_FAMILY, netplan.MAX_ID)) <= 15


def test_tap_prefixes_do_not_overlap():
    # sft5x must not be a prefix of family 55's taps (nft matches "sft5x*").
    assert not netplan.tap_name(55, 1).startswith(netplan.tap_prefix(5))


def test_identity():
    assert netplan.identity(300, "web", 7) == {
        "mac": "0a:5f:01:2c:00:07", "ip": "10.101.44.9", "prefix": 24, "mtu": 1450,
        "gateway": "10.101.44.1", "hostname": "web-7", "family": "web",
        "family_no": 300, "id": 7,
    }


@pytest.mark.parametrize("f", [0, -1, 38400, 1.5, "3", True])
def test_family_out_of_range(f):
    with pytest.raises(UsageError, match="family number"):
        netplan.subnet(f)


@pytest.mark.parametrize("k", [-1, 251, None])
def test_id_out_of_range(k):
    with pytest.raises(UsageError, match="clone ID"):
        netplan.ip(1, k)
    with pytest.raises(UsageError, match="clone ID"):
        netplan.mac(1, k)


def test_hostname_needs_a_name():
    with pytest.raises(UsageError):
        netplan.hostname("", 1)


def test_all_addresses_distinct_across_families():
    seen = {str(netplan.ip(f, k)) for f in (1, 2, 255, 256, 257) for k in (0, 1, 250)}
    assert len(seen) == 15
    assert all(netplan.ip(f, 250) in netplan.subnet(f) for f in (1, 255, 38399))


def test_dnsmasq_serves_the_plan_and_no_dns(tmp_path):
    from sfmpi.hostd.net.dhcp import dnsmasq_argv, hosts_text

    argv = dnsmasq_argv(300, tmp_path)
    assert argv[0] == "dnsmasq"
    assert "--port=0" in argv  # no DNS server
    assert "--interface=sfbr300" in argv and "--bind-interfaces" in argv
    assert "--dhcp-range=10.101.44.2,static,255.255.255.0" in argv
    assert f"--dhcp-hostsfile={tmp_path}/dhcp-hosts" in argv
    assert f"--dhcp-leasefile={tmp_path}/dhcp-leases" in argv
    assert f"--pid-file={tmp_path}/dnsmasq.pid" in argv
    assert "--keep-in-foreground" in argv and "--conf-file=/dev/null" in argv
    ident = netplan.identity(300, "web", 7)
    assert hosts_text([(ident["mac"], ident["ip"], ident["hostname"])]) == "0a:5f:01:2c:00:07,10.101.44.9,web-7\n"


@pytest.mark.parametrize("text", ["10.100.0.0", "10.0.0.0", "10.106.0.0"])
def test_a_family_base_holds_every_family_in_private_space(text):
    base = netplan._base(text)
    assert str(base) == text


@pytest.mark.parametrize("text", ["10.100.0.7", "172.16.0.0", "8.8.0.0", "not-an-address", "10.200.0.0"])
def test_a_bad_family_base_is_refused(text):
    with pytest.raises(UsageError) as ei:
        netplan._base(text)
    assert "SFMPI_FAMILY_BASE" in str(ei.value)
