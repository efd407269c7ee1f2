"""Loss on one host's link, for tests: nftables in that network namespace drops
a share of the multicast datagrams arriving there. (netem would be the usual
tool; this kernel has no netem qdisc.)"""
from __future__ import annotations

import contextlib
import subprocess

TABLE = "sfmpi_test_loss"


@contextlib.contextmanager
def multicast_loss(netns: str, percent: int):
    share = f"numgen random mod 100 < {percent} " if percent < 100 else ""
    rules = (f"table ip {TABLE} {{\n chain in {{\n  type filter hook prerouting priority raw;\n"
             f"  ip daddr 239.0.0.0/8 {share}counter drop\n }}\n}}\n")
    subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=rules, text=True, check=True,
                   capture_output=True)
    try:
        yield
    finally:
        subprocess.run(["ip", "netns", "exec", netns, "nft", "delete", "table", "ip", TABLE], capture_output=True)
