"""Capturing a running VM's RAM and device state for a checkpoint: three modes.

All leave the parent running on a new disk layer (hostd/fork/disks.py) and
produce the same files (hostd/fork/manifest.py); docs/architecture.md compares them.
- background (default for a parent): a short stop, then QEMU's background
  snapshot streams RAM as of the stop into a receiver QEMU while the parent runs.
- precopy: live pre-copy into the receiver; the parent pauses only for the
  switchover, but the copy relies on dirty tracking (unreliable under TCG).
- paused (default for a clone and for an in-guest clone()): stop, save the
  device state, copy the RAM file sparsely, freeze the disk, continue.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import time
from pathlib import Path

from sfmpi import proc
from sfmpi.errors import CheckpointError, QemuError

from .. import crashpoints
from ..vm.qemu import QemuProcess
from .disks import DiskFreeze

MODES = ("background", "precopy", "paused")
# Local pre-copy: no reason to throttle a copy that never leaves the host
# (QEMU's default max-bandwidth is 128 MiB/s).
LOCAL_BANDWIDTH = 8 << 30
DOWNTIME_LIMIT_MS = 20


# The paused checkpoint copies the parent's RAM while it is stopped, in parts
# copied in parallel: one `cp --sparse=always` was CPU-bound (150 ms for the
# 200 MB touched of a 512 MiB guest; two halves at once took 90 ms on 2 cores).
# A block of zeros this size becomes a hole in the copy.
SPARSE_BLOCK = 256 << 10


def sparse_copy_argvs(src: str, dst: str, size: int, parts: int) -> list[list[str]]:
    """dd command lines that together copy `src` to `dst` (already `size` bytes
    long), each its own range, leaving holes for zero blocks."""
    blocks = -(-size // SPARSE_BLOCK)
    parts = max(1, min(parts, blocks))
    per = -(-blocks // parts)
    return [["dd", f"if={src}", f"of={dst}", f"bs={SPARSE_BLOCK}", f"skip={i * per}", f"seek={i * per}",
             f"count={per}", "conv=sparse,notrunc", "status=none"]
            for i in range(parts) if i * per < blocks]


async def sparse_copy(src: str, dst: str) -> None:
    size = os.stat(src).st_size
    with open(dst, "wb") as f:
        f.truncate(size)  # holes at the end too
    await asyncio.gather(*(proc.run_async(argv)
                           for argv in sparse_copy_argvs(src, dst, size, os.cpu_count() or 1)))


def event_time(ev) -> float:
    ts = ev["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6


def pause_from_events(events: list) -> float:
    """Parent pause in ms, from QEMU's own STOP and RESUME event timestamps."""
    stop = next((event_time(e) for e in events if e["event"] == "STOP"), None)
    resume = next((event_time(e) for e in reversed(events) if e["event"] == "RESUME"), None)
    if stop is None or resume is None:
        return 0.0
    return (resume - stop) * 1000.0


async def set_capabilities(vm: QemuProcess, **states: bool) -> None:
    """migrate-set-capabilities with keyword names: x_ignore_shared=True -> x-ignore-shared.

    Every migration here turns `events` on: without it QEMU 7.2 sends no
    MIGRATION events at all, and we would wait for them forever.
    """
    await vm.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": name.replace("_", "-"), "state": state} for name, state in states.items()]})


async def save_device_state(vm: QemuProcess, state_file: Path, timeout: float = 120.0) -> None:
    """migrate exec:cat > state with x-ignore-shared: device state only, no shared RAM."""
    await set_capabilities(vm, events=True, x_ignore_shared=True, pause_before_switchover=False)
    listener = vm.listen("MIGRATION")
    with vm.listening(listener):
        await vm.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(state_file))}"})
        await vm.wait_migration(listener, {"completed"}, timeout)


async def capture_precopy(parent: QemuProcess, receiver: QemuProcess, receiver_uri: str,
                          disk: DiskFreeze, state_file: Path) -> dict:
    """Live pre-copy into `receiver`; freeze the disk at the switchover; save state from the receiver.

    Returns timings in ms and the parent's pause measured from QEMU's events.
    """
    t0 = time.monotonic()
    was_running = await parent.status() == "running"
    await set_capabilities(parent, events=True, x_ignore_shared=False, pause_before_switchover=True)
    await parent.execute("migrate-set-parameters", {
        "downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": LOCAL_BANDWIDTH})
    rx_listener = receiver.listen("MIGRATION")
    listener = parent.listen("MIGRATION", "STOP", "RESUME")
    events = []
    try:
        # Prepared now, not at the switchover: everything done there is pause.
        await disk.prepare()
        t_switch = await _precopy(parent, receiver, receiver_uri, listener, rx_listener, events,
                                  disk, was_running)
    except BaseException:
        await abort_migration(parent, was_running)
        await disk.undo()
        raise
    t_parent = time.monotonic()
    await save_device_state(receiver, state_file)
    t_state = time.monotonic()
    return {
        "pause_ms": pause_from_events(events),
        "precopy_ms": (t_switch - t0) * 1000.0,
        "parent_total_ms": (t_parent - t0) * 1000.0,
        "state_save_ms": (t_state - t_parent) * 1000.0,
    }


async def raise_migration_failure(parent: QemuProcess, receiver: QemuProcess, what: str, status: str):
    """A failed checkpoint migration: QEMU's reason and the receiver's logs, in one error."""
    info = await parent.execute("query-migrate")
    raise CheckpointError(f"VM {parent.name}: {what} {status}: {info.get('error-desc', 'no reason given')}"
                          f"{receiver.failure_report()}")


async def resume_after_migration(vm: QemuProcess, timeout: float = 10.0) -> None:
    """`cont` once QEMU has left finish-migrate. The MIGRATION "completed" event
    comes a moment before the run state moves on, and a `cont` in between fails
    with "Migration is not finalized yet" (seen once in a benchmark run of 54
    checkpoints). Retried rather than polled first: a round trip more would be
    pause in the common case."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await vm.execute("cont")
            return
        except QemuError as exc:
            if "not finalized" not in str(exc) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.002)


async def abort_migration(vm: QemuProcess, was_running: bool) -> None:
    """Leave the parent as it was: no migration in flight, running if it ran."""
    with contextlib.suppress(Exception):
        await vm.execute("migrate_cancel", timeout=10)
    if was_running:
        with contextlib.suppress(Exception):
            if await vm.status() != "running":
                await vm.execute("cont", timeout=10)


async def _precopy(parent, receiver, receiver_uri, listener, rx_listener, events,
                   disk: DiskFreeze, was_running) -> float:
    t_switch = time.monotonic()
    with parent.listening(listener), receiver.listening(rx_listener):
        await parent.execute("migrate", {"uri": receiver_uri})
        while True:
            ev = await parent.next_event(listener, 300.0)
            events.append(ev)
            if ev["event"] != "MIGRATION":
                continue
            status = ev["data"]["status"]
            if status == "pre-switchover":
                # The parent is stopped: its disk now matches the RAM being sent.
                t_switch = time.monotonic()
                # Sent together: QMP runs them in order, and the round trip saved
                # is pause saved. A failed freeze fails the checkpoint below.
                await asyncio.gather(
                    disk.freeze(), parent.execute("migrate-continue", {"state": "pre-switchover"}))
            elif status == "completed":
                if was_running:
                    await resume_after_migration(parent)
                break
            elif status in ("failed", "cancelled"):
                await raise_migration_failure(parent, receiver, "pre-copy", status)
        if was_running:
            while not any(e["event"] == "RESUME" for e in events):
                events.append(await parent.next_event(listener, 10.0))
        await receiver.wait_migration(rx_listener, {"completed"}, 60.0)
    return t_switch


async def capture_background(parent: QemuProcess, receiver: QemuProcess, receiver_uri: str,
                             disk: DiskFreeze, state_file: Path) -> dict:
    """Background snapshot into `receiver`: a short stop, then RAM streams while the parent runs.

    QEMU's `background-snapshot` write-protects guest RAM with userfaultfd and
    sends each page's content as of the stop, copying a page before the guest may
    write it. Unlike pre-copy it does not depend on dirty-page tracking, which
    under TCG loses writes the guest kernel makes while loading modules (measured:
    pre-copy checkpoints taken then panicked or hung 7 clones of 9).

    We stop the parent and freeze its disk ourselves, then `migrate`: QEMU saves
    the device state, arms the write protection and restarts the VM by itself
    (QEMU 7.2 always restarts it). The first such checkpoint of a VM populates its
    whole RAM file (QEMU pre-faults RAM to write-protect it).
    """
    t0 = time.monotonic()
    was_running = await parent.status() == "running"
    await set_capabilities(parent, events=True, x_ignore_shared=False, pause_before_switchover=False,
                           background_snapshot=True)
    await parent.execute("migrate-set-parameters", {"max-bandwidth": LOCAL_BANDWIDTH})
    rx_listener = receiver.listen("MIGRATION")
    listener = parent.listen("MIGRATION", "STOP", "RESUME")
    events: list = []
    try:
        await disk.prepare()
        with parent.listening(listener), receiver.listening(rx_listener):
            # Sent together: QMP runs them in order, and every round trip here is pause.
            stop = [parent.execute("stop")] if was_running else []
            await asyncio.gather(*stop, disk.freeze(), parent.execute("migrate", {"uri": receiver_uri}))
            while True:
                ev = await parent.next_event(listener, 300.0)
                events.append(ev)
                if ev["event"] == "MIGRATION":
                    status = ev["data"]["status"]
                    if status == "completed":
                        break
                    if status in ("failed", "cancelled"):
                        await raise_migration_failure(parent, receiver, "background snapshot", status)
            while not any(e["event"] == "RESUME" for e in events):
                events.append(await parent.next_event(listener, 10.0))
            if not was_running:
                await parent.execute("stop")  # QEMU restarted a VM the user had paused
            await receiver.wait_migration(rx_listener, {"completed"}, 60.0)
    except BaseException:
        await abort_migration(parent, was_running)
        await disk.undo()
        raise
    finally:
        with contextlib.suppress(Exception):
            await set_capabilities(parent, background_snapshot=False)
    t_parent = time.monotonic()
    await save_device_state(receiver, state_file)
    return {
        "pause_ms": pause_from_events(events),
        "stream_ms": (t_parent - t0) * 1000.0,
        "state_save_ms": (time.monotonic() - t_parent) * 1000.0,
    }


async def capture_paused(parent: QemuProcess, parent_ram: str, ram_file: Path,
                         disk: DiskFreeze, state_file: Path, copy) -> dict:
    """Fallback: everything while the parent is stopped (pause grows with touched RAM).

    `copy(src, dst)` is an async sparse copy (sparse_copy).
    The RAM copy must be taken while stopped: a copy taken after `cont` did not load
    (docs/platform.md: `VQ 0 size 0x100 < last_avail_idx`).
    """
    t0 = time.monotonic()
    was_running = await parent.status() == "running"
    listener = parent.listen("STOP", "RESUME")
    events = []
    await disk.prepare()
    with parent.listening(listener):
        if was_running:
            await parent.execute("stop")
        try:
            crashpoints.reached("checkpoint:paused")
            await save_device_state(parent, state_file)
            t_state = time.monotonic()
            await copy(parent_ram, str(ram_file))
            t_copy = time.monotonic()
            await disk.freeze()
        except BaseException:
            await disk.undo()
            raise
        finally:
            try:
                await set_capabilities(parent, x_ignore_shared=False)
            finally:  # the parent runs on whatever failed above
                if was_running:
                    await resume_after_migration(parent)
        while was_running and not any(e["event"] == "RESUME" for e in events):
            events.append(await parent.next_event(listener, 10.0))
    return {
        "pause_ms": pause_from_events(events),
        "state_save_ms": (t_state - t0) * 1000.0,
        "ram_copy_ms": (t_copy - t_state) * 1000.0,
        "parent_total_ms": (time.monotonic() - t0) * 1000.0,
    }
