"""Pages a parent's guest frees never travel: its virtio-balloon reports them,
QEMU drops them from the parent's RAM file, and the next checkpoint's map of
non-zero pages leaves them out (a parent started --no-free-page-reporting
keeps them, side by side). A clone has the same balloon (it is restored from
the parent's devices) and reports the pages it frees too: its QEMU gives that
memory back, but the checkpoint's RAM file every clone maps is never touched
(QEMU 7.2 would punch holes in it: native/qemu-keepram/keepram.c)."""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import psutil
import pytest

from sfmpi import _native

from .conftest import Cli, make_home

pytestmark = pytest.mark.timeout(900)

MiB = 1 << 20
HOLD = 150   # MiB of random data a guest process holds, then frees by exiting

HOLDER = ("nohup python3 -c \"import os, time\nb = bytearray(os.urandom(1 << 20) * %d)\n"
          "open('/run/held', 'w').write(str(os.getpid()))\ntime.sleep(10 ** 6)\" >/dev/null 2>&1 &\n"
          "while [ ! -s /run/held ]; do sleep 0.3; done" % HOLD)
FREE = "p=$(cat /run/held); rm /run/held; kill $p; while kill -0 $p 2>/dev/null; do sleep 0.2; done"


@pytest.fixture(scope="module")
def cli(request):
    c = Cli(make_home("fpr"))
    try:
        yield c
    finally:
        left = c.teardown(keep_logs=getattr(request.session, "sfmpi_failed", False))
        shutil.rmtree(c.home, ignore_errors=True)
        assert not left, f"free-page-reporting home left things behind: {left}"


def nonzero_mb(cli: Cli, ck: str, tmp_path: Path) -> float:
    ram = cli.paths.checkpoints / ck / "ram"
    return _native.scan(str(ram), str(tmp_path / f"{ck}.map")) * 4096 / MiB


def ram_file_mb(cli: Cli, vm: str) -> float:
    """What the parent's RAM file (tmpfs) holds."""
    return os.stat(cli.paths.shm / f"{vm}.ram").st_blocks * 512 / MiB


def held_then_freed(cli: Cli, vm: str, tmp_path: Path, reporting: bool) -> tuple[float, float]:
    """Non-zero MiB of a checkpoint taken while a process holds HOLD MiB, and of one after it exited."""
    cli.exec(vm, HOLDER)
    held = cli("checkpoint", vm).stdout.strip()
    before = ram_file_mb(cli, vm)
    cli.exec(vm, FREE)
    if reporting:   # the guest reports after ~2 s; wait until QEMU dropped the pages
        deadline = time.monotonic() + 60
        while ram_file_mb(cli, vm) > before - HOLD * 0.6 and time.monotonic() < deadline:
            time.sleep(1)
    else:
        time.sleep(8)
    freed = cli("checkpoint", vm).stdout.strip()
    out = nonzero_mb(cli, held, tmp_path), nonzero_mb(cli, freed, tmp_path)
    for ck in (held, freed):
        cli("checkpoint", "rm", ck)
    return out


def test_freed_pages_are_not_in_the_next_checkpoint(cli, tmp_path):
    cli("vm", "start", "fr", "--mem", "512M", "--ram-backing", "tmpfs")
    cli("vm", "start", "keep", "--mem", "512M", "--ram-backing", "tmpfs", "--no-free-page-reporting")
    held, freed = held_then_freed(cli, "fr", tmp_path, reporting=True)
    kept_held, kept_freed = held_then_freed(cli, "keep", tmp_path, reporting=False)
    assert held >= HOLD and kept_held >= HOLD
    assert held - freed >= HOLD * 0.6, (held, freed)             # reported: gone from the map
    assert kept_held - kept_freed < HOLD * 0.2, (kept_held, kept_freed)   # not reported: still there
    cli("vm", "stop", "keep")


def test_a_clone_freeing_memory_never_touches_the_checkpoint(cli):
    cli.exec("fr", HOLDER)
    ck = cli("checkpoint", "fr").stdout.strip()
    ram = cli.paths.checkpoints / ck / "ram"
    digest = hashlib.sha256(ram.read_bytes()).hexdigest()
    name = cli.json("clone", ck, "-n", "1")["clones"][0]
    qemu = psutil.Process(next(r["pid"] for r in cli.json("vm", "list") if r["name"] == name))
    # The held pages are the checkpoint's: freeing them is what QEMU 7.2 would punch out of it.
    cli.exec(name, FREE)
    # Pages of the clone's own (private copies) show that its reports reach its QEMU.
    cli.exec(name, HOLDER)
    rss = qemu.memory_info().rss
    cli.exec(name, FREE)
    # The clone's reports reach its QEMU, which gives the memory back ...
    deadline = time.monotonic() + 60
    while qemu.memory_info().rss > rss - 60 * MiB and time.monotonic() < deadline:
        time.sleep(1)
    assert qemu.memory_info().rss <= rss - 60 * MiB, (rss, qemu.memory_info().rss)
    # ... and the checkpoint every clone maps is as it was, byte for byte.
    assert hashlib.sha256(ram.read_bytes()).hexdigest() == digest
    # The clone still reads its own data right.
    assert cli.exec(name, "echo ok").stdout.strip() == "ok"
    cli("vm", "stop", name)
    cli("checkpoint", "rm", ck)
    cli("vm", "stop", "fr")
