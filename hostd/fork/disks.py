"""A VM's qcow2 chain: freezing the active layer at a checkpoint, clone overlays, the chain itself.

A parent writes to one layer on top of the image; each checkpoint freezes that
layer (it becomes the checkpoint's disk) and moves the parent to a new layer on
top. Clones get their own overlay (a copy of the checkpoint's template).
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from sfmpi import proc
from sfmpi.errors import CheckpointError, QemuError

from ..vm.cmdline import DISK_NODE, overlay_argv
from ..vm.qemu import QemuProcess


async def make_overlay_template(path: Path, frozen_disk: str) -> None:
    partial = path.with_name(path.name + ".partial")
    await proc.run_async(overlay_argv(str(partial), frozen_disk))
    os.rename(partial, path)



async def top_disk(vm: QemuProcess) -> tuple[str, str]:
    """(node name, file) the guest disk currently writes to (changes at each snapshot)."""
    for dev in await vm.execute("query-block"):
        # qdev is a QOM path such as /machine/peripheral/vblk0/virtio-backend
        if vm.disk_device in dev.get("qdev", "").split("/"):
            return dev["inserted"]["node-name"], dev["inserted"]["file"]
    raise CheckpointError(f"VM {vm.name}: no disk device {vm.disk_device}")


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




async def backing_chain(layer: str) -> list[str]:
    """The files below `layer`, nearest first (qemu-img reads the headers)."""
    _, out, _ = await proc.run_async(["qemu-img", "info", "-U", "--backing-chain", "--output=json", layer])
    return [entry["filename"] for entry in json.loads(out)][1:]


async def drop_detached_nodes(vm: QemuProcess) -> list[str]:
    """Delete the block nodes hostd made (the command line's -blockdev, each
    checkpoint's blockdev-add) that no chain uses any more.

    A node made that way belongs to the monitor: block-stream takes the merged
    layers out of the chain, but QEMU keeps them open until blockdev-del, so
    each checkpoint left an open file (of a layer already deleted: its disk
    space never came back) and a node in the graph, and every later snapshot
    got slower (a 1,000-cycle soak: the checkpoint step 7.8x slower at the
    end). A node still in use refuses blockdev-del; that refusal is the test."""
    top, _ = await top_disk(vm)
    nodes = [n["node-name"] for n in await vm.execute("query-named-block-nodes", {"flat": True})]
    ours = [n for n in dict.fromkeys(nodes) if n.startswith(DISK_NODE) and n != top]
    dropped = []
    # A format node before the file node under it (disk0 before disk0-file).
    for node in sorted(ours, key=lambda n: n.endswith("-file")):
        try:
            await vm.execute("blockdev-del", {"node-name": node}, timeout=10)
            dropped.append(node)
        except QemuError:
            pass            # in use: part of the chain
    return dropped


async def stream_into_top(vm: QemuProcess, base: str, timeout: float = 600.0) -> None:
    """Copy every layer between the active one and `base` into the active layer
    (QEMU's block-stream job, while the guest runs), so the VM's chain becomes
    active -> base: how a long-lived parent's chain stays short."""
    node, _ = await top_disk(vm)
    job = f"stream-{node}"
    listener = vm.listen("BLOCK_JOB_COMPLETED", "BLOCK_JOB_ERROR")
    with vm.listening(listener):
        await vm.execute("block-stream", {"job-id": job, "device": node, "base": base})
        while True:
            ev = await vm.next_event(listener, timeout)
            if ev.get("data", {}).get("device") != job:
                continue
            if ev["event"] == "BLOCK_JOB_ERROR" or ev["data"].get("error"):
                raise CheckpointError(f"VM {vm.name}: merging disk layers failed: "
                                      f"{ev['data'].get('error', ev['data'])}")
            break
    await drop_detached_nodes(vm)
