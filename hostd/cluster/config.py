"""Where this hostd sits in a cluster: its name, its address, its keys, the master.

A hostd alone on a machine has none of this (the master stays embedded, as
before). A hostd of a cluster, or of a lab host, is told by its environment:

    SFMPI_HOST_NAME     its name in the cluster (the CN of its certificate)
    SFMPI_HOST_ADDRESS  its address on the hosts' network: the peer listener,
                        the memory server, NBD exports and VXLAN use it
    SFMPI_MASTER        the master's address, HOST:PORT
    SFMPI_CLUSTER_KEYS  the directory `sfmpi cluster init` / `lab up` made
    SFMPI_FAMILY_START  where this host's family numbers start: a family keeps
                        its number on every host it spans, so hosts number
                        their own families from disjoint ranges
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from sfmpi.errors import UsageError

MASTER_PORT = 7440
PEER_PORT = 7441
MEMORY_PORT = 7442
NBD_PORT = 10809
MASTER_NAME = "master"     # the master's certificate
ADMIN_NAME = "admin"       # the CLI's certificate, for calls to the master


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if ":" in text else (text, "", str(default_port))
    try:
        ipaddress.IPv4Address(host)
        port_no = int(port)
        if not 0 < port_no < 65536:
            raise ValueError
    except ValueError:
        raise UsageError(f"{text!r} is not an address of the form IPV4:PORT") from None
    return host, port_no


@dataclass(frozen=True)
class ClusterConfig:
    host: str
    address: str
    keys: Path
    master: tuple[str, int]
    family_start: int = 1

    @property
    def qemu_tls(self) -> Path:
        """This host's x509 directory for QEMU and qemu-nbd (keys.py makes it):
        the NBD server's credentials and a client's, for remote clones' disks."""
        return self.keys / f"qemu-{self.host}"

    @classmethod
    def from_env(cls, env: dict | None = None) -> "ClusterConfig | None":
        env = os.environ if env is None else env
        if not env.get("SFMPI_MASTER"):
            return None
        missing = [k for k in ("SFMPI_HOST_NAME", "SFMPI_HOST_ADDRESS", "SFMPI_CLUSTER_KEYS") if not env.get(k)]
        if missing:
            raise UsageError(f"SFMPI_MASTER is set, so hostd is part of a cluster, but {', '.join(missing)} "
                             "is not (docs/cluster.md)")
        address, _ = parse_address(env["SFMPI_HOST_ADDRESS"], PEER_PORT)
        try:
            start = int(env.get("SFMPI_FAMILY_START", "1"))
        except ValueError:
            raise UsageError(f"SFMPI_FAMILY_START must be a number (got {env['SFMPI_FAMILY_START']!r})") from None
        return cls(host=env["SFMPI_HOST_NAME"], address=address, keys=Path(env["SFMPI_CLUSTER_KEYS"]),
                   master=parse_address(env["SFMPI_MASTER"], MASTER_PORT), family_start=start)
