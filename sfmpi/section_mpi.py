"""`section.comm`: one MPI_COMM_WORLD over the copies of a parallel section.

The copies were not started by mpiexec, so nothing tells MPI who its peers
are. Debian's mpi4py runs on Open MPI 4.1, which takes that from a PMI-1
library when FLUX_JOB_ID is set (its `flux` component): sfmpi ships one
(native/pmi1, libsfmpi-pmi1.so) that asks the section's parent, which keeps
the key-value space and the barrier here (KeyValueSpace). Each copy connects
to it, sets the environment Open MPI reads at MPI_Init, and imports mpi4py.MPI.

The key-value space runs in a process of its own (KeyValueServer): MPI_Init
holds Python's GIL while it waits for the barrier, so a server thread in the
parent's own process could never answer it.

MPI can be initialized once per process: a program gets one section with MPI.
"""
from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading

from . import section_wire
from .errors import SectionError

PMI_LIBRARY = "/usr/local/lib/sfmpi/libsfmpi-pmi1.so"
ACK_TIMEOUT = 10.0   # for the key-value server to take in the end of the section


class KeyValueSpace:
    """The parent's side of libsfmpi-pmi1: put/get/barrier for `size` copies,
    one line per request (the protocol is in native/pmi1/sfmpi_pmi1.c). It
    serves until the program ends: Open MPI asks it again at MPI_Finalize."""

    def __init__(self, listener: socket.socket, size: int):
        self.size = size
        self.values: dict[str, str] = {}
        self.listener = listener
        self.port = self.listener.getsockname()[1]
        self._cond = threading.Condition()
        self._waiting = 0
        self._round = 0
        self._gone = 0               # copies whose connection ended
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="sfmpi-pmi").start()

    def _accept(self) -> None:
        for _ in range(self.size):
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="sfmpi-pmi-copy").start()
        self.listener.close()   # every copy has come

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb", buffering=0) as f:
            for raw in f:
                answer = self._answer(raw.decode().rstrip("\n"))
                f.write(answer.encode() + b"\n")
        # The copy's process ended (its MPI keeps this connection while it
        # lives): whoever waits at a barrier for it would wait forever.
        with self._cond:
            self._gone += 1
            self._cond.notify_all()

    def _answer(self, line: str) -> str:
        # A value is the rest of the line after its key, spaces and all: Open
        # MPI pads its base64 with spaces (Cray PMI forbids '=').
        op, _, rest = line.partition(" ")
        key, sep, value = rest.partition(" ")
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


class KeyValueServer:
    """The parent's KeyValueSpace in a child process, for as long as the
    program runs (it ends when its stdin closes, that is with the parent)."""

    def __init__(self, ip: str, size: int):
        listener = section_wire.listen(ip)
        self.port = listener.getsockname()[1]
        # A bare descriptor, not a file object: mpi4py finalizes MPI after
        # Python has torn its objects down, and a file object's close at that
        # point would end the server before MPI_Finalize's barrier reaches it.
        # The kernel closes it when this process ends.
        read_end, self._control = os.pipe()
        self._acks, ack_end = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-m", "sfmpi.section_mpi", str(listener.fileno()), str(size)],
                                     stdin=read_end, stdout=ack_end, pass_fds=(listener.fileno(),))
        os.close(read_end)
        os.close(ack_end)
        listener.close()

    def parent_only(self) -> None:
        """Returns once the server has taken it in: the parent's MPI_Finalize
        may follow at once, and its barrier must not find the section's size."""
        try:
            os.write(self._control, b"parent-only\n")
            if select.select([self._acks], [], [], ACK_TIMEOUT)[0]:
                os.read(self._acks, 64)
        except OSError:
            pass


def _serve_main(listen_fd: int, size: int) -> None:
    kvs = KeyValueSpace(socket.socket(fileno=listen_fd), size)
    for line in sys.stdin.buffer:
        if line.strip() == b"parent-only":
            kvs.parent_only()
            sys.stdout.buffer.write(b"ok\n")
            sys.stdout.buffer.flush()


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


def join_world(parent_ip: str, port: int, rank: int, size: int, subnet: str):
    """In every copy: connect to the parent's key-value space, then MPI_Init."""
    if not os.path.exists(PMI_LIBRARY):
        raise SectionError(f"section.comm needs {PMI_LIBRARY} (it comes with the sfmpi guest image)")
    try:
        import mpi4py
    except ImportError:
        raise SectionError("section.comm needs mpi4py (python3-mpi4py) in this VM") from None
    conn = socket.create_connection((parent_ip, port), timeout=60)
    conn.settimeout(None)
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
    _serve_main(int(sys.argv[1]), int(sys.argv[2]))
