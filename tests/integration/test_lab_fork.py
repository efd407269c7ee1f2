"""A fork across hosts, on a lab of 3 (`sfmpi lab up --hosts 3`, policy spread):
a parent on lab1 forks 6 clones, 2 per host; each reads what the parent wrote
to memory and to disk before the fork (its RAM through memtap from lab1's
memory server, its disk through NBD), knows the host it runs on, and reaches
clones on other hosts over the family's VXLAN. Then every VM stops and
`lab down` leaves nothing in any namespace."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.leakcheck import lab_leaks

pytestmark = [pytest.mark.lab, pytest.mark.timeout(900)]


def sfmpi(*args: str, host: str | None = None, env: dict, check: bool = True, timeout: float = 300):
    p = subprocess.run(["sfmpi", *(["--host", host] if host else []), *args], env=env, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"sfmpi {' '.join(args)} on {host} exited {p.returncode}:\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    home = tmp_path_factory.mktemp("lab") / "lab"
    env = {**os.environ, "SFMPI_LAB_HOME": str(home)}
    hosts: list[Path] = []
    try:
        rec = json.loads(sfmpi("lab", "up", "--hosts", "3", "--mem-budget", "3G", "--json", env=env,
                               timeout=240).stdout)
        hosts = [Path(h["home"]) for h in rec["hosts"].values()]
        yield env
    finally:
        sfmpi("lab", "down", env=env, check=False, timeout=300)
        left = lab_leaks(home, hosts)
        assert left == [], f"lab down left: {left}"


def test_a_parent_on_lab1_forks_six_clones_spread_over_three_hosts(lab):
    env = lab
    sfmpi("vm", "start", "p", "--mem", "256M", host="lab1", env=env)
    # Memory (tmpfs is RAM) and disk, written before the fork.
    sfmpi("vm", "exec", "p", "--", "sh", "-c",
          "echo in-memory > /dev/shm/m.txt; echo on-disk > /root/d.txt; sync", host="lab1", env=env)
    ck = sfmpi("checkpoint", "p", host="lab1", env=env).stdout.strip()
    res = json.loads(sfmpi("clone", ck, "-n", "6", "--json", host="lab1", env=env).stdout)
    assert res["placement"] == {"lab1": 2, "lab2": 2, "lab3": 2}
    assert sorted(res["hosts"].values()) == ["lab1", "lab1", "lab2", "lab2", "lab3", "lab3"]
    everywhere = json.loads(sfmpi("vm", "list", "--all", "--json", env=env).stdout)
    assert {(r["name"], r["host"]) for r in everywhere} == {("p", "lab1"), *res["hosts"].items()}
    for name, host in res["hosts"].items():
        out = sfmpi("vm", "exec", name, "--", "sh", "-c", "cat /dev/shm/m.txt /root/d.txt; sfclone whoami --json",
                    host=host, env=env).stdout
        data, who = out.split("\n", 2)[:2], json.loads(out.split("\n", 2)[2])
        assert data == ["in-memory", "on-disk"]
        assert who["host"] == host and who["hostname"] == name and who["role"] == "clone"
    # Across hosts over the family's network: a clone on lab3 and the parent on lab1
    # talk to a clone on lab2 (TCP, more than one MTU each way).
    server = next(n for n, h in res["hosts"].items() if h == "lab2")
    ip = next(r["ip"] for r in everywhere if r["name"] == server)
    listener = subprocess.Popen(
        ["sfmpi", "--host", "lab2", "vm", "exec", server, "--", "python3", "-c",
         "import socket\ns = socket.create_server(('', 5000))\nfor _ in range(2):\n"
         "    c, _a = s.accept(); n = 0\n    while (d := c.recv(65536)): n += len(d)\n"
         "    c.sendall(b'%d from %s' % (n, socket.gethostname().encode())); c.close()\n"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = ("import socket, time\nfor i in range(50):\n    try:\n"
                  f"        c = socket.create_connection(('{ip}', 5000), timeout=5); break\n"
                  "    except OSError: time.sleep(0.2)\n"
                  "c.sendall(b'x' * 100000); c.shutdown(socket.SHUT_WR); print(c.recv(100).decode())\n")
        for host, name in (("lab3", next(n for n, h in res["hosts"].items() if h == "lab3")), ("lab1", "p")):
            got = sfmpi("vm", "exec", name, "--", "python3", "-c", client, host=host, env=env).stdout.strip()
            assert got == f"100000 from {server}"
        listener.wait(30)
    finally:
        if listener.poll() is None:
            listener.kill()
    for name, host in res["hosts"].items():
        sfmpi("vm", "stop", name, host=host, env=env)
    # What lab1 served for the other hosts' clones is let go of with them.
    for host in ("lab2", "lab3"):
        stats = json.loads(sfmpi("stats", "--json", host=host, env=env).stdout)
        assert stats["memory"]["memtaps"] == []
    remaining = json.loads(sfmpi("vm", "list", "--all", "--json", env=env).stdout)
    assert [(r["name"], r["host"]) for r in remaining] == [("p", "lab1")]
