"""`section.comm`: one MPI_COMM_WORLD over the copies of a parallel section.

The copies were not started by mpiexec, so nothing tells MPI who its peers
are. Debian's mpi4py runs on Open MPI 4.1, which takes that from a PMI-1
library when FLUX_JOB_ID is set (its `flux` component): sfmpi ships one
(native/pmi1, libsfmpi-pmi1.so) that asks the section's parent, which keeps
the key-value space and the barrier here (KeyValueSpace). Each copy connects
to it, passes the handshake on the section's key (family_auth: the library
gets the connection afterwards), sets the environment Open MPI reads at
MPI_Init, and imports mpi4py.MPI.

The key-value space runs in a process of its own (KeyValueServer): MPI_Init
holds Python's GIL while it waits for the barrier, so a server thread in the
parent's own process could never answer it.

MPI can be initialized once per process: a program gets one section with MPI.
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading

from . import family_auth, section_wire
from .errors import SectionError

PMI_LIBRARY = "/usr/local/lib/sfmpi/libsfmpi-pmi1.so"
ACK_TIMEOUT = 10.0   # for the key-value server to take in the end of the section
FAILED_GRACE = 15.0  # for the parent to hear of a clone's exception itself
END_GRACE = 5.0      # for the parent to leave the section once its clones are ended


def report_failure(rank: int, exc_text: str) -> None:
    """In a copy leaving the section with an exception after MPI started: tell
    the key-value server (SectionWatch) before this VM ends."""
    fd = os.environ.get("SFMPI_PMI_FD")
    if fd is None:
        return
    try:
        os.write(int(fd), f"failed {rank} {json.dumps(exc_text)}\n".encode())
    except OSError:
        pass


class KeyValueSpace:
    """The parent's side of libsfmpi-pmi1: put/get/barrier for `size` copies,
    one line per request (the protocol is in native/pmi1/sfmpi_pmi1.c). It
    serves until the program ends: Open MPI asks it again at MPI_Finalize.
    It takes the first `size` connections that pass the handshake on
    `authkey`: a process that is not one of the copies could otherwise fill a
    copy's place, or end the section with an abort line."""

    def __init__(self, listener: socket.socket, size: int, authkey: bytes, watch: SectionWatch | None = None):
        self.size = size
        self.watch = watch
        self.values: dict[str, str] = {}
        self.listener = family_auth.AuthListener(listener, authkey)
        self.port = self.listener.port
        self._cond = threading.Condition()
        self._waiting = 0
        self._round = 0
        self._gone = 0               # copies whose connection ended
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="sfmpi-pmi").start()

    def _accept(self) -> None:
        for _ in range(self.size):
            try:
                conn = self.listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="sfmpi-pmi-copy").start()
        self.listener.close()   # every copy has come

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb", buffering=0) as f:
            for raw in f:
                answer = self._answer(raw.decode(errors="replace").rstrip("\n"))
                if answer is not None:
                    f.write(answer.encode() + b"\n")
        # The copy's process ended (its MPI keeps this connection while it
        # lives): whoever waits at a barrier for it would wait forever.
        with self._cond:
            self._gone += 1
            self._cond.notify_all()

    def _answer(self, line: str) -> str | None:
        # A value is the rest of the line after its key, spaces and all: Open
        # MPI pads its base64 with spaces (Cray PMI forbids '=').
        op, _, rest = line.partition(" ")
        key, sep, value = rest.partition(" ")
        if op in ("abort", "failed") and key.isdigit():   # no answer: the copy is on its way out
            if self.watch is not None:
                self.watch.copy_failed(int(key), value, at_once=op == "abort")
            return None
        if op == "put" and key and sep:
            self.values[key] = value
            return "ok"
        if op == "get" and key and not sep:
            return f"ok {self.values[key]}" if key in self.values else "missing"
        if line == "barrier":
            return "ok" if self._meet() else "gone"
        return "bad"

    def _meet(self) -> bool:
        """True once every copy has come to this barrier; False if a copy's
        process ended first."""
        with self._cond:
            my_round = self._round
            self._waiting += 1
            if self._waiting >= self.size:
                self._release()
            while self._round == my_round and not self._gone:
                self._cond.wait()
            return self._round != my_round

    def _release(self) -> None:
        self._waiting = 0
        self._round += 1
        self._cond.notify_all()

    def parent_only(self) -> None:
        """The section is over: the clones are gone, the parent's MPI lives on
        until the program ends. Its MPI_Finalize then meets no one at its
        barrier, so barriers from now on are the parent's alone."""
        with self._cond:
            self.size = 1
            if self._waiting:
                self._release()


class SectionWatch:
    """In the key-value server: ends a section whose copies can no longer all
    meet, where the program itself would wait forever. A copy blocked in an
    MPI call for a peer whose VM is gone never returns (the gone VM sends no
    reset), and a copy that MPI aborted leaves its VM running without its
    program, so the section's own checks do not see it end either."""

    def __init__(self, kill_clones, end_parent, grace: float = FAILED_GRACE, end_grace: float = END_GRACE,
                 log=None):
        self._kill_clones = kill_clones      # () -> None
        self._end_parent = end_parent        # () -> None
        self.grace = grace
        self.end_grace = end_grace
        self._log = log or (lambda text: print(f"sfmpi: {text}", file=sys.stderr, flush=True))
        self._over = threading.Event()       # the parent left the section
        self._acting = threading.Lock()
        self._clones_ended = False

    def copy_failed(self, rank: int, text: str, at_once: bool) -> None:
        """Copy `rank` is ending with an error. An MPI abort ends the section
        at once (MPI_Abort's meaning); an exception in a clone first leaves
        the parent `grace` seconds to hear of it through the section and raise
        it as itself, which it does unless it is waiting in MPI."""
        threading.Thread(target=self._end_section, args=(rank, _readable(text), at_once), daemon=True).start()

    def _end_section(self, rank: int, text: str, at_once: bool) -> None:
        if not at_once and self._over.wait(self.grace):
            return                           # the parent heard of it and left the section
        with self._acting:
            if self._over.is_set():
                return
            who = "the parent" if rank == 0 else f"clone {rank}"
            self._log(f"{who} of the parallel section failed: {text}\n"
                      + ("the section ends" if at_once else
                         f"the parent did not leave the section within {self.grace:.0f} s (waiting in MPI, "
                         "it cannot hear of it): the section ends"))
            self._kill_clones()
            self._clones_ended = True
        # An aborting parent is on its way out already; a parent not in MPI
        # now raises the clones' end as a SectionError and leaves.
        if rank != 0 and not self._over.wait(self.end_grace):
            self._log("ending the program: it still waits in MPI for the copies that are gone")
            self._end_parent()

    def parent_only(self) -> None:
        self._over.set()

    def parent_gone(self) -> None:
        """The program ended without leaving the section (killed, or aborted in
        MPI): nothing else will end its clones now."""
        with self._acting:
            if not self._over.is_set() and not self._clones_ended:
                self._kill_clones()
                self._clones_ended = True
            self._over.set()


def _readable(text: str) -> str:
    # A clone sends its exception as JSON (one line), Open MPI's abort as text.
    try:
        return str(json.loads(text))
    except ValueError:
        return text


class KeyValueServer:
    """The parent's KeyValueSpace in a child process, for as long as the
    program runs (it ends when its stdin closes, that is with the parent)."""

    def __init__(self, ip: str, size: int, ticket: str, authkey: bytes):
        listener = section_wire.listen(ip)
        self.port = listener.getsockname()[1]
        # A bare descriptor, not a file object: mpi4py finalizes MPI after
        # Python has torn its objects down, and a file object's close at that
        # point would end the server before MPI_Finalize's barrier reaches it.
        # The kernel closes it when this process ends.
        read_end, self._control = os.pipe()
        self._acks, ack_end = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sfmpi.section_mpi", str(listener.fileno()), str(size), ticket],
            stdin=read_end, stdout=ack_end, pass_fds=(listener.fileno(),))
        os.close(read_end)
        os.close(ack_end)
        listener.close()
        # The key's first line on the control pipe: not in the command line,
        # which every user of the VM can read in /proc.
        os.write(self._control, authkey.hex().encode() + b"\n")

    def parent_only(self) -> None:
        """Returns once the server has taken it in: the parent's MPI_Finalize
        may follow at once, and its barrier must not find the section's size."""
        try:
            os.write(self._control, b"parent-only\n")
            if select.select([self._acks], [], [], ACK_TIMEOUT)[0]:
                os.read(self._acks, 64)
        except OSError:
            pass


def _serve_main(listen_fd: int, size: int, ticket: str) -> None:
    from . import api
    parent = os.getppid()
    authkey = bytes.fromhex(sys.stdin.buffer.readline().decode())   # KeyValueServer's first line

    def kill_clones() -> None:
        if not ticket:   # a section of one copy
            return
        try:
            api.kill(ticket)
        except Exception as exc:  # noqa: BLE001 - the clones may be gone already
            print(f"sfmpi: ending the section's clones: {exc}", file=sys.stderr, flush=True)

    watch = SectionWatch(kill_clones, lambda: os.kill(parent, signal.SIGTERM))
    if not authkey:   # the program ended before it sent the key
        watch.parent_gone()
        return
    kvs = KeyValueSpace(socket.socket(fileno=listen_fd), size, authkey, watch)
    for line in sys.stdin.buffer:
        if line.strip() == b"parent-only":
            watch.parent_only()
            kvs.parent_only()
            sys.stdout.buffer.write(b"ok\n")
            sys.stdout.buffer.flush()
    watch.parent_gone()


def mpi_initialized() -> bool:
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is not None and mpi.Is_initialized()


def mpi_jobid(port: int) -> int:
    """The Open MPI job ID of a section whose key-value space listens on `port`
    (FLUX_JOB_ID, read as a 32-bit jobid: job family in the high 16 bits, local
    job in the low 16), the same in every copy. Open MPI keeps a peer it has
    not yet talked to as a "sentinel" with room for only 15 bits of local job:
    a local job of 32768 or more (any ephemeral port) comes back without its
    top bit, the peer's modex is then looked up under the wrong job, and the
    copy finds no way to reach it ("host: unknown!") while the others wait for
    it. So: the port as the family, local job 1, as mpirun's first job."""
    if not 0 < port < 1 << 16:
        raise ValueError(f"not a TCP port: {port}")
    return port << 16 | 1


def join_world(parent_ip: str, port: int, rank: int, size: int, subnet: str, authkey: bytes):
    """In every copy: connect to the parent's key-value space (the section's
    key), then MPI_Init."""
    if not os.path.exists(PMI_LIBRARY):
        raise SectionError(f"section.comm needs {PMI_LIBRARY} (it comes with the sfmpi guest image)")
    try:
        import mpi4py
    except ImportError:
        raise SectionError("section.comm needs mpi4py (python3-mpi4py) in this VM") from None
    conn = family_auth.connect((parent_ip, port), authkey, timeout=60)
    os.environ.update({
        "SFMPI_PMI_FD": str(conn.detach()),   # stays open for MPI's lifetime in this process
        "SFMPI_PMI_RANK": str(rank), "SFMPI_PMI_SIZE": str(size),
        "FLUX_JOB_ID": str(mpi_jobid(port)), "FLUX_PMI_LIBRARY_PATH": PMI_LIBRARY,
        "OMPI_MCA_pmix": "flux",
        # Only the family network between the copies.
        "OMPI_MCA_btl": "self,tcp", "OMPI_MCA_btl_tcp_if_include": subnet,
        "OMPI_MCA_pml": "ob1",
    })
    mpi4py.rc.initialize = True
    from mpi4py import MPI
    if MPI.COMM_WORLD.Get_size() != size or MPI.COMM_WORLD.Get_rank() != rank:
        raise SectionError(f"MPI_Init in the section gave rank {MPI.COMM_WORLD.Get_rank()} of "
                           f"{MPI.COMM_WORLD.Get_size()}, not {rank} of {size}")
    return MPI.COMM_WORLD


if __name__ == "__main__":
    _serve_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
