"""Python parallel sections and the fork pool, in the session's parent VM and
in a VM restored from a checkpoint."""
from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.timeout(900)

PARTIAL_SUMS = r'''
import json, socket, sys
import numpy as np
import sfmpi

data = np.arange(1_000_000, dtype=np.int64) * 3 % 1009     # made before the fork
with sfmpi.parallel(4) as s:
    part = int(data[s.rank::s.size].sum())
    parts = s.gather((s.rank, part, socket.gethostname()))
    token = s.bcast("from the parent" if s.is_parent else None)
    s.barrier()
    echoed = s.gather(token)
print(json.dumps({"parts": parts, "serial": int(data.sum()), "echoed": echoed,
                  "size": s.size, "rank_after": s.rank}))
'''

CLONE_RAISES = r'''
import json, sfmpi

class Odd(ValueError):
    pass

def check(rank):
    if rank == 2:
        raise Odd(f"rank {rank} does not like this")

try:
    with sfmpi.parallel(3) as s:
        check(s.rank)
        s.barrier()    # rank 2 never gets here: the parent hears of its error instead
    print(json.dumps({"raised": None}))
except Odd as exc:
    print(json.dumps({"raised": type(exc).__name__, "message": str(exc), "rank": exc.sfmpi_rank,
                      "notes": exc.__notes__}))
'''

NESTED = r'''
import json, sfmpi
with sfmpi.parallel(2) as s:
    try:
        with sfmpi.parallel(2):
            pass
        err = None
    except sfmpi.errors.UsageError as exc:
        err = str(exc)
    errs = s.gather(err)
print(json.dumps({"errors": errs}))
'''

POOL = r'''
import json, os, socket
import sfmpi

TABLE = {i: i * i for i in range(100)}       # the workers inherit it: nothing is sent

def square_from_table(i):
    return TABLE[i], socket.gethostname()

def boom(x):
    raise KeyError(x)

with sfmpi.ForkPoolExecutor(3) as pool:
    results = list(pool.map(square_from_table, range(100)))
    err = pool.submit(boom, "missing").exception()
print(json.dumps({"values": [v for v, _ in results], "hosts": sorted({h for _, h in results}),
                  "error": [type(err).__name__, str(err), getattr(err, "sfmpi_rank", None)]}))
'''

MPI_SECTION = r'''
import json, socket, sys
import numpy as np
import sfmpi

n = int(sys.argv[1])
data = np.arange(300_000, dtype=np.int64) * 7 % 1013       # made before the fork
with sfmpi.parallel(n) as s:
    comm = s.comm                                         # every copy: MPI starts here
    part = np.array([data[s.rank::s.size].sum()], dtype=np.int64)
    total = np.zeros(1, dtype=np.int64)
    comm.Allreduce(part, total)                           # buffers, over TCP between the VMs
    ranks = comm.allreduce(s.rank + 1)                    # pickled objects
    left = comm.sendrecv(socket.gethostname(), dest=(s.rank + 1) % n, source=(s.rank - 1) % n)
    got = s.gather({"rank": comm.Get_rank(), "size": comm.Get_size(), "host": socket.gethostname(),
                    "total": int(total[0]), "ranks": ranks, "left": left})
print(json.dumps({"got": got, "serial": int(data.sum())}))
'''

MPI_CLONE_FAILS = r'''
import sys, sfmpi
how = sys.argv[1]
with sfmpi.parallel(3) as s:
    comm = s.comm
    if s.rank == 2:
        if how == "raise":
            raise ValueError("rank 2 gives up before the allreduce")
        comm.Abort(5)
    comm.allreduce(1)          # the parent and clone 1 wait here for rank 2, deaf to the section
print("never here")
'''

PARENT_RAISES = r'''
import sfmpi, time
with sfmpi.parallel(3) as s:
    if s.is_parent:
        raise RuntimeError("the parent gives up")
    time.sleep(600)
'''



def run_py(cli, vm: str, name: str, program: str, check: bool = True):
    cli.put(vm, f"/root/{name}", program)
    p = cli.exec(vm, f"cd /root && python3 {name}", check=False)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_partial_sums_gather_to_the_serial_sum(cli, parent):
    out = json.loads(run_py(cli, parent, "sums.py", PARTIAL_SUMS).stdout.strip().splitlines()[-1])
    assert out["size"] == 4 and out["rank_after"] == 0           # after the block: the parent only
    assert [r for r, _, _ in out["parts"]] == [0, 1, 2, 3]
    assert sum(p for _, p, _ in out["parts"]) == out["serial"]
    assert len({h for _, _, h in out["parts"]}) == 4              # four VMs
    assert out["echoed"] == ["from the parent"] * 4
    cli.assert_no_clones_left(parent)


def test_an_exception_in_a_clone_is_raised_in_the_parent(cli, parent):
    out = json.loads(run_py(cli, parent, "raises.py", CLONE_RAISES).stdout.strip().splitlines()[-1])
    assert out["raised"] == "Odd" and out["rank"] == 2
    assert out["message"] == "rank 2 does not like this"
    assert "raised in clone 2" in out["notes"][0] and "in check" in out["notes"][0]   # the clone's traceback
    cli.assert_no_clones_left(parent)


def test_an_exception_in_the_parent_destroys_the_clones(cli, parent):
    t0 = time.monotonic()
    p = run_py(cli, parent, "parent_raises.py", PARENT_RAISES, check=False)
    assert p.returncode == 1 and "RuntimeError: the parent gives up" in p.stderr
    assert time.monotonic() - t0 < 120
    cli.assert_no_clones_left(parent)


@pytest.mark.parametrize("n", [3, 4])
def test_mpi4py_allreduce_and_a_ring_in_a_section(cli, parent, n):
    p = run_py(cli, parent, "mpi_section.py", MPI_SECTION.replace("sys.argv[1]", str(n)))
    out = json.loads(p.stdout.strip().splitlines()[-1])   # the parent's MPI_Finalize came after it: exit 0
    got = out["got"]
    assert [g["rank"] for g in got] == list(range(n)) and {g["size"] for g in got} == {n}
    assert {g["total"] for g in got} == {out["serial"]}
    assert {g["ranks"] for g in got} == {n * (n + 1) // 2}
    hosts = [g["host"] for g in got]
    assert len(set(hosts)) == n and hosts[0] == parent                  # n VMs
    assert [g["left"] for g in got] == [hosts[(r - 1) % n] for r in range(n)]   # each heard its left neighbour
    cli.assert_no_clones_left(parent)


@pytest.mark.parametrize("how", ["raise", "abort"])
def test_a_clone_failing_while_the_others_wait_in_mpi_ends_the_section(cli, parent, how):
    t0 = time.monotonic()
    p = run_py(cli, parent, "mpi_fails.py", MPI_CLONE_FAILS.replace("sys.argv[1]", repr(how)), check=False)
    assert p.returncode != 0 and "never here" not in p.stdout
    assert time.monotonic() - t0 < 240                                  # not a hang
    assert "clone 2 of the parallel section failed" in p.stderr
    if how == "raise":                                                  # the clone's traceback, for the user
        assert "ValueError: rank 2 gives up before the allreduce" in p.stderr
        assert "waiting in MPI" in p.stderr
    else:
        assert "MPI abort (code 5)" in p.stderr
    cli.assert_no_clones_left(parent)


def test_sections_do_not_nest(cli, parent):
    out = json.loads(run_py(cli, parent, "nested.py", NESTED).stdout.strip().splitlines()[-1])
    assert len(out["errors"]) == 2
    assert all(e and "do not nest" in e for e in out["errors"])
    cli.assert_no_clones_left(parent)


def test_bad_n_is_a_usage_error(cli, parent):
    p = cli.exec(parent, "python3 -c 'import sfmpi; sfmpi.parallel(0)'", check=False)
    assert p.returncode == 1 and "at least 1" in p.stderr


def test_fork_pool_maps_100_items_on_3_workers(cli, parent):
    out = json.loads(run_py(cli, parent, "pool.py", POOL).stdout.strip().splitlines()[-1])
    assert out["values"] == [i * i for i in range(100)]
    assert len(out["hosts"]) == 3 and "parent" not in out["hosts"]
    assert out["error"][0] == "KeyError" and out["error"][2] in (1, 2, 3)
    cli.assert_no_clones_left(parent)


def test_a_section_in_a_vm_restored_from_a_checkpoint(cli, parent):
    ckpt = cli.json("checkpoint", parent)["id"]
    restored = cli.json("clone", ckpt, "-n", "1")["clones"][0]
    try:
        out = json.loads(run_py(cli, restored, "sums.py", PARTIAL_SUMS).stdout.strip().splitlines()[-1])
        assert sum(p for _, p, _ in out["parts"]) == out["serial"]
        assert len({h for _, _, h in out["parts"]}) == 4
        cli.assert_no_clones_left(restored)
    finally:
        cli("vm", "stop", restored)


LONG_COMPUTE = r"""
import time, sfmpi
with sfmpi.parallel(3) as s:
    print("in", s.rank, flush=True)
    if s.rank:
        time.sleep(3600)     # computes without talking to the parent
    s.gather(s.rank)
"""


def test_a_program_killed_in_a_section_takes_its_clones_along(cli, parent):
    cli.put(parent, "/root/long.py", LONG_COMPUTE)
    cli.exec(parent, "cd /root && (setsid python3 long.py > /tmp/long.out 2>&1 &)")
    # The parent prints once every clone has connected to it: all of them are in the section.
    deadline = time.monotonic() + 300
    while "in 0" not in cli.exec(parent, "cat /tmp/long.out", check=False).stdout and time.monotonic() < deadline:
        time.sleep(1)
    assert len(cli.clones_of(parent)) == 2
    # SIGKILL: no handler, no clean-up in the parent's program; only its sockets close.
    cli.exec(parent, "for p in $(pgrep -x python3); do grep -q long.py /proc/$p/cmdline && kill -9 $p; done")
    cli.assert_no_clones_left(parent, within=60)
