"""nftables rules of family networks, as script text for `nft -f -` (no I/O here).

Per family f there are up to three tables, all named sfmpi_f<f>:

- `table bridge`: per-port filtering on the family bridge. A verdict map
  `ports` sends every frame that arrives from a VM's port (tap) to that VM's
  chain `vm_<k>`, which lets through only the VM's own MAC, ARP and IPv4 from
  its own address, and DHCP from 0.0.0.0. A frame from a port of the bridge
  that is not in the map is dropped: nothing joins a family unannounced.
- `table inet`: the host's routing side. Traffic stays inside the family
  (br_netfilter is on, so bridged IPv4 also passes inet forward, with the
  bridge as both iif and oif); guests reach the host only for DHCP. Routed
  traffic from elsewhere (the uplink, another family with NAT) gets in only
  to the family's declared open ports.
- `table ip` (only with NAT): masquerade the subnet when it leaves the host.

Every drop counts into a named counter (`nft list counters`) so a test or an
operator can read *why* a frame was dropped. Per-VM changes touch only that
VM's chain, counters and map element, so the other VMs' counters survive.
nftables 1.0.6 has no `destroy`: "add X; delete X" is the idiom for
"delete X if it exists", and it runs in the same atomic transaction.
"""
from __future__ import annotations

import ipaddress
import json
import re
from typing import Iterable, Mapping, NamedTuple

from sfmpi.errors import UsageError

from . import netplan

_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")

# Why a frame of VM k was dropped; the counter is vm_<k>_<reason>.
VM_DROP_REASONS = {
    "mac": "source MAC is not the VM's",
    "arp_mac": "ARP sender MAC is not the VM's",
    "arp_ip": "ARP sender IP is not the VM's",
    "ip": "IPv4 source is not the VM's",
    # No IPv6 plan yet, and a clone's link-local address is derived from the
    # MAC it resumed with: the parent's. Dropping all IPv6 stops that leak.
    "ipv6": "IPv6 (no v6 plan; link-local would leak the parent's identity)",
    # VLAN tags (and other EtherTypes) would hide the headers matched above.
    "other": "EtherType other than IPv4/ARP, or non-Ethernet/IPv4 ARP",
}
# Family-wide counters: (table family, counter name) -> why.
FAMILY_DROP_REASONS = {
    ("bridge", "unknown_port"): "frame from a bridge port that is no VM of this family",
    ("bridge", "tunnel_in"): "frame from the family's VXLAN port that no remote VM of the family may send",
    ("inet", "leave_family"): "routed from the family to elsewhere",
    ("inet", "enter_family"): "routed into the family from elsewhere",
    ("inet", "to_host"): "guest to a host service other than DHCP",
}


PROTOCOLS = ("tcp", "udp")
_PORT_HELP = "use PORT, PORT/tcp or PORT/udp with PORT in 1..65535"


class OpenPort(NamedTuple):
    """A port of the family's VMs that routed traffic from outside may reach."""
    port: int
    proto: str = "tcp"

    def __str__(self) -> str:
        return f"{self.port}/{self.proto}"


def parse_open_port(spec: "str | int | OpenPort") -> OpenPort:
    """"80", "80/tcp", "53/udp" (or 80) -> OpenPort; anything else is a UsageError.
    An OpenPort is checked too: its fields end up in an nft script."""
    if isinstance(spec, OpenPort) or (isinstance(spec, int) and not isinstance(spec, bool)):
        spec = str(spec)
    if not isinstance(spec, str):
        raise UsageError(f"bad open port {spec!r}: {_PORT_HELP}")
    number, slash, proto = spec.strip().lower().partition("/")
    proto = proto if slash else "tcp"
    if proto not in PROTOCOLS:
        raise UsageError(f"bad open port {spec!r}: protocol {proto!r} is neither tcp nor udp ({_PORT_HELP})")
    # isdecimal, not int(): int() takes "+80", " 80" and "8_0".
    if not number.isascii() or not number.isdecimal() or not 1 <= int(number) <= 65535:
        raise UsageError(f"bad open port {spec!r}: {_PORT_HELP}")
    return OpenPort(int(number), proto)


def parse_open_ports(specs: "Iterable[str | int | OpenPort]") -> tuple[OpenPort, ...]:
    """Sorted and without repeats: the same ports give the same rules (and compare equal)."""
    return tuple(sorted(set(parse_open_port(s) for s in specs)))


def table_name(f: int) -> str:
    return f"sfmpi_f{netplan.check_family(f)}"


def vm_chain(k: int) -> str:
    return f"vm_{netplan.check_id(k)}"


def vm_counter(k: int, reason: str) -> str:
    if reason not in VM_DROP_REASONS:
        raise ValueError(f"unknown drop reason {reason!r}")
    return f"vm_{netplan.check_id(k)}_{reason}"


def _drop_if_exists(family: str, f: int) -> str:
    t = table_name(f)
    return f"add table {family} {t}\ndelete table {family} {t}\n"


def family_tables(f: int, nat: bool, open_ports: Iterable[OpenPort] = ()) -> str:
    """Create (or re-create, empty of VMs) the tables of family f in one transaction.

    nat: the family's VMs may reach anything beyond the host (masqueraded).
    open_ports: routed traffic from outside the family may reach these ports of its VMs.
    """
    t, br, vx = table_name(f), netplan.bridge_name(f), netplan.vxlan_name(f)
    counters = "\n".join(
        f"\tcounter {name} {{ comment \"{why}\"; }}"
        for (fam, name), why in FAMILY_DROP_REASONS.items() if fam == "bridge")
    # The VM chains run at prerouting: the bridge learns a frame's source MAC
    # right after that hook, so a frame dropped only at forward would already
    # have taught it that (say) the parent's MAC now lives on a clone's port.
    # Input again, because link-local frames (01:80:c2:..) skip prerouting.
    # Priority filter (-200) runs before br_netfilter's detour through inet.
    #
    # This kernel lacks `meta ibrname` (CONFIG_NFT_BRIDGE_META is off) and the
    # hooks see every bridge on the host, so "a port of our bridge that is not
    # in the map" is recognised by its name (our taps) or by where its frames
    # go: forward into one of our VMs' ports.
    vm_hook = ("\t\tiifname vmap @ports\n"
               f"\t\tiifname \"{netplan.tap_prefix(f)}*\" counter name \"unknown_port\" drop\n"
               f"\t\tiifname \"{netplan.vxlan_name(f)}\" jump tunnel_in\n")
    tunnel_in = "".join(f"\t\t{rule}\n" for rule in _tunnel_rules(f))
    script = _drop_if_exists("bridge", f) + f"""table bridge {t} {{
{counters}
\tmap ports {{
\t\ttype ifname : verdict
\t}}
\tset vm_ports {{
\t\ttype ifname
\t}}
\tchain tunnel_in {{
{tunnel_in}\t}}
\tchain prerouting {{
\t\ttype filter hook prerouting priority filter; policy accept;
{vm_hook}\t}}
\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
{vm_hook}\t}}
\tchain forward {{
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname @vm_ports accept
\t\tiifname "{vx}" accept
\t\toifname @vm_ports counter name "unknown_port" drop
\t}}
\tchain output {{
\t\ttype filter hook output priority filter; policy accept;
\t\toifname "{vx}" drop
\t}}
}}
"""
    counters = "\n".join(
        f"\tcounter {name} {{ comment \"{why}\"; }}"
        for (fam, name), why in FAMILY_DROP_REASONS.items() if fam == "inet")
    forward = "".join(f"\t\t{rule}\n" for rule in _forward_rules(f, nat, open_ports))
    script += _drop_if_exists("inet", f) + f"""table inet {t} {{
{counters}
\tchain forward {{
\t\ttype filter hook forward priority 0; policy accept;
{forward}\t}}
\tchain input {{
\t\ttype filter hook input priority 0; policy accept;
\t\tiifname "{br}" udp dport 67 accept
\t\tiifname "{br}" ct state established,related accept
\t\tiifname "{br}" counter name "to_host" drop
\t}}
}}
"""
    script += _drop_if_exists("ip", f)
    if nat:
        script += f"""table ip {t} {{
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr {netplan.subnet(f)} oifname != "{br}" masquerade
\t}}
}}
"""
    return script


def _forward_rules(f: int, nat: bool, open_ports: Iterable[OpenPort]) -> list[str]:
    """The body of the inet forward chain, in order; the first match decides."""
    br = netplan.bridge_name(f)
    open_ports = parse_open_ports(open_ports)
    rules = [f'iifname "{br}" oifname "{br}" accept']
    if nat:
        # Egress: out to anywhere, and only answers back in.
        rules += [f'iifname "{br}" accept',
                  f'oifname "{br}" ct state established,related accept']
    elif open_ports:
        # Answers to connections let in through an open port go back out;
        # nothing else leaves (the family cannot start a connection outwards).
        rules.append(f'iifname "{br}" ct state established,related accept')
    # Declared ports before the catch-all drops: everything else routed into
    # the family is still counted by enter_family.
    for proto in PROTOCOLS:
        ports = ", ".join(str(p.port) for p in open_ports if p.proto == proto)
        if ports:
            rules.append(f'oifname "{br}" ip daddr {netplan.subnet(f)} {proto} dport {{ {ports} }} accept')
    return rules + [f'iifname "{br}" counter name "leave_family" drop',
                    f'oifname "{br}" counter name "enter_family" drop']


def _tunnel_rules(f: int) -> list[str]:
    """Chain tunnel_in: frames that arrive over the family's VXLAN port (its VMs
    on other hosts). Each host has its own gateway and DHCP server for the
    family, at the same address: those stay on their host (the output chain
    sends nothing of the host's own across), and from the tunnel only frames of
    the family's VMs pass; their own host's per-VM rules vouched for them."""
    plan_mac = netplan.mac(f, 0)[:11] + ":00:00"      # 0a:5f:<f>:00:00, the family's MACs
    gw_mac, gw, net = netplan.gateway_mac(f), netplan.gateway(f), netplan.subnet(f)
    drop = 'counter name "tunnel_in" drop'
    return [f"ether saddr & ff:ff:ff:ff:00:00 != {plan_mac} {drop}",
            f"ether saddr {gw_mac} {drop}",
            f"ether type ip6 {drop}",
            f"arp saddr ip {gw} {drop}",
            f"arp saddr ip != {net} {drop}",
            f"ip saddr {gw} {drop}",
            f"ip saddr != {net} {drop}",
            f"udp dport {{ 67, 68 }} {drop}",
            "ether type { ip, arp } accept",
            drop]


def _vm_rules(k: int, mac: str, ip: str) -> list[str]:
    """The body of chain vm_<k>, in order; the first match decides."""
    def drop(match: str, reason: str) -> str:
        action = f"counter name \"{vm_counter(k, reason)}\" drop comment \"{VM_DROP_REASONS[reason]}\""
        return f"{match} {action}" if match else action
    return [
        drop(f"ether saddr != {mac}", "mac"),
        # Before it has an address the DHCP client sends from 0.0.0.0.
        "ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept comment \"DHCP client without an address\"",
        # The sender fields below are read at fixed offsets: only Ethernet/IPv4 ARP has them there.
        drop("arp htype . arp ptype . arp hlen . arp plen != { 1 . ip . 6 . 4 }", "other"),
        drop(f"arp saddr ether != {mac}", "arp_mac"),
        drop(f"arp saddr ip != {ip}", "arp_ip"),
        drop(f"ip saddr != {ip}", "ip"),
        drop("ether type ip6", "ipv6"),
        "ether type { ip, arp } accept",
        drop("", "other"),
    ]


def add_vms(f: int, vms: Iterable[tuple[int, str, str, str]]) -> str:
    """Chains, counters and port-map elements for VMs (k, port ifname, mac, ip).

    Re-adding a VM replaces its rules (its chain is flushed first).
    """
    t = table_name(f)
    net = netplan.subnet(f)
    lines = []
    for k, port, mac, ip in vms:
        chain = vm_chain(k)
        mac = mac.lower()
        if not _MAC_RE.match(mac):
            raise ValueError(f"VM {k}: {mac!r} is not a MAC address")
        if ipaddress.IPv4Address(ip) not in net:
            raise ValueError(f"VM {k}: {ip} is outside family {f}'s subnet {net}")
        _check_ifname(port)
        lines += [f"add counter bridge {t} {vm_counter(k, r)}" for r in VM_DROP_REASONS]
        lines += [f"add chain bridge {t} {chain}", f"flush chain bridge {t} {chain}"]
        lines += [f"add rule bridge {t} {chain} {rule}" for rule in _vm_rules(k, mac, str(ip))]
        lines += [f"add element bridge {t} ports {{ \"{port}\" : goto {chain} }}",
                  f"add element bridge {t} vm_ports {{ \"{port}\" }}"]
    return "\n".join(lines) + "\n"


def remove_vms(f: int, ks: Iterable[int], ports: Mapping[int, str] | None = None) -> str:
    """Remove VMs' map elements, chains and counters; VMs already gone are fine.

    ports: {k: ifname} for VMs whose port is not named netplan.tap_name(f, k).
    """
    t = table_name(f)
    lines = []
    for k in ks:
        chain = vm_chain(k)
        port = (ports or {}).get(k) or netplan.tap_name(f, k)
        _check_ifname(port)
        lines += [f"add chain bridge {t} {chain}",
                  f"add element bridge {t} ports {{ \"{port}\" : goto {chain} }}",
                  f"delete element bridge {t} ports {{ \"{port}\" }}",
                  f"add element bridge {t} vm_ports {{ \"{port}\" }}",
                  f"delete element bridge {t} vm_ports {{ \"{port}\" }}",
                  f"flush chain bridge {t} {chain}",
                  f"delete chain bridge {t} {chain}"]
        for r in VM_DROP_REASONS:
            lines += [f"add counter bridge {t} {vm_counter(k, r)}",
                      f"delete counter bridge {t} {vm_counter(k, r)}"]
    return "\n".join(lines) + "\n"


def delete_family(f: int) -> str:
    """Drop all tables of family f, whether or not they exist."""
    return "".join(_drop_if_exists(fam, f) for fam in ("bridge", "inet", "ip"))


def parse_counters(nft_json: str) -> dict[str, int]:
    """`nft -j list counters ...` -> {"<table family>/<counter>": packets}."""
    out = {}
    for item in json.loads(nft_json).get("nftables", []):
        c = item.get("counter")
        if c:
            out[f"{c['family']}/{c['name']}"] = c["packets"]
    return out


def _check_ifname(name: str) -> None:
    # The name goes into a script between quotes: keep it to what Linux allows
    # and nothing that could end the string.
    if not name or len(name) > 15 or any(ch in name for ch in '"\\/ \t\n'):
        raise ValueError(f"{name!r} is not a usable interface name")
