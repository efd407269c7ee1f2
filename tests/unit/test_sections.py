"""Parallel sections without a VM: the wire, exceptions crossing it, a
one-copy section, argument checks."""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

import sfmpi
from sfmpi import family_auth, section_wire, sections
from sfmpi.errors import UsageError


def test_messages_cross_a_socket_whole_and_in_order():
    a, b = socket.socketpair()
    big = bytes(range(256)) * 20000          # 5 MB: more than one recv
    t = threading.Thread(target=lambda: [section_wire.send(a, m) for m in (("gather", 1, big), ("done", 2, None))])
    t.start()
    assert section_wire.recv(b) == ("gather", 1, big)
    assert section_wire.recv(b) == ("done", 2, None)
    t.join()
    a.close()
    with pytest.raises(section_wire.PeerGone):
        section_wire.recv(b)


class Picky(ValueError):
    pass


def test_a_clones_exception_comes_back_as_itself_with_rank_and_traceback():
    try:
        raise Picky("no")
    except Picky as exc:
        payload = sections.describe(exc)
    exc = sections.rebuild(3, payload)
    assert isinstance(exc, Picky) and str(exc) == "no" and exc.sfmpi_rank == 3
    assert "raised in clone 3" in exc.__notes__[0] and "raise Picky" in exc.__notes__[0]


def test_an_exception_that_does_not_pickle_comes_back_as_clone_failed():
    class Local(Exception):   # not importable by name: cannot be unpickled
        pass
    try:
        raise Local("inner")
    except Local as exc:
        payload = sections.describe(exc)
    exc = sections.rebuild(2, payload)
    assert isinstance(exc, sections.CloneFailed) and exc.rank == 2
    assert "Local: inner" in str(exc) and "raise Local" in exc.remote_traceback


def test_a_one_copy_section_needs_no_fork():
    with sfmpi.parallel(1) as s:
        assert (s.rank, s.size, s.is_parent) == (0, 1, True)
        assert s.gather("x") == ["x"] and s.bcast(5) == 5
        s.barrier()


def test_sections_do_not_nest_and_n_is_checked():
    with sfmpi.parallel(1):
        with pytest.raises(UsageError, match="do not nest"):
            with sfmpi.parallel(1):
                pass
    with sfmpi.parallel(1):   # the first section ended: a new one may start
        pass
    for bad in (0, -2, 2.5, "3"):
        with pytest.raises(UsageError, match="at least 1"):
            sfmpi.parallel(bad)
    with pytest.raises(UsageError, match="at least 1"):
        sfmpi.ForkPoolExecutor(0)


# section.comm's key-value space and the PMI-1 library Open MPI loads (no MPI here:
# two processes play two copies of a section).
COPY = r"""
import ctypes, os, socket, sys
from sfmpi import family_auth
rank, size, port, lib, key = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
conn = family_auth.connect(("127.0.0.1", port), bytes.fromhex(key))
os.environ.update(SFMPI_PMI_FD=str(conn.detach()), SFMPI_PMI_RANK=str(rank), SFMPI_PMI_SIZE=str(size))
pmi = ctypes.CDLL(lib)
spawned, r, s, clique = ctypes.c_int(9), ctypes.c_int(), ctypes.c_int(), (ctypes.c_int * 4)()
assert pmi.PMI_Init(ctypes.byref(spawned)) == 0 and spawned.value == 0
assert pmi.PMI_Get_rank(ctypes.byref(r)) == 0 and pmi.PMI_Get_size(ctypes.byref(s)) == 0
assert pmi.PMI_Get_clique_ranks(clique, 4) == 0 and clique[0] == rank
name = ctypes.create_string_buffer(64)
assert pmi.PMI_KVS_Get_my_name(name, 64) == 0
# Open MPI pads its base64 values with spaces, not '=': they must come back as they went.
assert pmi.PMI_KVS_Put(name, f"card-{rank}".encode(), f"QWJj ZA{rank}  ".encode()) == 0
assert pmi.PMI_KVS_Put(name, f"empty-{rank}".encode(), b"") == 0
assert pmi.PMI_KVS_Put(name, b"with space", b"x") != 0
assert pmi.PMI_KVS_Put(name, b"newline", b"x\ny") != 0
assert pmi.PMI_KVS_Commit(name) == 0 and pmi.PMI_Barrier() == 0
value = ctypes.create_string_buffer(1024)
other = (rank + 1) % size
assert pmi.PMI_KVS_Get(name, f"card-{other}".encode(), value, 1024) == 0
got = value.value.decode()
assert pmi.PMI_KVS_Get(name, f"empty-{other}".encode(), value, 1024) == 0 and value.value == b""
missing = pmi.PMI_KVS_Get(name, b"never-put", value, 1024)
print(r.value, s.value, repr(got), missing, sep="|")
"""


ROOT = Path(__file__).resolve().parents[2]
KEY = family_auth.new_key()


def kvs_connection(port: int, key: bytes = KEY) -> socket.socket:
    """A copy's connection to the key-value space, past the handshake."""
    return family_auth.connect(("127.0.0.1", port), key, timeout=5)


def test_copies_exchange_keys_through_the_parent_and_meet_at_barriers():
    import subprocess
    import sys
    from sfmpi import section_mpi
    lib = ROOT / "native" / "build" / "libsfmpi-pmi1.so"
    subprocess.run(["make", "-s", "-C", str(lib.parent.parent), "build/libsfmpi-pmi1.so"], check=True)
    kvs = section_mpi.KeyValueServer("127.0.0.1", 2, "", KEY)
    impostor = socket.create_connection(("127.0.0.1", kvs.port), timeout=5)   # takes no copy's place
    try:
        copies = [subprocess.Popen([sys.executable, "-c", COPY, str(r), "2", str(kvs.port), str(lib), KEY.hex()],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env={**os.environ, "PYTHONPATH": str(ROOT)}) for r in (0, 1)]
        outs = [c.communicate(timeout=30) for c in copies]
    finally:
        kvs.parent_only()
        impostor.close()
    assert [c.returncode for c in copies] == [0, 0], outs
    assert [o.strip().split("|") for o, _ in outs] == [["0", "2", "'QWJj ZA1  '", "-1"],
                                                       ["1", "2", "'QWJj ZA0  '", "-1"]]


def test_after_the_section_the_parent_meets_its_barriers_alone():
    import threading
    from sfmpi import section_mpi
    from sfmpi import section_wire
    kvs = section_mpi.KeyValueSpace(section_wire.listen("127.0.0.1"), 3, KEY)
    met = threading.Event()
    t = threading.Thread(target=lambda: (kvs._meet(), met.set()))
    t.start()
    assert not met.wait(0.3)          # 1 of 3 at the barrier: it waits
    kvs.parent_only()                 # the clones are gone
    assert met.wait(5)
    kvs._meet()                       # MPI_Finalize's barrier, the parent alone


def test_a_barrier_fails_when_a_copy_ends_before_it():
    from sfmpi import section_mpi
    from sfmpi import section_wire
    kvs = section_mpi.KeyValueSpace(section_wire.listen("127.0.0.1"), 3, KEY)
    waiting, leaving = (kvs_connection(kvs.port) for _ in range(2))
    with waiting, waiting.makefile("rwb", buffering=0) as f:
        f.write(b"barrier\n")
        leaving.close()               # its process ended: MPI never gets there
        assert f.readline() == b"gone\n"


def test_the_mpi_job_id_survives_open_mpis_15_bit_local_job():
    from sfmpi import section_mpi
    for port in (1024, 32767, 32768, 44226, 60999, 65535):
        jobid = section_mpi.mpi_jobid(port)
        assert jobid < 1 << 32
        assert 0 < jobid & 0xFFFF < 1 << 15          # the local job fits Open MPI's sentinel
        assert jobid >> 16 == port                   # one job per section: the family tells them apart
    with pytest.raises(ValueError):
        section_mpi.mpi_jobid(0)


def test_once_parent_only_returns_the_parents_barrier_passes_though_clones_are_gone():
    from sfmpi import section_mpi
    kvs = section_mpi.KeyValueServer("127.0.0.1", 3, "", KEY)
    parent, *clones = (kvs_connection(kvs.port) for _ in range(3))
    for c in clones:
        c.close()                     # the clones left the section and ended
    kvs.parent_only()                 # MPI_Finalize's barrier may come right after
    with parent, parent.makefile("rwb", buffering=0) as f:
        f.write(b"barrier\n")
        assert f.readline() == b"ok\n"


class Recorder:
    """SectionWatch's two actions, noted with the time they happened."""

    def __init__(self):
        import threading
        self.events: list[str] = []
        self.done = threading.Event()
        self.log: list[str] = []

    def kill_clones(self):
        self.events.append("kill clones")

    def end_parent(self):
        self.events.append("end parent")
        self.done.set()

    def watch(self, grace=0.3, end_grace=0.3):
        from sfmpi import section_mpi
        return section_mpi.SectionWatch(self.kill_clones, self.end_parent, grace=grace, end_grace=end_grace,
                                        log=self.log.append)


def test_an_mpi_abort_in_a_clone_ends_the_section_through_the_key_value_space():
    from sfmpi import section_mpi
    from sfmpi import section_wire
    rec = Recorder()
    kvs = section_mpi.KeyValueSpace(section_wire.listen("127.0.0.1"), 3, KEY, rec.watch())
    with kvs_connection(kvs.port) as clone:
        clone.sendall(b"abort 2 MPI abort (code 3): it went wrong\n")
        assert rec.done.wait(5)                  # the parent waits in MPI: nothing else would end it
    assert rec.events == ["kill clones", "end parent"]
    assert "clone 2 of the parallel section failed: MPI abort (code 3): it went wrong" in rec.log[0]


def test_a_clones_exception_leaves_the_parent_time_to_raise_it_itself():
    import json
    import time
    rec = Recorder()
    watch = rec.watch(grace=0.5)
    watch.copy_failed(1, json.dumps("Traceback ...\nValueError: no"), at_once=False)
    time.sleep(0.2)
    watch.parent_only()                          # the parent heard of it through the section
    time.sleep(0.8)
    assert rec.events == [] and rec.log == []


def test_a_clones_exception_ends_a_parent_that_waits_in_mpi():
    import json
    rec = Recorder()
    rec.watch(grace=0.3).copy_failed(1, json.dumps("Traceback ...\nValueError: no"), at_once=False)
    assert rec.done.wait(5)
    assert rec.events == ["kill clones", "end parent"]
    assert "ValueError: no" in rec.log[0] and "waiting in MPI" in rec.log[0]


def test_a_parent_that_leaves_after_its_clones_are_ended_is_not_ended():
    import time
    rec = Recorder()
    watch = rec.watch(grace=0.1, end_grace=1.0)
    watch.copy_failed(2, "MPI abort (code 1): N/A", at_once=True)
    time.sleep(0.3)
    assert rec.events == ["kill clones"]
    watch.parent_only()                          # it raised the clones' end as a SectionError
    time.sleep(1.0)
    assert rec.events == ["kill clones"]


def test_a_program_that_ends_inside_the_section_takes_its_clones_along():
    """The real server process and the real library: the parent aborts in MPI,
    then its program is gone; the server asks the agent to end the clones."""
    import json
    import os
    import subprocess
    import sys
    import tempfile
    import threading
    from sfmpi import api, section_mpi
    lib = ROOT / "native" / "build" / "libsfmpi-pmi1.so"
    subprocess.run(["make", "-s", "-C", str(lib.parent.parent), "build/libsfmpi-pmi1.so"], check=True)
    ops = []
    with tempfile.TemporaryDirectory() as tmp:
        agent = socket.socket(socket.AF_UNIX)
        agent.bind(f"{tmp}/api.sock")
        agent.listen()

        def answer():                            # the guest agent, as far as kill goes
            while True:
                conn, _ = agent.accept()
                with conn:
                    ops.append(json.loads(conn.makefile("rb").readline()))
                    conn.sendall(json.dumps({"v": api.API_VERSION, "ok": True, "killed": [1, 2]}).encode() + b"\n")
        threading.Thread(target=answer, daemon=True).start()
        os.environ["SFMPI_API_SOCKET"] = f"{tmp}/api.sock"
        try:
            kvs = section_mpi.KeyValueServer("127.0.0.1", 3, "parent-t7", KEY)
        finally:
            del os.environ["SFMPI_API_SOCKET"]
        aborting = subprocess.run([sys.executable, "-c", ABORTING_PARENT, str(kvs.port), str(lib), KEY.hex()],
                                  capture_output=True, text=True, timeout=30,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert aborting.returncode == 3 and "MPI abort (3): it went" in aborting.stderr
        os.close(kvs._control)                   # the program that ran the section is gone
        kvs.proc.wait(timeout=15)
        assert kvs.proc.returncode == 0
    assert [(o["op"], o["ticket"]) for o in ops] == [("kill", "parent-t7")]   # once, not twice


ABORTING_PARENT = r"""
import ctypes, os, socket, sys
from sfmpi import family_auth
conn = family_auth.connect(("127.0.0.1", int(sys.argv[1])), bytes.fromhex(sys.argv[3]))
os.environ.update(SFMPI_PMI_FD=str(conn.detach()), SFMPI_PMI_RANK="0", SFMPI_PMI_SIZE="3")
pmi = ctypes.CDLL(sys.argv[2])
assert pmi.PMI_Init(ctypes.byref(ctypes.c_int())) == 0
pmi.PMI_Abort(3, b"it went\nwrong")
"""


# -- who may join: only the copies that hold the section's key ----------------
EXPLODED = threading.Event()


def _explode():
    EXPLODED.set()


class Bomb:
    """A pickle that runs code in whoever loads it."""

    def __reduce__(self):
        return (_explode, ())


def test_a_process_without_the_key_cannot_join_the_section_or_run_code_in_the_parent(monkeypatch):
    from sfmpi import api
    monkeypatch.setattr(api, "members", lambda ticket: [])   # every clone still runs
    log: list[str] = []
    listener = family_auth.AuthListener(section_wire.listen("127.0.0.1"), KEY, log=log.append)
    impostor = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
    section_wire.send(impostor, ("hello", 0, Bomb()))   # what anyone could do before

    def clone(rank: int) -> None:
        conn = sections._connect("127.0.0.1", listener.port, KEY)
        section_wire.send(conn, ("hello", 0, rank))
        clones[rank] = conn
    clones: dict[int, socket.socket] = {}
    threads = [threading.Thread(target=clone, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    conns = sections._accept(listener, None, 2)
    for t in threads:
        t.join()
    assert sorted(conns) == [1, 2] and not EXPLODED.is_set()
    section_wire.send(conns[2], ("bcast", 1, "to 2"))
    assert section_wire.recv(clones[2]) == ("bcast", 1, "to 2")
    deadline = time.monotonic() + 5
    while not log and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "wrong key" in log[0]   # its "hello" read as a (wrong) answer to the challenge, never unpickled
    for c in (*conns.values(), *clones.values(), impostor):
        c.close()


def test_a_process_without_the_key_can_neither_end_the_section_nor_take_a_copys_place():
    from sfmpi import section_mpi
    rec = Recorder()
    kvs = section_mpi.KeyValueSpace(section_wire.listen("127.0.0.1"), 2, KEY, rec.watch(grace=0.1))
    with socket.create_connection(("127.0.0.1", kvs.port), timeout=5) as impostor:
        impostor.sendall(b"abort 1 MPI abort (code 1): not really\n")
        copies = [kvs_connection(kvs.port) for _ in range(2)]
        files = [c.makefile("rwb", buffering=0) for c in copies]
        for f in files:
            f.write(b"barrier\n")
        assert [f.readline() for f in files] == [b"ok\n", b"ok\n"]   # both copies were taken in
    assert rec.events == [] and rec.log == []
    for f, c in zip(files, copies):
        f.close()
        c.close()


def test_a_silent_peer_does_not_keep_the_parent_past_the_sections_connect_timeout(monkeypatch):
    from sfmpi import api
    from sfmpi.errors import SectionError
    ended = []
    monkeypatch.setattr(api, "members", lambda ticket: [])
    monkeypatch.setattr(api, "kill", lambda ticket: ended.append("kill"))
    monkeypatch.setattr(api, "join", lambda ticket: ended.append("join"))
    monkeypatch.setattr(sections, "CONNECT_TIMEOUT", 0.5)
    listener = family_auth.AuthListener(section_wire.listen("127.0.0.1"), KEY, log=lambda text: None)
    with socket.create_connection(("127.0.0.1", listener.port), timeout=5):   # connects, says nothing
        t0 = time.monotonic()
        with pytest.raises(SectionError, match="only 0 of 1 clones reached the parallel section"):
            sections._accept(listener, None, 1)
        assert time.monotonic() - t0 < 3.0
    assert ended == ["kill", "join"]
