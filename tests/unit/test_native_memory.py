"""The lazy-memory path's C code (native/memory) under AddressSanitizer and UBSan.

native/tests/memory_test.c is a standalone program: it runs a real memory
server and fetcher on 127.0.0.1 and speaks the wire format to them, and
checks the page map and counters files. native/tests/mcast_test.c tests the
multicast distribution's pure part (memory/mcast.h: datagrams, MAC, assembly,
repair lists, suppression, pacing), no sockets. These tests build them
(make memory-test, make mcast-test) and run them with the leak checker on.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

NATIVE = Path(__file__).resolve().parents[2] / "native"
PROGRAM = NATIVE / "build" / "memory_test"
MCAST_PROGRAM = NATIVE / "build" / "mcast_test"


def test_memory_code_under_sanitizers():
    proc = subprocess.run(["make", "-C", str(NATIVE), "memory-test"], capture_output=True, text=True)
    assert proc.returncode == 0, f"make memory-test failed:\n{proc.stdout}\n{proc.stderr}"
    assert PROGRAM.is_file(), f"make memory-test did not build {PROGRAM}"

    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    # The program bounds its own waits (a few seconds each); this only stops a hang.
    proc = subprocess.run([str(PROGRAM)], capture_output=True, text=True, env=env, timeout=300)
    output = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, output
    assert any(
        line.startswith("memory_test: all ") and line.endswith(" checks passed") for line in proc.stdout.splitlines()
    ), output
    assert "ERROR: AddressSanitizer" not in proc.stderr and "runtime error:" not in proc.stderr, output


def test_multicast_code_under_sanitizers():
    proc = subprocess.run(["make", "-C", str(NATIVE), "mcast-test"], capture_output=True, text=True)
    assert proc.returncode == 0, f"make mcast-test failed:\n{proc.stdout}\n{proc.stderr}"
    assert MCAST_PROGRAM.is_file(), f"make mcast-test did not build {MCAST_PROGRAM}"

    env = dict(os.environ)
    env["ASAN_OPTIONS"] = "detect_leaks=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    # Pure code, no waits: it takes well under a second; this only stops a hang.
    proc = subprocess.run([str(MCAST_PROGRAM)], capture_output=True, text=True, env=env, timeout=120)
    output = f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert proc.returncode == 0, output
    assert any(
        line.startswith("mcast_test: all ") and line.endswith(" checks passed") for line in proc.stdout.splitlines()
    ), output
    assert "ERROR: AddressSanitizer" not in proc.stderr and "runtime error:" not in proc.stderr, output
