"""The address plan of family networks: pure functions of (family number, ID).

docs/clone-api.md, "Family networks and identities". Family f (1..38399) owns
the f-th /24 after the base, by default 10.(100 + f // 256).(f % 256).0; ID k
(0 = the parent, 1..250 = clones) has .(k + 2) and a locally administered MAC
that spells out (f, k), so no two VMs of a hostd collide and nothing has to be
stored to know who is who. The families live in hostd's own network namespace,
so the plan never meets the host's routes; a site that routes family subnets
(open ports) picks a base that is free on its network: SFMPI_FAMILY_BASE.
"""
from __future__ import annotations

import ipaddress
import os
import re

from sfmpi.errors import UsageError

FIRST_FAMILY = 1
# With the default base, 10.(100 + f // 256) stays inside 10.0.0.0/8: 100 + 38399 // 256 = 249.
LAST_FAMILY = 38399


def _base(text: str) -> ipaddress.IPv4Address:
    try:
        base = ipaddress.IPv4Address(text)
    except ValueError:
        raise UsageError(f"SFMPI_FAMILY_BASE={text!r} is not an IPv4 address") from None
    last = int(base) + (LAST_FAMILY + 1) * 256 - 1
    if int(base) % 256 or last > int(ipaddress.IPv4Address("255.255.255.255")) or \
            not (base.is_private and ipaddress.IPv4Address(last).is_private):
        raise UsageError(f"SFMPI_FAMILY_BASE={text!r}: families need {LAST_FAMILY + 1} /24s of private "
                         "space from a /24 boundary (e.g. 10.100.0.0)")
    return base


BASE = _base(os.environ.get("SFMPI_FAMILY_BASE", "10.100.0.0"))
# Every family may come to span hosts (VXLAN: 50 bytes of headers in the
# underlay's 1500), so every guest NIC gets this MTU from the start.
MTU = 1450
MAX_ID = 250  # .252 is the last address; .253/.254 stay free, .255 is broadcast
PREFIX = 24

MAC_PREFIX = "0a:5f"  # 0x0a: the locally administered bit set, unicast
_MAC_RE = re.compile(r"^0a:5f:([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2}):([0-9a-f]{2})$")


def check_family(f: int) -> int:
    if isinstance(f, bool) or not isinstance(f, int) or not FIRST_FAMILY <= f <= LAST_FAMILY:
        raise UsageError(f"family number {f!r} is out of range ({FIRST_FAMILY}..{LAST_FAMILY})")
    return f


def check_id(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_ID:
        raise UsageError(f"clone ID {k!r} is out of range (0 = parent, 1..{MAX_ID} = clones)")
    return k


def subnet(f: int) -> ipaddress.IPv4Network:
    check_family(f)
    return ipaddress.IPv4Network((int(BASE) + f * 256, PREFIX))


def gateway(f: int) -> ipaddress.IPv4Address:
    """The host's address on the family bridge."""
    return subnet(f).network_address + 1


def ip(f: int, k: int) -> ipaddress.IPv4Address:
    check_id(k)
    return subnet(f).network_address + (k + 2)


def mac(f: int, k: int) -> str:
    check_family(f)
    check_id(k)
    return "0a:5f:%02x:%02x:%02x:%02x" % (f >> 8, f & 255, k >> 8, k & 255)


def gateway_mac(f: int) -> str:
    """A fixed MAC for the bridge: otherwise Linux gives it the lowest port MAC,
    which changes as clones join and leave and would stale the guests' ARP caches.
    ff:ff in the ID bytes is never a VM's (IDs end at 250), so parse_mac() says None."""
    check_family(f)
    return "0a:5f:%02x:%02x:ff:ff" % (f >> 8, f & 255)


def parse_mac(address: str) -> tuple[int, int] | None:
    """(f, k) for a MAC of our plan; None for any other MAC."""
    m = _MAC_RE.match(address.strip().lower())
    if not m:
        return None
    hi_f, lo_f, hi_k, lo_k = (int(x, 16) for x in m.groups())
    f, k = hi_f << 8 | lo_f, hi_k << 8 | lo_k
    if not FIRST_FAMILY <= f <= LAST_FAMILY or not 0 <= k <= MAX_ID:
        return None
    return f, k


def hostname(name: str, k: int) -> str:
    check_id(k)
    if not name:
        raise UsageError("a family needs a name (the parent VM's) for its hostnames")
    return name if k == 0 else f"{name}-{k}"


# Interface names must fit IFNAMSIZ - 1 = 15 characters: "sfbr38399" is 9,
# "sft38399x250" is 12.
def bridge_name(f: int) -> str:
    return f"sfbr{check_family(f)}"


def vxlan_name(f: int) -> str:
    """The family's VXLAN port, present while the family spans hosts ("sfvx38399": 9)."""
    return f"sfvx{check_family(f)}"


def tap_name(f: int, k: int) -> str:
    return f"{tap_prefix(f)}{check_id(k)}"


def tap_prefix(f: int) -> str:
    """What every tap name of family f starts with (and no other family's)."""
    return f"sft{check_family(f)}x"


def identity(f: int, name: str, k: int) -> dict:
    """Everything a VM needs to configure itself (what `whoami` reports)."""
    return {
        "mac": mac(f, k),
        "ip": str(ip(f, k)),
        "prefix": PREFIX,
        "mtu": MTU,
        "gateway": str(gateway(f)),
        "hostname": hostname(name, k),
        "family": name,
        "family_no": f,
        "id": k,
    }
