"""Checkpoints (SnowFlock's VM descriptor): an immutable directory with a manifest.

    <home>/checkpoints/<id>/
        manifest.json   what is below, sizes, checksum of the device state
        state           device state saved with x-ignore-shared (about 1 MB)
        ram             guest RAM, sparse: holes are zero pages
    and the frozen disk layer, <home>/disks/<layer>.qcow2, named in the manifest
    with the rest of its backing chain.

Two ways to take one, both leaving the parent running on a new disk overlay:
- precopy (default): live pre-copy into a local receiver QEMU whose RAM is the
  checkpoint file; the parent pauses only for the switchover (PLATFORM.md: 15 ms).
- paused (fallback): stop the parent, save device state, copy its RAM file
  sparsely, freeze the disk, continue. The pause grows with touched RAM.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sfmpi import proc
from sfmpi.errors import CheckpointError, QemuError

from .qemu import QemuProcess
from .qemu_cmdline import DISK_DEVICE, MachineSpec, overlay_argv

FORMAT = "sfmpi-checkpoint"
VERSION = 1
MODES = ("background", "precopy", "paused")
# Local pre-copy: no reason to throttle a copy that never leaves the host
# (QEMU's default max-bandwidth is 128 MiB/s).
LOCAL_BANDWIDTH = 8 << 30
DOWNTIME_LIMIT_MS = 20
# An empty qcow2 overlay on the frozen disk; each clone starts on a copy of it.
OVERLAY_TEMPLATE = "overlay.qcow2"


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


async def make_overlay_template(path: Path, frozen_disk: str) -> None:
    partial = path.with_name(path.name + ".partial")
    await proc.run_async(overlay_argv(str(partial), frozen_disk))
    os.rename(partial, path)


@dataclass(frozen=True)
class Checkpoint:
    id: str
    vm: str
    path: str                 # the checkpoint directory
    machine: dict             # MachineSpec.to_json()
    disk: str                 # frozen top layer (qcow2); clones put overlays on it
    disk_chain: tuple[str, ...]
    state_sha256: str
    state_size: int
    ram_size: int
    ram_allocated: int
    mode: str
    pause_ms: float
    qemu_version: str
    created: float = field(default_factory=time.time)
    timings: dict = field(default_factory=dict)
    # The family (named after its parent VM) whose network the clones join.
    family: str = ""
    # Taken by checkpoint_parent() in the guest: the id of that pending call,
    # which clones created from this checkpoint are answered on.
    guest_req: int | None = None

    @property
    def state_file(self) -> Path:
        return Path(self.path) / "state"

    @property
    def ram_file(self) -> Path:
        return Path(self.path) / "ram"

    @property
    def spec(self) -> MachineSpec:
        return MachineSpec.from_json(self.machine)

    def to_json(self) -> dict:
        d = asdict(self)
        d["disk_chain"] = list(self.disk_chain)
        return {"format": FORMAT, "version": VERSION, **d}

    def write(self, directory: str | Path | None = None) -> None:
        """Write the manifest atomically (into `directory` while it is still being built)."""
        manifest = Path(directory or self.path) / "manifest.json"
        tmp = manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, manifest)

    @classmethod
    def load(cls, path: str | Path) -> "Checkpoint":
        """Read and verify a checkpoint; CheckpointError says what is wrong."""
        path = Path(path)
        manifest = path / "manifest.json"
        if not manifest.exists():
            raise CheckpointError(f"checkpoint {path.name}: no manifest at {manifest}")
        try:
            d = json.loads(manifest.read_text())
            if not isinstance(d, dict):
                raise TypeError("not a JSON object")
            if d.get("format") != FORMAT or d.get("version") != VERSION:
                raise CheckpointError(f"checkpoint {path.name}: not a {FORMAT} v{VERSION} manifest")
            fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
            fields["disk_chain"] = tuple(fields.get("disk_chain", ()))
            ckpt = cls(**fields)
            MachineSpec.from_json(ckpt.machine)
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint {path.name}: manifest is corrupt ({exc})") from exc
        ckpt.verify()
        return ckpt

    def verify(self) -> None:
        name = self.id
        for f in (self.state_file, self.ram_file, Path(self.disk), *map(Path, self.disk_chain)):
            if not f.exists():
                raise CheckpointError(f"checkpoint {name}: {f} is missing")
        if self.state_file.stat().st_size != self.state_size:
            raise CheckpointError(f"checkpoint {name}: device state has the wrong size")
        if sha256_file(self.state_file) != self.state_sha256:
            raise CheckpointError(f"checkpoint {name}: device state checksum does not match")
        if self.ram_file.stat().st_size != self.ram_size:
            raise CheckpointError(f"checkpoint {name}: RAM file has the wrong size")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


async def top_disk(vm: QemuProcess) -> tuple[str, str]:
    """(node name, file) the guest disk currently writes to (changes at each snapshot)."""
    for dev in await vm.execute("query-block"):
        # qdev is a QOM path such as /machine/peripheral/vblk0/virtio-backend
        if DISK_DEVICE in dev.get("qdev", "").split("/"):
            return dev["inserted"]["node-name"], dev["inserted"]["file"]
    raise CheckpointError(f"VM {vm.name}: no disk device {DISK_DEVICE}")


class DiskFreeze:
    """Freezing the disk in two steps, so that the parent's pause holds only the cheap one.

    prepare() (parent running): create the new overlay file and open it in QEMU
    with no backing yet. freeze() (parent stopped): `blockdev-snapshot` makes it
    the active layer on top of the old one, a change of the block graph only;
    `blockdev-snapshot-sync` would create and write the qcow2 file while paused.
    """

    def __init__(self, vm: QemuProcess, new_layer: str, node_name: str):
        self.vm, self.new_layer, self.node = vm, new_layer, node_name
        self.top = ""
        self.frozen_file = ""
        self.added = self.done = False

    async def prepare(self) -> None:
        self.top, self.frozen_file = await top_disk(self.vm)
        # The backing file name goes into the header so later opens find the chain.
        await proc.run_async(overlay_argv(self.new_layer, self.frozen_file))
        await self.vm.execute("blockdev-add", {
            "driver": "qcow2", "node-name": self.node, "backing": None,
            "file": {"driver": "file", "filename": self.new_layer}})
        self.added = True

    async def freeze(self) -> None:
        await self.vm.execute("blockdev-snapshot", {"node": self.top, "overlay": self.node})
        self.done = True

    async def undo(self) -> None:
        """Before freeze(): drop the prepared overlay again."""
        if self.added and not self.done:
            with contextlib.suppress(Exception):
                await self.vm.execute("blockdev-del", {"node-name": self.node}, timeout=10)


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
    (PLATFORM.md: `VQ 0 size 0x100 < last_avail_idx`).
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
            await save_device_state(parent, state_file)
            t_state = time.monotonic()
            await copy(parent_ram, str(ram_file))
            t_copy = time.monotonic()
            await disk.freeze()
        except BaseException:
            await disk.undo()
            raise
        finally:
            await set_capabilities(parent, x_ignore_shared=False)
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
