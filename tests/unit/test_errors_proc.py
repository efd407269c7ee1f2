"""proc.run turns failures into CommandError; errors cross the wire intact."""
from __future__ import annotations

import asyncio
import time

import pytest

from sfmpi import errors, proc
from sfmpi.errors import CommandError


def test_run_success_captures_output():
    p = proc.run(["sh", "-c", "echo hello; echo warn >&2"])
    assert p.returncode == 0 and p.stdout == b"hello\n" and p.stderr == b"warn\n"
    assert proc.output(["echo", 42]) == "42\n"  # non-str argv items are converted


def test_failure_carries_argv_code_and_stderr():
    argv = ["sh", "-c", "echo first >&2; echo boom >&2; exit 3"]
    with pytest.raises(CommandError) as ei:
        proc.run(argv)
    e = ei.value
    assert e.argv == argv and e.returncode == 3
    assert e.stderr == "first\nboom\n"
    assert str(e) == "sh exited with 3: boom"  # last stderr line only
    assert e.exit_code == 1 and isinstance(e, errors.SfmpiError)


def test_failure_without_stderr():
    with pytest.raises(CommandError) as ei:
        proc.run(["false"])
    assert str(ei.value) == "false exited with 1"


def test_check_false_returns_process():
    assert proc.run(["sh", "-c", "exit 4"], check=False).returncode == 4


def test_command_not_found_is_127():
    with pytest.raises(CommandError) as ei:
        proc.run(["sfmpi-no-such-command-xyz", "arg"])
    assert ei.value.returncode == 127
    assert "command not found" in str(ei.value)
    assert ei.value.argv == ["sfmpi-no-such-command-xyz", "arg"]


def test_timeout():
    t0 = time.monotonic()
    with pytest.raises(CommandError) as ei:
        proc.run(["sleep", "10"], timeout=0.2)
    assert time.monotonic() - t0 < 5
    assert ei.value.returncode == -1
    assert "timed out after 0.2 s" in str(ei.value)


def test_input_is_passed():
    assert proc.run(["cat"], input=b"abc").stdout == b"abc"


def test_run_async():
    code, out, err = asyncio.run(proc.run_async(["sh", "-c", "echo o; echo e >&2"]))
    assert (code, out, err) == (0, b"o\n", b"e\n")
    with pytest.raises(CommandError) as ei:
        asyncio.run(proc.run_async(["sh", "-c", "echo bad >&2; exit 2"]))
    assert ei.value.returncode == 2 and str(ei.value) == "sh exited with 2: bad"
    with pytest.raises(CommandError) as ei:
        asyncio.run(proc.run_async(["sfmpi-no-such-command-xyz"]))
    assert ei.value.returncode == 127


@pytest.mark.parametrize("cls", sorted(errors.BY_NAME.values(), key=lambda c: c.__name__))
def test_from_wire_round_trip(cls):
    original = cls(["qemu-img", "x"], 2, "bad\n") if cls is CommandError else cls("VM c1 on h1: broken")
    wire = {"type": type(original).__name__, "message": str(original)}
    back = errors.from_wire(wire["type"], wire["message"])
    assert type(back) is cls
    assert str(back) == str(original)
    assert back.exit_code == original.exit_code


def test_from_wire_unknown_type_is_base_error():
    back = errors.from_wire("KeyError", "whatever")
    assert type(back) is errors.SfmpiError and str(back) == "whatever"


def test_usage_error_exit_code():
    assert errors.UsageError("x").exit_code == 2
    assert errors.from_wire("UsageError", "x").exit_code == 2
