"""Messages between the copies of a parallel section or a fork pool: a
length-prefixed pickle per message over TCP on the family network.

Pickle, because what crosses is the program's own objects, between copies of
the same program, on the family's private segment (nft lets no other family's
VM reach it). multiprocessing.connection does the same framing, but only over
its own listener with an authkey handshake; the sockets here are opened before
the fork and already known to both ends.
"""
from __future__ import annotations

import pickle
import socket
import struct

HEADER = struct.Struct("!Q")


class PeerGone(Exception):
    """The other end closed the connection (its VM ended or it never came)."""


def send(sock: socket.socket, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(HEADER.pack(len(data)) + data)


def recv(sock: socket.socket):
    (size,) = HEADER.unpack(_exactly(sock, HEADER.size))
    return pickle.loads(_exactly(sock, size))


def _exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise PeerGone()
        buf += chunk
    return bytes(buf)


def listen(ip: str) -> socket.socket:
    """A listener on this VM's family address, any port: opened before the
    fork, so every clone has it too and knows the parent's port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((ip, 0))
    s.listen(64)
    return s
