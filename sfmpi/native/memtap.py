"""memtap's process: `python3 -m sfmpi.native.memtap --mount DIR --server ADDR:PORT ...`.

Mounts DIR with one file, DIR/ram, the remote checkpoint's RAM; prints
`ready` once it can be opened; serves until SIGTERM, then unmounts. The token
comes from a file (mode 0600), never the command line, which any local user
can read. hostd owns it through hostd/memory/memtap.py (Memtap).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import load


def split_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not ADDRESS:PORT")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sfmpi-memtap", description=__doc__.split("\n\n")[0])
    ap.add_argument("--mount", required=True)
    ap.add_argument("--server", required=True, type=split_address, help="the memory server, ADDRESS:PORT")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--token-file", required=True, type=Path)
    ap.add_argument("--page-map", required=True)
    ap.add_argument("--counters", required=True)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--timeout-ms", type=int, default=10000, help="per request and connect")
    ap.add_argument("--read-ahead-kb", type=int, default=0, help="what one fault reads beyond its page")
    ap.add_argument("--group", default=None, help="the checkpoint's multicast group ADDRESS:PORT (none: unicast)")
    ap.add_argument("--multicast-local", default=None, help="this host's address on the network of the group")
    ap.add_argument("--multicast-wait-ms", type=int, default=200,
                    help="how long a fault waits for the group before asking by unicast")
    ap.add_argument("--push", action="store_true", help="fetch every non-zero page in the background")
    ap.add_argument("--working-set", default=None, help="a recorded working set to ask for first")
    args = ap.parse_args(argv)
    native = load()
    try:
        token = args.token_file.read_text().strip()
        host, port = args.server
        native.memtap(args.mount, host, port, args.checkpoint, token, args.page_map, args.counters,
                      args.connections, args.timeout_ms, args.read_ahead_kb, lambda: print("ready", flush=True),
                      args.group, args.multicast_local, args.multicast_wait_ms, args.push, args.working_set)
    except OSError as exc:
        print(f"sfmpi-memtap: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
