"""Network rate limits on a VM's tap, as command lines and nftables text (pure).

Both directions, each with what this kernel has (measured: no act_police and no
matchall or u32 classifier, so tc cannot police a tap's ingress):
- to the guest: a tbf qdisc at the root of the tap (the tap's egress is what
  the guest receives); it queues, so TCP into the guest slows smoothly;
- from the guest: an nftables `netdev` table whose ingress chain on the tap
  drops what exceeds the rate (a policer; TCP backs off to it).
"""
from __future__ import annotations

TABLE_PREFIX = "sfmpi_rate_"


def table_name(tap: str) -> str:
    return f"{TABLE_PREFIX}{tap}"


def burst_bytes(rate_bps: int) -> int:
    """At least 10 ms of traffic and two full frames, so a low rate still passes a frame."""
    return max(rate_bps // 8 // 100, 2 * 1514 + 1514)


def tbf_argv(tap: str, rate_bps: int) -> list[str]:
    return ["tc", "qdisc", "replace", "dev", tap, "root", "tbf", "rate", f"{rate_bps}bit",
            "burst", str(burst_bytes(rate_bps)), "latency", "100ms"]


def tbf_clear_argv(tap: str) -> list[str]:
    return ["tc", "qdisc", "del", "dev", tap, "root"]


def ingress_script(tap: str, rate_bps: int | None) -> str:
    """`nft -f -` text that replaces the tap's table (rate None: only removes it).
    "add; delete" first: nftables 1.0.6 has no `destroy`."""
    t = table_name(tap)
    script = f"add table netdev {t}\ndelete table netdev {t}\n"
    if rate_bps is not None:
        script += (f"table netdev {t} {{\n  chain guest_tx {{\n"
                   f"    type filter hook ingress device \"{tap}\" priority 0; policy accept;\n"
                   f"    limit rate over {rate_bps // 8} bytes/second burst {burst_bytes(rate_bps)} bytes "
                   f"counter drop\n  }}\n}}\n")
    return script
