"""HostLock: one hostd per state directory (flock per open file description)."""
from __future__ import annotations

import os

import pytest

from sfmpi.errors import HostdError
from sfmpi.hostd.daemon.lock import HostLock
from sfmpi.paths import Paths


@pytest.fixture
def paths(tmp_path):
    return Paths(tmp_path / "home")  # does not exist yet: acquire creates it


def test_acquire_writes_pid(paths):
    lock = HostLock(paths)
    lock.acquire()
    try:
        assert paths.lock.read_text() == str(os.getpid())
        assert oct(paths.lock.stat().st_mode & 0o777) == oct(0o600)
    finally:
        lock.release()


def test_second_acquire_refused_naming_pid(paths):
    first, second = HostLock(paths), HostLock(paths)
    first.acquire()
    try:
        with pytest.raises(HostdError) as ei:
            second.acquire()
        msg = str(ei.value)
        assert f"pid {os.getpid()}" in msg
        assert str(paths.home) in msg
        assert second.fd is None
        # The refused attempt must not clobber the holder's pid.
        assert paths.lock.read_text() == str(os.getpid())
    finally:
        first.release()


def test_release_then_acquire(paths):
    first, second = HostLock(paths), HostLock(paths)
    first.acquire()
    first.release()
    assert first.fd is None
    first.release()  # idempotent
    second.acquire()
    try:
        with pytest.raises(HostdError):
            first.acquire()
    finally:
        second.release()


def test_stale_longer_pid_is_overwritten(paths):
    paths.home.mkdir(parents=True)
    paths.lock.write_text("99999999999")
    lock = HostLock(paths)
    lock.acquire()
    try:
        assert paths.lock.read_text() == str(os.getpid())
    finally:
        lock.release()


def test_no_fd_leak(paths):
    before = len(os.listdir("/proc/self/fd"))
    a, b = HostLock(paths), HostLock(paths)
    a.acquire()
    for _ in range(5):
        with pytest.raises(HostdError):
            b.acquire()
    a.release()
    assert len(os.listdir("/proc/self/fd")) == before
