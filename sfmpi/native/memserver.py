"""The memory server's process: `python3 -m sfmpi.native.memserver --listen ADDR ...`.

Prints `listening PORT` once it accepts connections, then serves until
SIGTERM. hostd owns it through hostd/memory/server.py (MemoryServer).
"""
from __future__ import annotations

import argparse
import sys

from . import load


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sfmpi-memserver", description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, help="numeric address to listen on")
    ap.add_argument("--port", type=int, default=0, help="0: the kernel picks one (printed)")
    ap.add_argument("--control", required=True, help="the control socket hostd adds checkpoints through")
    ap.add_argument("--counters", default=None)
    ap.add_argument("--max-connections", type=int, default=256)
    ap.add_argument("--multicast-from", default=None,
                    help="this host's address that checkpoints' multicast groups are sent from (none: unicast only)")
    ap.add_argument("--multicast-rate", type=int, default=0, help="bytes/s a group is paced to at most (0: 64 MiB/s)")
    args = ap.parse_args(argv)
    native = load()

    def ready(port: int) -> None:
        print(f"listening {port}", flush=True)
    try:
        native.serve(args.listen, args.port, args.control, args.counters, args.max_connections, ready,
                     args.multicast_from, args.multicast_rate)
    except OSError as exc:
        print(f"sfmpi-memserver: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
