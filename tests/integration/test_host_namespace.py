"""Family networks live in hostd's own network namespace: the host's main
namespace gains no route, address or bridge when VMs start; NAT and an open
port still work, through the namespace's one veth pair; `sfmpi down` removes it
(the other_home fixture's leak check)."""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.timeout(900)

# The world beyond the host, played by a namespace of this test: 198.18.0.0/15
# is for benchmarking test networks (RFC 2544), on no real network.
WORLD = ipaddress.IPv4Network(f"198.19.{os.getpid() % 256}.0/30")
HOST_SIDE, WORLD_IP = WORLD.network_address + 1, WORLD.network_address + 2
WORLD_NS = f"sfmtw{os.getpid() % 100000}"
WORLD_LINK = f"sfw{os.getpid() % 100000}"

# Accepts one connection and answers with the address it came from.
SERVER = ("import socket, sys\n"
          "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
          "s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4); s.settimeout(60)\n"
          "c, peer = s.accept(); c.sendall((peer[0] + '\\n').encode()); c.close()\n")
CLIENT = ("import socket, sys\n"
          "try:\n"
          "    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))\n"
          "    print(c.makefile().readline().strip())\n"
          "except OSError as e:\n"
          "    print('failed:', e); sys.exit(1)\n")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


def main_namespace() -> dict:
    """What the host's main namespace has: routes (main table), addresses, bridges."""
    routes = {(r.get("dst"), r.get("dev"), r.get("gateway")) for r in json.loads(sh("ip", "-j", "route").stdout)}
    addrs = {(a["ifname"], i["local"]) for a in json.loads(sh("ip", "-j", "addr").stdout)
             for i in a.get("addr_info", [])}
    bridges = {b["ifname"] for b in json.loads(sh("ip", "-j", "link", "show", "type", "bridge").stdout)}
    return {"routes": routes, "addrs": addrs, "bridges": bridges}


@pytest.fixture
def world():
    sh("ip", "netns", "add", WORLD_NS)
    try:
        sh("ip", "link", "add", WORLD_LINK, "type", "veth", "peer", "name", "eth0", "netns", WORLD_NS)
        sh("ip", "addr", "add", f"{HOST_SIDE}/30", "dev", WORLD_LINK)
        sh("ip", "link", "set", WORLD_LINK, "up")
        for argv in (["ip", "link", "set", "lo", "up"], ["ip", "link", "set", "eth0", "up"],
                     ["ip", "addr", "add", f"{WORLD_IP}/30", "dev", "eth0"]):
            sh("ip", "netns", "exec", WORLD_NS, *argv)
        yield WORLD_NS
    finally:
        sh("ip", "link", "del", WORLD_LINK, check=False)
        sh("ip", "netns", "del", WORLD_NS, check=False)


def serve_in(ns: str, address, port: int) -> subprocess.Popen:
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SERVER, str(address), str(port)],
                         stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    return p


def test_vms_live_in_hostds_namespace(other_home, world):
    c = other_home()
    c.json("vm", "list")                       # hostd up; its namespace comes with the first family
    before = main_namespace()
    assert not os.path.exists(f"/run/netns/{c.paths.netns}")
    c("vm", "start", "nsvm", "--mem", "256M", "--nat", "--open-port", "7200")
    assert os.path.exists(f"/run/netns/{c.paths.netns}")
    row = {r["name"]: r for r in c.json("vm", "list")}["nsvm"]
    after = main_namespace()
    # The uplink's host end has a link-local /32 and no route in the main table.
    uplink = f"sfu{c.paths.tag}"
    assert after["bridges"] == before["bridges"]
    assert after["routes"] == before["routes"], after["routes"] - before["routes"]
    assert {a for a in after["addrs"] - before["addrs"] if a[0] != uplink} == set()
    assert all(ipaddress.ip_address(ip).version == 4 and ipaddress.ip_address(ip).is_link_local
               for dev, ip in after["addrs"] - before["addrs"])
    # The family's bridge and tap are in hostd's namespace.
    inside = sh("ip", "-n", c.paths.netns, "-j", "link").stdout
    assert f"sfbr{row['family_no']}" in inside and f"sft{row['family_no']}x0" in inside

    # NAT: the VM reaches the world, masqueraded twice (namespace, then host).
    server = serve_in(world, WORLD_IP, 7100)
    seen = c.exec("nsvm", f"python3 -c \"{CLIENT}\" {WORLD_IP} 7100 10", check=False)
    server.kill()
    assert seen.returncode == 0 and seen.stdout.strip() == str(HOST_SIDE), seen.stdout + seen.stderr

    # An open port: the world, routing the family's subnet to the host, gets in to 7200 only.
    subnet = ipaddress.IPv4Interface(f"{row['ip']}/24").network
    sh("ip", "netns", "exec", world, "ip", "route", "add", str(subnet), "via", str(HOST_SIDE))
    guest_server = subprocess.Popen(["sfmpi", "vm", "exec", "nsvm", "--", "python3", "-c", SERVER, "0.0.0.0",
                                     "7200"], env=c.env, stdout=subprocess.PIPE, text=True)
    time.sleep(3)
    got = sh("ip", "netns", "exec", world, sys.executable, "-c", CLIENT, row["ip"], "7200", "10", check=False)
    assert got.returncode == 0 and got.stdout.strip() == str(WORLD_IP), got.stdout   # routed, not masqueraded
    guest_server.communicate(timeout=60)
    assert guest_server.returncode == 0
    closed = sh("ip", "netns", "exec", world, sys.executable, "-c", CLIENT, row["ip"], "7201", "3", check=False)
    assert closed.returncode != 0

    c("down")
    assert not os.path.exists(f"/run/netns/{c.paths.netns}")
    assert not os.path.exists(f"/sys/class/net/{uplink}")
    assert main_namespace()["routes"] == before["routes"]
