"""A fork across hosts, on a lab of 3 (`sfmpi lab up --hosts 3`, policy spread):
a parent on lab1 forks 6 clones, 2 per host; each reads what the parent wrote
to memory and to disk before the fork (its RAM through memtap from lab1's
memory server, its disk through NBD), knows the host it runs on, and reaches
clones on other hosts over the family's VXLAN. Then every VM stops and
`lab down` leaves nothing in any namespace."""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
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


@contextlib.contextmanager
def lab_of(tmp_path_factory, name: str):
    """A lab of 3 (the environment that points the CLI at it); `lab down` after,
    and nothing left in any of its namespaces."""
    home = tmp_path_factory.mktemp(name) / "lab"
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


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    with lab_of(tmp_path_factory, "lab") as env:
        yield env


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
    # Statistics through the master: every VM with its host; the clone on lab2 received both transfers.
    time.sleep(2.5)   # a sample after the transfers
    latest = json.loads(sfmpi("stats", "latest", "--all", "--json", env=env).stdout)
    assert {(r["vm"], r["host"]) for r in latest} == {("p", "lab1"), *res["hosts"].items()}
    assert next(r for r in latest if r["vm"] == server)["net_rx_bytes"] >= 200_000
    # Resource settings through the master, wherever the VM runs; the host's own check still decides.
    far = next(n for n, h in res["hosts"].items() if h == "lab3")
    got = json.loads(sfmpi("vm", "set", far, "--cpu-limit", "50", "--all", "--json", env=env).stdout)
    assert got["host"] == "lab3" and got["resources"] == {"cpu_limit": 50.0} and got["applied"], got
    rows = json.loads(sfmpi("vm", "list", "--json", host="lab3", env=env).stdout)
    assert next(r for r in rows if r["name"] == far)["resources"] == {"cpu_limit": 50.0}
    for args, says in ((["nosuch", "--cpu-limit", "50"], "no VM named nosuch on any up host"),
                       ([far, "--cpu-limit", "500"], "1-100 for a VM of 1 vCPU")):
        p = sfmpi("vm", "set", *args, "--all", env=env, check=False, timeout=60)
        assert p.returncode != 0 and says in p.stderr, p.stderr
    _stop(env, res["hosts"])
    # What lab1 served for the other hosts' clones is let go of with them.
    for host in ("lab2", "lab3"):
        stats = json.loads(sfmpi("stats", "--json", host=host, env=env).stdout)
        assert stats["memory"]["memtaps"] == []
    remaining = json.loads(sfmpi("vm", "list", "--all", "--json", env=env).stdout)
    assert [(r["name"], r["host"]) for r in remaining] == [("p", "lab1")]


GUEST_FORK = r'''
import json, socket, sfmpi
t = sfmpi.request_ticket(6)
i = sfmpi.clone(t)
if i == 0:
    statuses = sfmpi.join(t)
    print(json.dumps({"granted": t.granted, "statuses": {str(k): v for k, v in statuses.items()},
                      "failures": statuses.failures}))
else:
    me = sfmpi.whoami()
    # Tell the parent where this clone runs, through its exit status: 10 * host number + ID.
    sfmpi.exit(10 * int(me["host"][3:]) + i)
'''


def _stop(env, hosts: dict[str, str]) -> None:
    """Stop each clone (name -> host) on its host."""
    for name, host in hosts.items():
        sfmpi("vm", "stop", name, host=host, env=env)


def _put(env, host, vm, path, text):
    sfmpi("vm", "exec", vm, "--", "sh", "-c", f"cat > {path} <<'SFMPI_EOF'\n{text}\nSFMPI_EOF", host=host, env=env)


def test_a_clone_call_in_the_guest_spreads_its_clones_over_the_hosts(lab):
    env = lab
    _put(env, "lab1", "p", "/root/fork.py", GUEST_FORK)
    out = sfmpi("vm", "exec", "p", "--", "python3", "/root/fork.py", host="lab1", env=env).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert res["granted"] == 6 and res["failures"] == {}
    # Clone IDs 1..6 of the ticket, 2 on each host (spread): the status says which host.
    hosts = sorted(status // 10 for status in res["statuses"].values())
    assert sorted(int(k) for k in res["statuses"]) == [1, 2, 3, 4, 5, 6]
    assert hosts == [1, 1, 2, 2, 3, 3]
    assert all(status % 10 == int(k) for k, status in res["statuses"].items())
    everywhere = json.loads(sfmpi("vm", "list", "--all", "--json", env=env).stdout)
    assert [(r["name"], r["host"]) for r in everywhere] == [("p", "lab1")]


@pytest.mark.parametrize("flavour", ["mpich", "openmpi"])
def test_sfmpirun_runs_ranks_on_every_host(lab, flavour):
    env = lab

    def served() -> dict:
        return json.loads(sfmpi("stats", "--json", host="lab1", env=env).stdout)["memory"]["server"]["checkpoints"]
    before = served()
    examples = Path(__file__).resolve().parents[2] / "examples" / "mpi"
    _put(env, "lab1", "p", "/root/cpi.c", (examples / "cpi.c").read_text())
    sfmpi("vm", "exec", "p", "--", "sh", "-c", f"cd /root && test -x cpi_{flavour} || "
          f"mpicc.{flavour} -O2 -o cpi_{flavour} cpi.c -lm", host="lab1", env=env)
    p = sfmpi("vm", "exec", "p", "--", "sh", "-c", f"cd /root && sfmpirun -n 6 ./cpi_{flavour} 100000",
              host="lab1", env=env, check=False)
    assert p.returncode == 0, p.stderr
    assert re.search(r"^pi is approximately 3\.14159", p.stdout, re.M)
    ranks = dict(re.findall(r"^rank (\d) of 6 on (\S+)$", p.stdout, re.M))
    assert sorted(ranks) == ["0", "1", "2", "3", "4", "5"]
    # Each rank on its own VM; clones on other hosts: lab1's memory server served the job's checkpoint
    # (clones on lab1 map its RAM file directly).
    assert len(set(ranks.values())) == 6
    job = {ck: c for ck, c in served().items() if ck not in before}
    # By unicast or, where the hosts share a multicast group, by multicast.
    assert len(job) == 1, job
    sent = next(iter(job.values()))
    assert sent["bytes_sent"] + sent["mc_sent_bytes"] > 0, job


SECTION6 = r"""
import json, socket, sfmpi
with sfmpi.parallel(6) as s:
    got = s.gather((s.rank, sfmpi.whoami()["host"], socket.gethostname()))
print(json.dumps({"got": got, "size": s.size}))
"""


def test_a_parallel_section_spreads_over_the_hosts(lab):
    env = lab
    _put(env, "lab1", "p", "/root/section6.py", SECTION6)
    res = json.loads(sfmpi("vm", "exec", "p", "--", "python3", "/root/section6.py", host="lab1",
                           env=env).stdout.strip().splitlines()[-1])
    assert res["size"] == 6
    assert [r for r, _h, _n in res["got"]] == [0, 1, 2, 3, 4, 5]
    hosts = [h for _r, h, _n in res["got"]]
    assert hosts[0] == "lab1" and set(hosts) == {"lab1", "lab2", "lab3"}, hosts
    assert len({n for _r, _h, n in res["got"]}) == 6
    _no_clones_left(env)


def _no_clones_left(env) -> None:
    import time
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        left = [(r["name"], r["host"]) for r in json.loads(sfmpi("vm", "list", "--all", "--json", env=env).stdout)]
        if left == [("p", "lab1")]:
            return
        time.sleep(0.5)
    raise AssertionError(f"clones left: {left}")


def _record(env) -> dict:
    return json.loads((Path(env["SFMPI_LAB_HOME"]) / "lab.json").read_text())


def test_a_clone_host_whose_ram_directory_is_full_still_takes_clones(lab):
    """lab2's RAM directory (its own tmpfs) is filled to the last block. A parent
    there is refused before QEMU starts, with the reason; clones from lab1 still
    start on lab2 and read the parent's memory and disk: their RAM is served by
    lab1 and their private pages are anonymous memory, nothing of theirs lives in
    the RAM directory."""
    env = lab
    ram = Path(_record(env)["hosts"]["lab2"]["ram_dir"])
    filler = ram / "filler"
    st = os.statvfs(ram)
    subprocess.run(["fallocate", "-l", str(st.f_bavail * st.f_frsize), str(filler)], check=True)
    try:
        assert os.statvfs(ram).f_bavail == 0
        p = sfmpi("vm", "start", "q", "--mem", "256M", host="lab2", env=env, check=False)
        assert p.returncode != 0
        assert "start of VM q refused: its RAM directory" in p.stderr and "has 0 MiB free" in p.stderr, p.stderr
        assert "q" not in [r["name"] for r in json.loads(sfmpi("vm", "list", "--json", host="lab2", env=env).stdout)]
        ck = sfmpi("checkpoint", "p", host="lab1", env=env).stdout.strip()
        res = json.loads(sfmpi("clone", ck, "-n", "3", "--json", host="lab1", env=env).stdout)
        on2 = [n for n, h in res["hosts"].items() if h == "lab2"]
        assert len(on2) == 1, res["hosts"]
        out = sfmpi("vm", "exec", on2[0], "--", "cat", "/dev/shm/m.txt", "/root/d.txt", host="lab2", env=env).stdout
        assert out.split() == ["in-memory", "on-disk"]
        _stop(env, res["hosts"])
        sfmpi("checkpoint", "rm", ck, host="lab1", env=env)
    finally:
        filler.unlink()
    _no_clones_left(env)


def test_the_parent_hosts_memory_server_killed_fails_the_remote_clones_clearly(lab):
    """lab1's memory server dies while clones on lab2 and lab3 have fetched only
    part of the checkpoint: the next fault of lab2's clone fails it with the reason
    and lab1 forgets it; lab1's own clone (it maps the RAM file) goes on; the next
    fork gets a new server and lab2 a new memtap."""
    import signal
    import time
    env = lab
    sfmpi("vm", "exec", "p", "--", "sh", "-c", "head -c 48M /dev/urandom > /dev/shm/big", host="lab1", env=env)
    try:
        want = sfmpi("vm", "exec", "p", "--", "md5sum", "/dev/shm/big", host="lab1", env=env).stdout.split()[0]
        ck = sfmpi("checkpoint", "p", host="lab1", env=env).stdout.strip()
        res = json.loads(sfmpi("clone", ck, "-n", "3", "--json", host="lab1", env=env).stdout)
        by_host = {h: n for n, h in res["hosts"].items()}
        assert sorted(by_host) == ["lab1", "lab2", "lab3"]
        assert sfmpi("vm", "exec", by_host["lab2"], "--", "cat", "/dev/shm/m.txt", host="lab2",
                     env=env).stdout.strip() == "in-memory"
        server = json.loads(sfmpi("stats", "--json", host="lab1", env=env).stdout)["memory"]["server"]
        os.kill(server["pid"], signal.SIGKILL)
        p = sfmpi("vm", "exec", by_host["lab2"], "--", "md5sum", "/dev/shm/big", host="lab2", env=env,
                  check=False, timeout=180)
        assert p.returncode != 0 and "its memory could not be fetched" in p.stderr + p.stdout, (p.stdout, p.stderr)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            names = [r["name"] for r in json.loads(sfmpi("vm", "list", "--all", "--json", env=env).stdout)
                     if r["state"] == "running"]
            if by_host["lab2"] not in names:
                break
            time.sleep(0.5)
        assert by_host["lab2"] not in names, names
        assert sfmpi("vm", "exec", by_host["lab1"], "--", "md5sum", "/dev/shm/big", host="lab1",
                     env=env).stdout.split()[0] == want
        for host in ("lab1", "lab3"):
            sfmpi("vm", "stop", by_host[host], host=host, env=env)
        sfmpi("vm", "stop", by_host["lab2"], host="lab2", env=env, check=False)   # crashed: its record goes
        again = json.loads(sfmpi("clone", ck, "-n", "2", "--json", host="lab1", env=env).stdout)
        name2 = next(n for n, h in again["hosts"].items() if h == "lab2")
        assert sfmpi("vm", "exec", name2, "--", "md5sum", "/dev/shm/big", host="lab2",
                     env=env).stdout.split()[0] == want
        _stop(env, again["hosts"])
        sfmpi("checkpoint", "rm", ck, host="lab1", env=env)
    finally:
        sfmpi("vm", "exec", "p", "--", "rm", "-f", "/dev/shm/big", host="lab1", env=env, check=False)
    _no_clones_left(env)


def ticket_job(n: int, clone_part: str) -> str:
    """A guest program: a ticket of n, clone; the parent joins and prints the
    statuses and failures as JSON; each clone runs clone_part (indented)."""
    return (f"import json, os, time, sfmpi\nt = sfmpi.request_ticket({n})\ni = sfmpi.clone(t)\nif i == 0:\n"
            "    statuses = sfmpi.join(t, timeout=400)\n"
            "    print(json.dumps({'statuses': {str(k): v for k, v in statuses.items()}, "
            "'failures': statuses.failures}))\nelse:\n" + clone_part)


RESTART_JOB = ticket_job(4, r"""    while not os.path.exists("/dev/shm/go"):
        time.sleep(0.2)
    sfmpi.exit(i)
""")


def test_the_master_restarted_mid_ticket(lab):
    """The master is killed while a ticket's 4 clones run on 3 hosts: a fork asked
    for meanwhile fails with the reason and leaves nothing; the running clones go
    on; the master is restarted (its hosts are in its database, none is failed),
    the clones exit and the parent's join has every status; placement works again."""
    import signal
    import time

    import psutil

    from sfmpi.hostd.lab.lab import Lab
    env = lab
    _put(env, "lab1", "p", "/root/restart.py", RESTART_JOB)
    job = subprocess.Popen(["sfmpi", "--host", "lab1", "vm", "exec", "p", "--", "python3", "/root/restart.py"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        running: dict[str, str] = {}
        while time.monotonic() < deadline and len(running) < 4:
            running = {r["name"]: h for h in ("lab1", "lab2", "lab3")
                       for r in json.loads(sfmpi("vm", "list", "--json", host=h, env=env).stdout)
                       if r["role"] == "clone" and r["state"] == "running"}
            time.sleep(1)
        assert sorted(running.values()) == ["lab1", "lab1", "lab2", "lab3"], running
        psutil.Process(_record(env)["master"]["pid"]).send_signal(signal.SIGKILL)
        ck = json.loads(sfmpi("checkpoint", "ls", "--json", host="lab1", env=env).stdout)[0]["id"]
        p = sfmpi("clone", ck, "-n", "3", host="lab1", env=env, check=False)
        assert p.returncode != 0 and "master" in p.stderr, p.stderr
        assert len(json.loads(sfmpi("vm", "list", "--json", host="lab1", env=env).stdout)) == 3  # p and 2 clones
        time.sleep(8)       # longer than a host's heartbeat timeout: the restarted master must not fail them
        Lab(Path(env["SFMPI_LAB_HOME"])).restart_master()
        time.sleep(3)
        for name, host in running.items():
            sfmpi("vm", "exec", name, "--", "touch", "/dev/shm/go", host=host, env=env)
        out, err = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["failures"] == {} and res["statuses"] == {"1": 1, "2": 2, "3": 3, "4": 4}, res
    hosts = json.loads(sfmpi("lab", "status", "--json", env=env).stdout)
    assert {h["name"]: h["state"] for h in hosts} == {"lab1": "up", "lab2": "up", "lab3": "up"}, hosts
    again = json.loads(sfmpi("clone", ck, "-n", "3", "--json", host="lab1", env=env).stdout)
    assert again["placement"] == {"lab1": 1, "lab2": 1, "lab3": 1}
    _stop(env, again["hosts"])
    _no_clones_left(env)


LOST_HOST_JOB = ticket_job(6, r'''    host = sfmpi.whoami()["host"]
    if host == "lab3":
        open("/dev/shm/ready", "w").close()
        time.sleep(600)          # its host is removed under it
    sfmpi.exit(i)
''')


def test_a_host_removed_mid_ticket_fails_its_clones_and_the_rest_of_the_job_ends(lab):
    """lab3's hostd and QEMUs are killed while its 2 clones run: the master marks it
    down, the parent's join reports those 2 as failed and the other 4 with their
    status; `lab down` (the fixture) still leaves nothing, lab3's leftovers included."""
    import signal
    import time

    import psutil
    env = lab
    _put(env, "lab1", "p", "/root/lost.py", LOST_HOST_JOB)
    job = subprocess.Popen(["sfmpi", "--host", "lab1", "vm", "exec", "p", "--", "python3", "/root/lost.py"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        lab3 = []
        while time.monotonic() < deadline and len(lab3) < 2:
            lab3 = [r for r in json.loads(sfmpi("vm", "list", "--json", host="lab3", env=env).stdout)
                    if r["state"] == "running"]
            time.sleep(1)
        assert len(lab3) == 2, lab3
        home = Path(env["SFMPI_LAB_HOME"])
        rec = json.loads((home / "lab.json").read_text())
        victims = [rec["hosts"]["lab3"]["pid"], *(r["pid"] for r in lab3)]
        for pid in victims:
            psutil.Process(pid).send_signal(signal.SIGKILL)
        out, err = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert len(res["failures"]) == 2 and all("lab3 stopped answering" in f for f in res["failures"].values())
    assert len(res["statuses"]) == 4 and all(int(k) == v for k, v in res["statuses"].items())
    # The master's placement leaves lab3 out from here on (its room is not up).
    res = json.loads(sfmpi("clone", json.loads(sfmpi("checkpoint", "ls", "--json", host="lab1", env=env).stdout)[0]["id"],
                           "-n", "2", "--json", host="lab1", env=env).stdout)
    assert "lab3" not in res.get("placement", {"lab1": 2})
    _stop(env, res.get("hosts") or {n: "lab1" for n in res["clones"]})
