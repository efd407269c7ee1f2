"""Parallel sections without a VM: the wire, exceptions crossing it, a
one-copy section, argument checks."""
from __future__ import annotations

import socket
import threading

import pytest

import sfmpi
from sfmpi import section_wire, sections
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
