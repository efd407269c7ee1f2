"""What checkpoints and disk layers are kept, and for how long.

- A checkpoint taken by a guest's clone() belongs to its ticket and is freed
  when the ticket ends (joined, killed, failed) and no VM runs from it any
  more; one taken by checkpoint_parent() or `sfmpi checkpoint` stays until
  `sfmpi checkpoint rm`, or until `--keep N` drops the VM's older ones.
- A disk layer (hostd/fork/disks.py) is needed while a VM or a checkpoint has it
  in its chain; when the last one lets go it is deleted. Layers are only ever
  deleted after something let go of them (candidates), so a layer being
  created by a checkpoint in flight is never taken; after a restart, when
  nothing is in flight, every layer no record explains goes.
- A long-lived parent's chain grows by one layer per checkpoint: past
  CHAIN_BOUND layers, QEMU streams them into the active layer while the guest
  runs (block-stream), and the parent's chain is image + one layer again.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from pathlib import Path

from sfmpi.errors import NotFound, UsageError
from sfmpi.paths import Paths

from ..state.records import VmRecord, VmRole
from ..state.store import Store
from ..vm.registry import VmRegistry
from .disks import stream_into_top

log = logging.getLogger("sfmpi.hostd.retention")

CHAIN_BOUND = int(os.environ.get("SFMPI_CHAIN_BOUND", "8"))


def checkpoint_layers(path: str | Path) -> list[str]:
    """The disk files a checkpoint directory's manifest names (absolute), without verifying it."""
    try:
        d = json.loads((Path(path) / "manifest.json").read_text())
        files = [d["disk"], *d.get("disk_chain", [])]
        return [os.path.normpath(os.path.join(path, f)) for f in files if isinstance(f, str)]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def dir_bytes(path: Path) -> int:
    """Bytes a directory really takes on disk (sparse files count what they hold)."""
    total = 0
    for f in path.rglob("*"):
        try:
            total += f.stat().st_blocks * 512
        except OSError:
            pass
    return total


class Retention:
    def __init__(self, paths: Paths, store: Store, vms: VmRegistry):
        self.paths = paths
        self.store = store
        self.vms = vms
        self._doomed: set[str] = set()    # checkpoints to free once no VM runs from them

    # -- what holds what -------------------------------------------------
    def _users(self, ckpt_id: str) -> list[str]:
        return [r.name for r in self.vms.records() if r.checkpoint == ckpt_id]

    def needed_layers(self) -> set[str]:
        needed: set[str] = set()
        for r in self.vms.records():
            needed.update(p for p in (r.overlay, *r.backing) if p)
        for row in self.store.checkpoint_rows():
            needed.update(checkpoint_layers(row["path"]))
        return {os.path.normpath(p) for p in needed}

    def _ours(self, layer: str) -> bool:
        """Only files in our disks directory are ever deleted (never the image)."""
        return Path(layer).parent == self.paths.disks and layer.endswith(".qcow2")

    def collect_layers(self, candidates: set[str] | None = None) -> list[str]:
        """Delete candidate layers (all of ours when None: only with nothing in flight) that nothing needs."""
        if candidates is None:
            candidates = {str(p) for p in self.paths.disks.glob("*.qcow2")}
        needed = self.needed_layers()
        freed = []
        for layer in sorted(c for c in candidates if self._ours(c) and c not in needed):
            try:
                os.unlink(layer)
                freed.append(layer)
            except FileNotFoundError:
                pass
        if freed:
            log.info("freed disk layers: %s", ", ".join(Path(f).name for f in freed))
        return freed

    # -- listing and removal -----------------------------------------------
    def list(self) -> list[dict]:
        out = []
        for row in self.store.checkpoint_rows():
            path = Path(row["path"])
            out.append({**row, "used_by": self._users(row["id"]), "bytes": dir_bytes(path) if path.exists() else 0,
                        "present": path.exists()})
        return out

    def remove(self, ckpt_id: str) -> dict:
        path = self.store.checkpoint_path(ckpt_id) if isinstance(ckpt_id, str) else None
        if path is None:
            raise NotFound(f"no checkpoint {ckpt_id!r} (see `sfmpi checkpoint ls`)")
        users = self._users(ckpt_id)
        if users:
            raise UsageError(f"checkpoint {ckpt_id} is in use by VM(s) {', '.join(users)}: stop them first")
        return self._remove(ckpt_id, path)

    def _remove(self, ckpt_id: str, path: str) -> dict:
        layers = set(checkpoint_layers(path))
        freed_bytes = dir_bytes(Path(path)) if Path(path).exists() else 0
        self.store.delete_checkpoint(ckpt_id)
        shutil.rmtree(path, ignore_errors=True)
        self._doomed.discard(ckpt_id)
        freed = self.collect_layers(layers)
        log.info("checkpoint %s removed", ckpt_id)
        return {"id": ckpt_id, "freed_layers": [Path(f).name for f in freed], "freed_bytes": freed_bytes}

    # -- rules -----------------------------------------------------------
    def ticket_ended(self, ticket: str) -> None:
        for row in self.store.checkpoint_rows():
            if row["ticket"] == ticket and not row["kept"]:
                self._doomed.add(row["id"])
        self._soon(self._free_doomed)

    def vm_gone(self, rec: VmRecord, _reason: str) -> None:
        # Its record is deleted right after this event: look once it is.
        layers = set(rec.backing)
        self._soon(lambda: (self._free_doomed(), self.collect_layers(layers)))

    def _soon(self, fn) -> None:
        try:
            asyncio.get_running_loop().call_soon(fn)
        except RuntimeError:  # no loop (unit tests): now
            fn()

    def _free_doomed(self) -> None:
        for ckpt_id in sorted(self._doomed):
            path = self.store.checkpoint_path(ckpt_id)
            if path is None:
                self._doomed.discard(ckpt_id)
            elif not self._users(ckpt_id):
                self._remove(ckpt_id, path)

    def keep_newest(self, vm: str, keep: int) -> list[str]:
        """--keep N: the VM's N newest checkpoints stay (and any a VM runs from)."""
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise UsageError(f"--keep must be at least 1 (got {keep!r})")
        mine = [r for r in self.store.checkpoint_rows() if r["vm"] == vm and r["kept"]]
        removed = []
        for row in mine[:-keep]:
            if not self._users(row["id"]):
                self._remove(row["id"], row["path"])
                removed.append(row["id"])
        return removed

    async def bound_chain(self, name: str) -> bool:
        """Merge a parent's old layers into its active one when its chain is past CHAIN_BOUND."""
        vm = self.vms.find(name)
        if vm is None or vm.rec.role != VmRole.PARENT or len(vm.rec.backing) <= CHAIN_BOUND:
            return False
        base = vm.rec.backing[-1]   # the image
        old = set(vm.rec.backing)
        async with vm.lock:
            await stream_into_top(vm.qemu, base)
            self.vms.update(vm, backing=(base,))
        self.collect_layers(old)
        return True

    def recover(self, live_tickets: set[str]) -> None:
        """After a restart: tickets that did not survive free their checkpoints;
        checkpoint directories the store does not know (a crash before they were
        indexed: nobody got their id) and layers nothing needs are deleted."""
        known = {row["path"] for row in self.store.checkpoint_rows()}
        for d in self.paths.checkpoints.iterdir() if self.paths.checkpoints.exists() else ():
            if d.is_dir() and not d.name.startswith(".") and str(d) not in known:
                log.warning("checkpoint directory %s is not indexed (hostd died while taking it): removing", d)
                shutil.rmtree(d, ignore_errors=True)
        for row in self.store.checkpoint_rows():
            if row["ticket"] and not row["kept"] and row["ticket"] not in live_tickets:
                self._doomed.add(row["id"])
        self._free_doomed()
        self.collect_layers()

