"""Authenticated connections between the copies of a VM family, without a VM:
the right key gets in, a wrong key, no handshake or silence is refused without
keeping the right peers out, and nothing waits past its timeout. Then
sfmpirun's control line on top of it."""
from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import pytest

from sfmpi import family_auth, section_wire
from sfmpi.errors import LaunchError
from sfmpi.launcher import control

KEY = family_auth.new_key()


class Served:
    """An AuthListener on loopback, with a thread taking what it hands out."""

    def __init__(self, handshake_timeout: float = family_auth.HANDSHAKE_TIMEOUT):
        self.log: list[str] = []
        self.listener = family_auth.AuthListener(section_wire.listen("127.0.0.1"), KEY,
                                                 handshake_timeout=handshake_timeout, log=self.log.append)
        self.address = ("127.0.0.1", self.listener.port)
        self.accepted: queue.Queue = queue.Queue()
        self.taker = threading.Thread(target=self._take, daemon=True)
        self.taker.start()

    def _take(self) -> None:
        while True:
            try:
                self.accepted.put(self.listener.accept())
            except OSError:
                return

    def next(self, timeout: float = 5.0) -> socket.socket:
        return self.accepted.get(timeout=timeout)

    def refusals(self, count: int, timeout: float = 5.0) -> list[str]:
        """The first `count` refusals logged, once there are as many."""
        deadline = time.monotonic() + timeout
        while len(self.log) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.log[:count]

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def served():
    s = Served()
    yield s
    s.close()


def test_the_right_key_gets_in_and_the_socket_carries_messages_after(served):
    with family_auth.connect(served.address, KEY) as mine, served.next() as theirs:
        section_wire.send(mine, ("hello", 0, 3))
        assert section_wire.recv(theirs) == ("hello", 0, 3)
        theirs.sendall(b"exit 0\n")
        assert mine.recv(64) == b"exit 0\n"
    assert served.log == []


def test_the_standard_librarys_client_with_the_key_gets_in_too(served):
    """The same challenge, both ways, as multiprocessing's Listener and Client."""
    c = Client(served.address, authkey=KEY)
    with served.next() as theirs:
        c.send_bytes(b"hi")
        assert theirs.recv(64) == struct.pack("!i", 2) + b"hi"
    c.close()


def test_a_wrong_key_is_refused_and_the_listener_still_takes_the_right_peer(served):
    with pytest.raises(family_auth.HandshakeFailed, match="wrong key"):
        family_auth.connect(served.address, b"not the key")
    with pytest.raises(AuthenticationError):
        Client(served.address, authkey=b"not the key either")
    assert all("wrong key" in line for line in served.refusals(2))
    with family_auth.connect(served.address, KEY) as mine, served.next() as theirs:
        mine.sendall(b"x")
        assert theirs.recv(1) == b"x"
    assert served.accepted.empty()   # the refused ones were never handed out


def test_a_peer_without_the_handshake_is_refused_and_its_message_never_read(served):
    """The old protocol: a pickle straight away. It is taken as a wrong answer to
    the challenge, never unpickled, and the connection is closed."""
    with socket.create_connection(served.address, timeout=5) as raw:
        section_wire.send(raw, ("hello", 0, 1))
        raw.settimeout(5)
        with contextlib.suppress(ConnectionResetError):   # closed with the pickle unread
            while raw.recv(4096):    # the challenge, then the refusal, then the close
                pass
    assert "wrong key" in served.refusals(1)[0]
    with family_auth.connect(served.address, KEY), served.next():
        pass


@pytest.mark.parametrize("says", [b"", struct.pack("!i", 200) + b"half"], ids=["nothing", "half a message"])
def test_a_silent_peer_delays_no_one_and_is_closed_at_the_timeout(says):
    served = Served(handshake_timeout=1.5)
    try:
        t0 = time.monotonic()
        silent = socket.create_connection(served.address, timeout=5)
        silent.sendall(says)
        with family_auth.connect(served.address, KEY), served.next():
            assert time.monotonic() - t0 < 1.0        # not after the silent peer's handshake
        silent.settimeout(5)
        while silent.recv(4096):                       # the listener ends it at the deadline
            pass
        assert 1.4 < time.monotonic() - t0 < 4.0
        assert "did not finish within 1.5 s" in served.refusals(1)[0]
        silent.close()
    finally:
        served.close()


def test_accept_gives_up_at_its_timeout_though_a_silent_peer_is_connected():
    listener = family_auth.AuthListener(section_wire.listen("127.0.0.1"), KEY, log=lambda text: None)
    try:
        with socket.create_connection(("127.0.0.1", listener.port), timeout=5):
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                listener.accept(timeout=0.3)
            assert time.monotonic() - t0 < 2.0
    finally:
        listener.close()


def test_a_client_facing_a_silent_listener_gives_up_at_the_timeout():
    with section_wire.listen("127.0.0.1") as mute:   # the kernel accepts, no one answers
        t0 = time.monotonic()
        with pytest.raises(family_auth.HandshakeFailed, match="did not finish within 0.5 s"):
            family_auth.connect(("127.0.0.1", mute.getsockname()[1]), KEY, handshake_timeout=0.5)
        assert time.monotonic() - t0 < 3.0


def test_closing_the_listener_ends_an_accept_under_way_and_hands_out_nothing_more():
    served = Served()
    time.sleep(0.1)                    # the taker waits in accept()
    served.close()
    served.taker.join(5)
    assert not served.taker.is_alive()
    with pytest.raises(OSError, match="closed"):
        served.listener.accept(timeout=0.1)


# -- sfmpirun's control line --------------------------------------------------
def test_only_the_parent_can_give_a_clone_its_exit_word(capsys):
    listener = control.listen()
    port = listener.port
    word: queue.Queue = queue.Queue()
    waiting = threading.Thread(target=lambda: word.put(control.wait_for_exit_word(listener, timeout=30)))
    waiting.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as fake:
            fake.sendall(b"exit 0\n")               # no handshake: not a word
        with pytest.raises(LaunchError, match="wrong key"):
            control.CloneLines().connect(7, "127.0.0.1", port, b"guessed", timeout=0.5)
        assert word.empty()                         # the clone still waits
        lines = control.CloneLines()
        lines.connect(7, "127.0.0.1", port, listener.authkey)
        lines.send_exit(3)
        assert word.get(timeout=5) == 3
    finally:
        waiting.join(5)
        listener.close()
    err = capsys.readouterr().err
    assert "sfmpirun: refused a connection from 127.0.0.1" in err


def test_a_clone_whose_parent_never_calls_gives_up():
    listener = control.listen()
    try:
        with socket.create_connection(("127.0.0.1", listener.port), timeout=5):   # not the parent
            t0 = time.monotonic()
            assert control.wait_for_exit_word(listener, timeout=0.5) == control.NO_WORD
            assert time.monotonic() - t0 < 2.0
    finally:
        listener.close()


def test_a_parent_whose_line_closes_without_a_word_leaves_no_word():
    listener = control.listen()
    word: queue.Queue = queue.Queue()
    waiting = threading.Thread(target=lambda: word.put(control.wait_for_exit_word(listener, timeout=30)))
    waiting.start()
    try:
        lines = control.CloneLines()
        lines.connect(1, "127.0.0.1", listener.port, listener.authkey)
        lines.close()                               # sfmpirun killed: the line closes
        assert word.get(timeout=5) == control.NO_WORD
    finally:
        waiting.join(5)
        listener.close()
