"""Parallel sections: fork the VM at a `with`, join at its end.

    import numpy as np, sfmpi
    data = np.arange(10_000_000)             # made before the fork: every copy has it
    with sfmpi.parallel(4) as s:             # 3 clones; the parent is rank 0
        part = data[s.rank::s.size].sum()
        parts = s.gather(part)               # the list in the parent, None in the clones
    print(sum(parts))                        # only the parent gets here

At the `with` the VM forks into n-1 clones (sfmpi.clone); inside the block every
copy runs the same code with its own `rank`. At the end of the block each clone
reports to the parent and ends (sfmpi.exit): the code after the block runs in
the parent only, once every clone has left the block. An exception in a clone
is raised again in the parent, with the clone's rank and traceback; an
exception in the parent (KeyboardInterrupt too) destroys the clones at once.

The copies talk over the family network: each clone connects to a port the
parent opened before the fork. gather/bcast/barrier go through the parent.
Every connection starts with a handshake on a key the parent made before the
fork (family_auth): only the section's own copies get in.
"""
from __future__ import annotations

import os
import pickle
import select
import socket
import sys
import threading
import time
import traceback

from . import api, family_auth, section_wire
from .errors import SectionError, UsageError

CONNECT_TIMEOUT = 120.0   # for every clone to reach the parent after the fork
_active = False           # sections do not nest: one per program at a time
_mpi_started = False      # section.comm: MPI starts once per process


class CloneFailed(SectionError):
    """A clone raised an exception in the section that could not be sent back as itself."""

    def __init__(self, rank: int, kind: str, message: str, remote_traceback: str):
        super().__init__(f"clone {rank} of the parallel section raised {kind}: {message}\n"
                         f"{remote_traceback}")
        self.rank = rank
        self.remote_traceback = remote_traceback


class Section:
    """One copy's view of a parallel section."""

    def __init__(self, rank: int, size: int, ticket: api.Ticket | None, conns: dict[int, socket.socket],
                 parent_ip: str | None = None, authkey: bytes | None = None):
        self.rank = rank
        self.size = size
        self.ticket = ticket
        self._conns = conns          # parent: rank -> socket; clone: {0: socket to the parent}
        self._step = 0               # collectives called so far: every copy must call the same ones
        self._comm = None
        self._leaving = False        # clone: set when it reports to the parent at the end
        self._kvs = None             # parent, once comm is used: the MPI key-value space
        self.parent_ip = parent_ip
        self._authkey = authkey      # the section's, made before the fork: the copies' handshakes

    @property
    def is_parent(self) -> bool:
        return self.rank == 0

    # -- collectives, through the parent -----------------------------------
    def gather(self, obj):
        """Every copy's obj, in rank order, in the parent; None in the clones."""
        step = self._next()
        if not self.is_parent:
            section_wire.send(self._conns[0], ("gather", step, obj))
            return None
        return [obj] + [self._expect(r, "gather", step) for r in range(1, self.size)]

    def bcast(self, obj=None):
        """The parent's obj, in every copy."""
        step = self._next()
        if self.is_parent:
            for r in range(1, self.size):
                section_wire.send(self._conns[r], ("bcast", step, obj))
            return obj
        return self._expect(0, "bcast", step)

    def barrier(self) -> None:
        """Returns in every copy once all copies have called it."""
        self.gather(None)
        self.bcast(None)

    @property
    def comm(self):
        """An mpi4py communicator over the section's copies, in rank order.
        Collective: every copy must use it (the first use starts MPI)."""
        if self._comm is None:
            self._comm = self._start_mpi()
        return self._comm

    def _start_mpi(self):
        from . import section_mpi
        global _mpi_started
        if _mpi_started or section_mpi.mpi_initialized():
            raise SectionError("section.comm: MPI was already started in this program (before the section, "
                               "or by an earlier one); MPI starts once per process, so import mpi4py.MPI "
                               "only inside the one section that uses it")
        _mpi_started = True
        if self.parent_ip is None:
            self.parent_ip = api.whoami()["ip"]
        if self._authkey is None:   # a section of one copy: the key is for this process alone
            self._authkey = family_auth.new_key()
        if self.is_parent:
            self._kvs = section_mpi.KeyValueServer(self.parent_ip, self.size,
                                                   self.ticket.id if self.ticket else "", self._authkey)
        port = self.bcast(self._kvs.port if self._kvs else None)
        subnet = api.family_subnet(self.parent_ip)
        return section_mpi.join_world(self.parent_ip, port, self.rank, self.size, subnet, self._authkey)

    def _next(self) -> int:
        self._step += 1
        return self._step

    def _check_peer(self, rank: int):
        """In the parent: raise if clone `rank` has ended (its VM takes its
        connection along without closing it). Clones need no check: hostd ends
        them with their parent."""
        if not self.is_parent or self.ticket is None:
            return None

        def check() -> None:
            m = api.ended_clone(self.ticket, rank)
            if m is not None:
                raise SectionError(f"clone {rank} of the parallel section ended "
                                   f"({m.failure or f'exit status {m.status}'}) before it left the section")
        return check

    def _expect(self, rank: int, op: str, step: int):
        try:
            kind, their_step, payload = section_wire.recv(self._conns[rank], self._check_peer(rank))
        except section_wire.PeerGone:
            who = "the parent" if rank == 0 else f"clone {rank}"
            raise SectionError(f"{who} of the parallel section is gone (during {op} #{step})") from None
        if kind == "error" and self.is_parent:
            raise rebuild(rank, payload)
        if (kind, their_step) != (op, step):
            raise SectionError(f"the copies of the parallel section are out of step: rank {self.rank} "
                               f"is in {op} #{step}, rank {rank} sent {kind} #{their_step}")
        return payload

    # -- the end of the section --------------------------------------------
    def _leave_clone(self, exc: BaseException | None) -> None:
        """In a clone: report to the parent and end this VM. Does not return."""
        self._leaving = True
        status = 0
        try:
            if exc is None:
                section_wire.send_last(self._conns[0], ("done", self._step, None))
            else:
                status = 1
                err = describe(exc)
                if _mpi_started:   # the parent may be waiting in MPI, deaf to the section
                    from . import section_mpi
                    section_mpi.report_failure(self.rank, err["traceback"].rstrip())
                section_wire.send_last(self._conns[0], ("error", self._step, err))
        except OSError:
            status = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
                api.exit(status)
            finally:
                os._exit(status)

    def _leave_parent(self, exc: BaseException | None) -> None:
        """In the parent: wait for every clone to leave, then join them. An
        exception here (the block's or a clone's) ends the clones at once."""
        if self._kvs is not None:
            self._kvs.parent_only()
        if self.ticket is None:
            return
        try:
            if exc is None:
                self._collect_clones()
        finally:
            if self.ticket is not None:   # not joined: an exception is on its way
                try:
                    api.kill(self.ticket)
                    api.join(self.ticket)
                except Exception:  # noqa: BLE001 - the exception on its way says more
                    pass
                self.ticket = None
            for conn in self._conns.values():
                conn.close()

    def _collect_clones(self) -> None:
        errors = []
        for r in range(1, self.size):
            try:
                kind, step, payload = section_wire.recv(self._conns[r], self._check_peer(r))
            except (section_wire.PeerGone, SectionError):
                errors.append((r, None))
                continue
            finally:
                self._conns[r].close()   # the clone waits for this before it ends
            if kind == "error":
                errors.append((r, payload))
            elif kind != "done":
                errors.append((r, {"kind": "SectionError", "pickled": None, "traceback": "",
                                   "message": f"left the section while the parent waited in {kind} #{step}"}))
        statuses = api.join(self.ticket)
        self.ticket = None
        if errors:
            rank, payload = errors[0]
            if payload is None:
                why = statuses.failures.get(rank) or f"exit status {statuses.get(rank)}"
                raise SectionError(f"clone {rank} of the parallel section ended without leaving it: {why}")
            raise rebuild(rank, payload)


def describe(exc: BaseException) -> dict:
    try:
        pickled = pickle.dumps(exc)
        pickle.loads(pickled)
    except Exception:
        pickled = None
    return {"kind": type(exc).__name__, "message": str(exc), "pickled": pickled,
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}


def rebuild(rank: int, payload: dict) -> BaseException:
    """The clone's exception as itself when it pickles, with the rank and the
    remote traceback as a note; CloneFailed otherwise."""
    if payload.get("pickled") is not None:
        try:
            exc = pickle.loads(payload["pickled"])
            exc.add_note(f"raised in clone {rank} of the parallel section:\n{payload['traceback']}")
            exc.sfmpi_rank = rank
            return exc
        except Exception:
            pass
    return CloneFailed(rank, payload["kind"], payload["message"], payload["traceback"])


def _fork(n: int, allow_fewer: bool, ticket_timeout: float | None) -> Section:
    if n == 1:
        return Section(0, 1, None, {})
    rank, size, ticket, conns, parent_ip, authkey = fork_connected(n - 1, allow_fewer, ticket_timeout,
                                                                   f"parallel({n})")
    section = Section(rank, size, ticket if rank == 0 else None, conns, parent_ip, authkey)
    if rank:
        _end_with_parent(section)
    return section


def _end_with_parent(section: Section) -> None:
    """In a clone: end this VM as soon as the parent's program is gone. A
    program killed outright closes its connections and nothing else tells the
    clones; one that computes without talking to the parent would run on until
    its next collective, however long that is."""
    conn = section._conns[0]

    def watch() -> None:
        while not section._leaving:
            try:
                select.select([conn], [], [], 1.0)
                if conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    break            # end of stream: the parent's program ended
            except BlockingIOError:
                continue             # nothing yet
            except OSError:
                break                # reset by the parent's side
            time.sleep(0.5)          # a message waits for the main thread to take it
        if section._leaving:         # the clone's own end of the section, not the parent's
            return
        sys.stderr.write(f"sfmpi: clone {section.rank}: the parallel section's parent program is gone; "
                         f"this clone ends\n")
        try:
            api.exit(1)
        finally:
            os._exit(1)
    threading.Thread(target=watch, name="sfmpi-parent-watch", daemon=True).start()


def fork_connected(clones: int, allow_fewer: bool, ticket_timeout: float | None, what: str):
    """Fork this VM into `clones` clones, each connected to the parent over the
    family network. (rank, copies, ticket, connections, the parent's address,
    the key): in the parent the connections by clone rank, in a clone {0: the
    connection to the parent}. The key is made here, before the fork: every
    copy has it, and a connection from anything else fails its handshake."""
    me = api.whoami()
    authkey = family_auth.new_key()
    listener = section_wire.listen(me["ip"])
    try:
        ticket = api.request_ticket(clones, timeout=ticket_timeout)
        if ticket.granted < clones and not (allow_fewer and ticket.granted > 0):
            api.kill(ticket)   # give the reservation back now
            raise UsageError(f"{what} needs {clones} clone(s), the host granted {ticket.granted}"
                             + ("" if allow_fewer else "; pass allow_fewer=True to run with what is granted"))
        port = listener.getsockname()[1]
        rank = api.clone(ticket)
        size = ticket.granted + 1
        if rank:
            listener.close()
            conn = _connect(me["ip"], port, authkey)
            section_wire.send(conn, ("hello", 0, rank))
            return rank, size, ticket, {0: conn}, me["ip"], authkey
        conns = _accept(family_auth.AuthListener(listener, authkey), ticket, size - 1)
        return 0, size, ticket, conns, me["ip"], authkey
    finally:
        listener.close()


def _connect(ip: str, port: int, authkey: bytes) -> socket.socket:
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:
        try:
            return family_auth.connect((ip, port), authkey, timeout=10.0)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _accept(listener: family_auth.AuthListener, ticket: api.Ticket, count: int) -> dict[int, socket.socket]:
    """The clones' connections, by rank. Only those that pass the handshake
    count (AuthListener refuses and logs the others)."""
    conns: dict[int, socket.socket] = {}
    deadline = time.monotonic() + CONNECT_TIMEOUT
    try:
        while len(conns) < count:
            try:
                conn = listener.accept(timeout=1.0)
            except TimeoutError:
                dead = [m for m in api.members(ticket) if m.state != "running" and m.id not in conns]
                if dead:
                    raise SectionError(f"clone {dead[0].id} ended before joining the parallel section: "
                                       f"{dead[0].failure or dead[0].status}") from None
                if time.monotonic() > deadline:
                    raise SectionError(f"only {len(conns)} of {count} clones reached the parallel section "
                                       f"in {CONNECT_TIMEOUT:.0f} s") from None
                continue
            _kind, _step, rank = section_wire.recv(conn)
            conns[int(rank)] = conn
        return conns
    except BaseException:
        for c in conns.values():
            c.close()
        api.kill(ticket)
        api.join(ticket)
        raise
    finally:
        listener.close()


class parallel:  # noqa: N801 - used as `with sfmpi.parallel(n)`, like a function
    """`with sfmpi.parallel(n) as section:` forks this VM into n copies for the block."""

    def __init__(self, n: int, *, allow_fewer: bool = False, ticket_timeout: float | None = None):
        if not isinstance(n, int) or n < 1:
            raise UsageError(f"parallel(n): n must be a whole number of copies, at least 1 (got {n!r})")
        self.n = n
        self.allow_fewer = allow_fewer
        self.ticket_timeout = ticket_timeout
        self.section: Section | None = None

    def __enter__(self) -> Section:
        global _active
        if _active:
            raise UsageError("parallel sections do not nest: this program is already in one")
        _active = True
        try:
            self.section = _fork(self.n, self.allow_fewer, self.ticket_timeout)
        except BaseException:
            _active = False
            raise
        return self.section

    def __exit__(self, exc_type, exc, tb) -> bool:
        global _active
        section = self.section
        if not section.is_parent:
            section._leave_clone(exc)   # never returns
        try:
            section._leave_parent(exc)
        finally:
            _active = False
        return False
