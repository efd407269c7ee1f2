"""Authenticated TCP connections between the copies of a forked VM: a
parallel section's parent and clones, the section's MPI key-value space,
sfmpirun's control line.

Any process on any VM of the family can reach these ports, and what crosses
some of them is pickles: the peer must prove it is a copy of the program that
opened them. It does with multiprocessing.connection's HMAC challenge, both
ways (as multiprocessing's own Listener and Client do), on a key made with
`new_key()` in the parent before the fork: every clone inherits it in memory,
so it is never sent. After the handshake the connection is the plain socket
again and carries what it always carried (section_wire's messages, the
control line's exit word, the PMI-1 lines).

multiprocessing's own Listener runs the handshake inside accept(), with no
deadline: a silent peer holds it forever, an impostor's refusal comes out of
accept() as an exception, and the real peers wait behind either. Here the
listening socket is the caller's (opened before the fork, if need be) and
every handshake runs in a thread of its own with a deadline: an impostor,
refused or silent, neither stops nor delays the real peers.
"""
from __future__ import annotations

import contextlib
import os
import queue
import secrets
import select
import socket
import sys
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge

KEY_BYTES = 32
# For both ends of a handshake, from the connection to the last message of the
# challenge: a few milliseconds of work, but a fresh clone under TCG is slow.
HANDSHAKE_TIMEOUT = 20.0
# What a handshake with an impostor may raise: a wrong digest, garbage in place
# of the challenge (an assert in Python 3.11), a closed or reset connection.
REFUSALS = (AuthenticationError, AssertionError, EOFError, OSError, ValueError)


class HandshakeFailed(ConnectionError):
    """The other end did not prove that it knows the key (or never answered)."""


def new_key() -> bytes:
    """A fresh key. Make it before the fork: the clones have it then."""
    return secrets.token_bytes(KEY_BYTES)


def connect(address: tuple[str, int], authkey: bytes, timeout: float = 10.0,
            handshake_timeout: float = HANDSHAKE_TIMEOUT) -> socket.socket:
    """A blocking socket to `address`, whose listener has proved it knows
    `authkey` (and been shown that this end does). OSError (HandshakeFailed
    included) when it cannot be had."""
    sock = socket.create_connection(address, timeout=timeout)
    sock.settimeout(None)
    try:
        _handshake(sock, authkey, listening=False, timeout=handshake_timeout)
    except REFUSALS as exc:
        sock.close()
        why = _why(exc, handshake_timeout)
        raise HandshakeFailed(f"no handshake with {address[0]}:{address[1]}: {why}") from None
    return sock


class AuthListener:
    """Hands out the connections on `sock` (bound and listening: it may have
    been opened before the fork) whose peer proves it knows `authkey`. A peer
    that does not is refused and logged, and the listener goes on. New
    connections are taken while accept() waits."""

    def __init__(self, sock: socket.socket, authkey: bytes, *, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 log=None):
        self.sock = sock
        self.authkey = authkey
        self.port = sock.getsockname()[1]
        self.handshake_timeout = handshake_timeout
        self._log = log or (lambda text: print(f"sfmpi: {text}", file=sys.stderr, flush=True))
        self._passed: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()   # a passed handshake wakes accept()
        self._lock = threading.Lock()
        self._closed = False
        self._accepting = 0      # accept() calls under way: they select on the descriptors
        sock.setblocking(False)   # accept() only after select: a peer gone meanwhile must not block it

    def accept(self, timeout: float | None = None) -> socket.socket:
        """The next peer that passed the handshake, as a blocking socket.
        TimeoutError if none did within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if self._closed:
                raise OSError(f"the listener on port {self.port} is closed")
            self._accepting += 1
        waiting = select.poll()   # not select(): a program may hold descriptors above 1024
        waiting.register(self.sock, select.POLLIN)
        waiting.register(self._wake_r, select.POLLIN)
        try:
            while True:
                if self._closed:
                    raise OSError(f"the listener on port {self.port} is closed")
                try:
                    return self._passed.get_nowait()
                except queue.Empty:
                    pass
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no peer passed the handshake within {timeout:g} s")
                ready = {fd for fd, _ in waiting.poll(None if left is None else left * 1000)}
                if self._wake_r in ready:
                    os.read(self._wake_r, 4096)
                if self.sock.fileno() in ready:
                    self._take_one()
        finally:
            with self._lock:
                self._accepting -= 1
                last = self._closed and not self._accepting
            if last:   # close() came meanwhile and left the descriptors to the last accept()
                self._release()

    def _take_one(self) -> None:
        try:
            conn, peer = self.sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        conn.setblocking(True)
        threading.Thread(target=self._check, args=(conn, peer), daemon=True, name="sfmpi-handshake").start()

    def _check(self, conn: socket.socket, peer) -> None:
        try:
            _handshake(conn, self.authkey, listening=True, timeout=self.handshake_timeout)
        except REFUSALS as exc:
            conn.close()
            if not self._closed:   # no one listens any more: not worth a line
                self._log(f"refused a connection from {peer[0]}:{peer[1]} on port {self.port}: "
                          f"{_why(exc, self.handshake_timeout)}")
            return
        with self._lock:
            if self._closed:
                conn.close()
                return
            self._passed.put(conn)
            os.write(self._wake_w, b"!")

    def close(self) -> None:
        """Stop listening. Peers that passed but were not taken are closed; an
        accept() under way in another thread raises OSError."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            while True:
                try:
                    self._passed.get_nowait().close()
                except queue.Empty:
                    break
            if self._accepting:
                # Closing descriptors another thread selects on would let it
                # read whatever reuses their numbers: wake it, it closes them.
                os.write(self._wake_w, b"!")
                return
        self._release()

    def _release(self) -> None:
        self.sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _handshake(sock: socket.socket, authkey: bytes, listening: bool, timeout: float) -> None:
    """multiprocessing.connection's challenge, both ways, in the order of its
    Listener (listening) and Client, on a duplicate of the socket's descriptor
    (Connection owns and closes the descriptor it is given)."""
    with _deadline(sock, timeout):
        conn = Connection(os.dup(sock.fileno()))
        try:
            if listening:
                deliver_challenge(conn, authkey)
                answer_challenge(conn, authkey)
            else:
                answer_challenge(conn, authkey)
                deliver_challenge(conn, authkey)
        finally:
            conn.close()


class _Expired(TimeoutError):
    pass


@contextlib.contextmanager
def _deadline(sock: socket.socket, seconds: float):
    """Shut `sock` down if the block is still running after `seconds`: a peer
    that says nothing, or a byte at a time, cannot hold it longer. (A socket
    timeout cannot do it: Connection reads the descriptor with os.read, which
    a socket in timeout mode makes non-blocking.)"""
    lock = threading.Lock()
    state = {"done": False, "expired": False}

    def expire() -> None:
        with lock:
            if not state["done"]:
                state["expired"] = True
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except REFUSALS:
        if state["expired"]:
            raise _Expired() from None
        raise
    finally:
        with lock:
            state["done"] = True
        timer.cancel()
    if state["expired"]:   # finished as the deadline passed: the socket is shut down now
        raise _Expired()


def _why(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, _Expired):
        return f"it did not finish within {timeout:g} s"
    if isinstance(exc, AuthenticationError):
        return f"wrong key ({exc})"
    if isinstance(exc, AssertionError):
        return "the other end sent something other than the challenge"
    if isinstance(exc, EOFError):
        return "the connection closed during the handshake"
    return f"{type(exc).__name__}: {exc}"
