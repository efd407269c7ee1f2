"""The one helper every subprocess call goes through.

It logs the command, never uses a shell, and turns a failure into a
CommandError that carries argv, exit code and stderr.
"""
from __future__ import annotations

import logging
import subprocess
from typing import Sequence

from .errors import CommandError

log = logging.getLogger("sfmpi.proc")

# hostd's commands (qemu-img, nft, fallocate, dd) take well under a second;
# one that hangs (a stuck NFS, a wedged device) must not hold hostd forever.
DEFAULT_TIMEOUT = 300.0


def run(argv: Sequence[str], *, check: bool = True, timeout: float | None = DEFAULT_TIMEOUT,
        input: bytes | None = None, capture: bool = True, **kwargs) -> subprocess.CompletedProcess:
    argv = [str(a) for a in argv]
    log.debug("run: %s", " ".join(argv))
    try:
        if capture:
            kwargs.setdefault("stdout", subprocess.PIPE)
            kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.run(argv, input=input, timeout=timeout, **kwargs)
    except FileNotFoundError as exc:
        raise CommandError(argv, 127, f"{argv[0]}: command not found") from exc
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if exc.stderr else ""
        raise CommandError(argv, -1, f"timed out after {timeout} s. {stderr}") from exc
    if check and proc.returncode != 0:
        stderr = proc.stderr.decode(errors="replace") if isinstance(proc.stderr, bytes) else ""
        raise CommandError(argv, proc.returncode, stderr)
    return proc


def output(argv: Sequence[str], **kwargs) -> str:
    """Run and return stdout as text."""
    return run(argv, **kwargs).stdout.decode()


async def run_async(argv: Sequence[str], *, check: bool = True, timeout: float | None = DEFAULT_TIMEOUT,
                    input: bytes | None = None) -> tuple[int, bytes, bytes]:
    """The asyncio twin of run(), for hostd's event loop. The child is killed
    (and reaped) when the timeout passes or the caller is cancelled: no call
    leaves a process behind or waits forever."""
    import asyncio

    argv = [str(a) for a in argv]
    log.debug("run: %s", " ".join(argv))
    try:
        p = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError as exc:
        raise CommandError(argv, 127, f"{argv[0]}: command not found") from exc
    try:
        out, err = await asyncio.wait_for(p.communicate(input), timeout)
    except asyncio.TimeoutError:
        await _kill(p)
        raise CommandError(argv, -1, f"timed out after {timeout} s") from None
    except BaseException:  # cancelled: the child goes with the call
        await _kill(p)
        raise
    if check and p.returncode != 0:
        raise CommandError(argv, p.returncode, err.decode(errors="replace"))
    return p.returncode, out, err


async def _kill(p) -> None:
    import asyncio
    import contextlib

    with contextlib.suppress(ProcessLookupError):
        p.kill()
    with contextlib.suppress(Exception):
        await asyncio.shield(p.wait())
