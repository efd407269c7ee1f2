"""The nft scripts of family networks: the right rules, and the kernel accepts
them (`nft -c`: check mode, the ruleset is not changed)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from sfmpi.errors import UsageError
from sfmpi.hostd.net import netplan, nft

F = 300  # 10.101.44.0/24


def vm(k: int, port: str | None = None) -> tuple[int, str, str, str]:
    return (k, port or netplan.tap_name(F, k), netplan.mac(F, k), str(netplan.ip(F, k)))


def nft_check(script: str) -> None:
    if shutil.which("nft") is None or os.geteuid() != 0:
        pytest.skip("nft check mode needs nft and root")
    p = subprocess.run(["nft", "-c", "-f", "-"], input=script.encode(), capture_output=True)
    assert p.returncode == 0, p.stderr.decode() + "\n" + script


def lines(script: str) -> list[str]:
    return [line.strip() for line in script.splitlines() if line.strip()]


@pytest.mark.parametrize("nat", [False, True])
@pytest.mark.parametrize("ports", [(), ("22",), ("22", "8080/tcp", "53/udp")])
def test_family_tables_parse(nat, ports):
    nft_check(nft.family_tables(F, nat, nft.parse_open_ports(ports)))


def test_family_tables_replace_whatever_was_there():
    script = lines(nft.family_tables(F, nat=False))
    for family in ("bridge", "inet", "ip"):
        i = script.index(f"add table {family} sfmpi_f300")
        assert script[i + 1] == f"delete table {family} sfmpi_f300"
    # Without NAT the ip table is only removed, never created.
    assert "table ip sfmpi_f300 {" not in script


def test_bridge_table_sends_ports_to_their_vm_chains_and_drops_strangers():
    script = lines(nft.family_tables(F, nat=False))
    assert "type ifname : verdict" in script
    # VM chains at prerouting (before the bridge learns the source MAC) and
    # input (link-local frames skip prerouting).
    assert "type filter hook prerouting priority filter; policy accept;" in script
    assert "type filter hook input priority filter; policy accept;" in script
    assert script.count("iifname vmap @ports") == 2
    assert script.count('iifname "sft300x*" counter name "unknown_port" drop') == 2
    forward = script[script.index("type filter hook forward priority filter; policy accept;"):]
    assert forward[1:4] == ["iifname @vm_ports accept", 'iifname "sfvx300" accept',
                            'oifname @vm_ports counter name "unknown_port" drop']


def test_the_vxlan_port_lets_in_only_the_familys_vms_and_lets_out_nothing_of_the_host():
    script = lines(nft.family_tables(F, nat=False))
    assert script.count('iifname "sfvx300" jump tunnel_in') == 2
    tunnel = script[script.index("chain tunnel_in {") + 1:]
    tunnel = tunnel[:tunnel.index("}")]
    # The family's MACs only (0a:5f:<f>), never its gateway (each host has its own at that address).
    assert tunnel[0] == 'ether saddr & ff:ff:ff:ff:00:00 != 0a:5f:01:2c:00:00 counter name "tunnel_in" drop'
    assert 'ether saddr 0a:5f:01:2c:ff:ff counter name "tunnel_in" drop' in tunnel
    assert 'ip saddr 10.101.44.1 counter name "tunnel_in" drop' in tunnel
    assert 'udp dport { 67, 68 } counter name "tunnel_in" drop' in tunnel   # each host's own DHCP
    assert tunnel[-1] == 'counter name "tunnel_in" drop'
    output = script[script.index("type filter hook output priority filter; policy accept;"):]
    assert output[1] == 'oifname "sfvx300" drop'


def test_inet_table_keeps_traffic_in_the_family():
    script = lines(nft.family_tables(F, nat=False))
    forward = script[script.index("table inet sfmpi_f300 {"):]
    assert forward.index('iifname "sfbr300" oifname "sfbr300" accept') < \
        forward.index('iifname "sfbr300" counter name "leave_family" drop')
    assert 'oifname "sfbr300" counter name "enter_family" drop' in script
    assert 'iifname "sfbr300" udp dport 67 accept' in script
    assert 'iifname "sfbr300" counter name "to_host" drop' in script
    assert 'iifname "sfbr300" accept' not in script  # no egress without NAT
    assert not any("masquerade" in line for line in script)


def test_nat_adds_egress_and_masquerade():
    script = lines(nft.family_tables(F, nat=True))
    assert 'iifname "sfbr300" accept' in script
    assert 'oifname "sfbr300" ct state established,related accept' in script
    assert 'ip saddr 10.101.44.0/24 oifname != "sfbr300" masquerade' in script
    # Egress is accepted before the catch-all drop of the family.
    assert script.index('iifname "sfbr300" accept') < \
        script.index('iifname "sfbr300" counter name "leave_family" drop')


def inet_forward(script: list[str]) -> list[str]:
    start = script.index("table inet sfmpi_f300 {")
    start = script.index("type filter hook forward priority 0; policy accept;", start) + 1
    return script[start:script.index("}", start)]


def test_open_ports_are_accepted_before_the_enter_family_drop():
    ports = nft.parse_open_ports(["8080", "22/tcp", "53/udp"])
    forward = inet_forward(lines(nft.family_tables(F, nat=False, open_ports=ports)))
    tcp = 'oifname "sfbr300" ip daddr 10.101.44.0/24 tcp dport { 22, 8080 } accept'
    udp = 'oifname "sfbr300" ip daddr 10.101.44.0/24 udp dport { 53 } accept'
    assert forward == [
        'iifname "sfbr300" oifname "sfbr300" accept',
        # Answers to what the open ports let in; nothing new leaves the family.
        'iifname "sfbr300" ct state established,related accept',
        tcp,
        udp,
        'iifname "sfbr300" counter name "leave_family" drop',
        'oifname "sfbr300" counter name "enter_family" drop',
    ]
    assert not any(line == 'iifname "sfbr300" accept' for line in forward)  # still no egress


def test_closed_family_lets_nothing_in_or_out():
    forward = inet_forward(lines(nft.family_tables(F, nat=False)))
    assert forward == ['iifname "sfbr300" oifname "sfbr300" accept',
                       'iifname "sfbr300" counter name "leave_family" drop',
                       'oifname "sfbr300" counter name "enter_family" drop']


def test_nat_with_open_ports():
    script = lines(nft.family_tables(F, nat=True, open_ports=nft.parse_open_ports(["443"])))
    forward = inet_forward(script)
    port_rule = 'oifname "sfbr300" ip daddr 10.101.44.0/24 tcp dport { 443 } accept'
    assert forward.index('iifname "sfbr300" accept') < forward.index(port_rule) < \
        forward.index('oifname "sfbr300" counter name "enter_family" drop')
    assert "type nat hook postrouting priority srcnat; policy accept;" in script
    assert 'ip saddr 10.101.44.0/24 oifname != "sfbr300" masquerade' in script


def test_open_ports_do_not_change_the_bridge_table():
    def bridge_table(script: str) -> str:
        return script[:script.index("add table inet")]
    assert bridge_table(nft.family_tables(F, False, nft.parse_open_ports(["22"]))) == \
        bridge_table(nft.family_tables(F, False))


@pytest.mark.parametrize("spec, want", [
    ("22", (22, "tcp")), ("22/tcp", (22, "tcp")), ("53/udp", (53, "udp")), ("80/TCP", (80, "tcp")),
    (" 443 ", (443, "tcp")), ("1", (1, "tcp")), ("65535/udp", (65535, "udp")), (8080, (8080, "tcp")),
])
def test_parse_open_port(spec, want):
    port = nft.parse_open_port(spec)
    assert port == want and str(port) == f"{want[0]}/{want[1]}"


@pytest.mark.parametrize("spec", ["0", "65536", "-1", "+80", "8_0", "80/icmp", "80/", "/tcp", "", "http",
                                  "22/tcp/udp", "\u0663", True, None, 3.0, nft.OpenPort(0, "tcp"),
                                  nft.OpenPort(22, "sctp")])
def test_parse_open_port_refuses(spec):
    with pytest.raises(UsageError, match="bad open port"):
        nft.parse_open_port(spec)


def test_open_ports_are_sorted_and_unique():
    assert nft.parse_open_ports(["80", "22/udp", "80/tcp", 22]) == ((22, "tcp"), (22, "udp"), (80, "tcp"))
    assert nft.family_tables(F, False, nft.parse_open_ports(["80", "22"])) == \
        nft.family_tables(F, False, nft.parse_open_ports(["22", "80/tcp", "22"]))


def test_family_tables_refuses_bad_ports():
    with pytest.raises(UsageError):
        nft.family_tables(F, False, [nft.OpenPort(70000, "tcp")])


def test_vm_chain_rules_in_order():
    script = lines(nft.add_vms(F, [vm(7)]))
    rules = [line.removeprefix("add rule bridge sfmpi_f300 vm_7 ") for line in script
             if line.startswith("add rule")]
    assert rules[0].startswith('ether saddr != 0a:5f:01:2c:00:07 counter name "vm_7_mac" drop')
    assert rules[1].startswith("ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept")
    assert any(r.startswith('arp saddr ether != 0a:5f:01:2c:00:07 counter name "vm_7_arp_mac" drop')
               for r in rules)
    assert any(r.startswith('arp saddr ip != 10.101.44.9 counter name "vm_7_arp_ip" drop') for r in rules)
    assert any(r.startswith('ip saddr != 10.101.44.9 counter name "vm_7_ip" drop') for r in rules)
    assert any(r.startswith('ether type ip6 counter name "vm_7_ipv6" drop') for r in rules)
    assert rules[-2] == "ether type { ip, arp } accept"
    assert rules[-1].startswith('counter name "vm_7_other" drop')
    assert 'add element bridge sfmpi_f300 ports { "sft300x7" : goto vm_7 }' in script
    assert 'add element bridge sfmpi_f300 vm_ports { "sft300x7" }' in script
    # Re-adding a VM replaces its rules rather than appending to them.
    assert script.index("flush chain bridge sfmpi_f300 vm_7") < \
        min(i for i, line in enumerate(script) if line.startswith("add rule"))


def test_every_drop_reason_has_a_counter_per_vm():
    script = nft.add_vms(F, [vm(1), vm(2)])
    for k in (1, 2):
        for reason in nft.VM_DROP_REASONS:
            assert f"add counter bridge sfmpi_f300 vm_{k}_{reason}\n" in script
            assert f'counter name "vm_{k}_{reason}" drop' in script


def test_add_and_remove_vms_parse_with_the_family():
    nft_check(nft.family_tables(F, nat=False)
              + nft.add_vms(F, [vm(0), vm(1), vm(250, "veth-test0")])
              + nft.add_vms(F, [vm(1)])  # again: idempotent
              + nft.remove_vms(F, [1, 9, 250], ports={250: "veth-test0"}))


def test_remove_vms_tolerates_missing_vms():
    script = lines(nft.remove_vms(F, [4]))
    # add-then-delete: deleting something that is not there would fail the transaction
    assert script.index('add element bridge sfmpi_f300 ports { "sft300x4" : goto vm_4 }') < \
        script.index('delete element bridge sfmpi_f300 ports { "sft300x4" }')
    assert script.index("add chain bridge sfmpi_f300 vm_4") < \
        script.index("delete chain bridge sfmpi_f300 vm_4")
    assert "add counter bridge sfmpi_f300 vm_4_mac" in script
    assert script[-1] == "delete counter bridge sfmpi_f300 vm_4_other"


def test_remove_leaves_other_vms_alone():
    script = nft.remove_vms(F, [4])
    assert "vm_5" not in script and "flush table" not in script


def test_delete_family_parses_twice():
    nft_check(nft.delete_family(F) * 2)


def test_other_families_are_not_touched():
    script = nft.family_tables(F, nat=True) + nft.add_vms(F, [vm(1)])
    assert "sfmpi_f30 " not in script and "sfbr3000" not in script


@pytest.mark.parametrize("bad", [
    (1, 'a" accept; "', netplan.mac(F, 1), str(netplan.ip(F, 1))),  # quote in the port name
    (1, "x" * 16, netplan.mac(F, 1), str(netplan.ip(F, 1))),        # longer than IFNAMSIZ - 1
    (1, "tap1", "0a:5f:01:2c:00", str(netplan.ip(F, 1))),           # not a MAC
    (1, "tap1", netplan.mac(F, 1), "10.100.1.3"),                   # another family's subnet
])
def test_add_vms_refuses_bad_input(bad):
    with pytest.raises(ValueError):
        nft.add_vms(F, [bad])


def test_parse_counters():
    text = json.dumps({"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"counter": {"family": "bridge", "name": "vm_3_mac", "table": "sfmpi_f5", "packets": 4, "bytes": 9}},
        {"counter": {"family": "inet", "name": "to_host", "table": "sfmpi_f5", "packets": 0, "bytes": 0}},
    ]})
    assert nft.parse_counters(text) == {"bridge/vm_3_mac": 4, "inet/to_host": 0}
