"""Messages between the copies of a parallel section or a fork pool: a
length-prefixed pickle per message over TCP on the family network.

Pickle, because what crosses is the program's own objects, between copies of
the same program, on the family's private segment (nft lets no other family's
VM reach it). Another process of the family could reach the port too, so a
connection carries messages only once its peer has passed the handshake on
the key every copy inherited (family_auth, multiprocessing.connection's
challenge); unpickling before that would run whatever it sent. The framing
after the handshake stays this module's own, on the socket: a wait for a
message checks that the peer still lives even halfway through one, and a
copy's last message ends with a half-close (send_last), which a
multiprocessing Connection does neither of.
"""
from __future__ import annotations

import pickle
import socket
import struct
from typing import Callable

HEADER = struct.Struct("!Q")
# How often a waiting copy asks whether its peer still lives: a clone's VM that
# is destroyed sends no FIN, so its connection would otherwise wait forever.
LIVENESS_EVERY = 1.0


class PeerGone(Exception):
    """The other end closed the connection (its VM ended or it never came)."""


def send(sock: socket.socket, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(HEADER.pack(len(data)) + data)


def recv(sock: socket.socket, check_peer: Callable[[], None] | None = None):
    """The next message. With check_peer, it is called every LIVENESS_EVERY
    seconds of waiting and raises if the peer is known to be gone."""
    (size,) = HEADER.unpack(_exactly(sock, HEADER.size, check_peer))
    return pickle.loads(_exactly(sock, size, check_peer))


def _exactly(sock: socket.socket, n: int, check_peer) -> bytes:
    buf = bytearray()
    sock.settimeout(LIVENESS_EVERY if check_peer else None)
    try:
        while len(buf) < n:
            try:
                chunk = sock.recv(min(n - len(buf), 1 << 20))
            except socket.timeout:
                check_peer()
                continue
            if not chunk:
                raise PeerGone()
            buf += chunk
    finally:
        sock.settimeout(None)
    return bytes(buf)


def send_last(sock: socket.socket, obj, wait: float = 30.0) -> None:
    """Send a copy's last message, then wait until the other end has read it
    and closed: the sender's VM is destroyed right after, and whatever still
    sits in its socket buffer then never leaves it."""
    send(sock, obj)
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(wait)
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass


def listen(ip: str) -> socket.socket:
    """A listener on this VM's family address, any port: opened before the
    fork, so every clone has it too and knows the parent's port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((ip, 0))
    s.listen(64)
    return s
