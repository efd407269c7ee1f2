"""Served memory: clones whose RAM is a remote checkpoint's, fetched lazily.

For a served clone hostd needs, per checkpoint, the page map of its non-zero
pages (made once, next to the checkpoint: ram.map), the checkpoint on a
memory server with a fresh token, and a memtap mounting it; the clone's QEMU
then maps memtap's file privately instead of the local RAM file. Clones of
one checkpoint share one memtap (and the page cache of its file); when the
last of them is gone, memtap stops and the server forgets the checkpoint.

A clone whose memory cannot be fetched (the server died or stalls, memtap
died) gets SIGBUS from the kernel on its next fault of an uncached page and
dies: explain() says why, for its record and the error the user sees.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from sfmpi.errors import LazyMemoryError
from sfmpi.native import load as load_native

from ..fork.manifest import Checkpoint
from ..state.records import VmRecord
from .daemons import Memtap, MemoryServer, Multicast, Wrap, detach
from .farside import NEAR_IP, FarSide
from .options import ServedOptions

log = logging.getLogger("sfmpi.hostd.memory")

MEMORY_MODES = ("local", "served")
PAGE_MAP = "ram.map"
# How long memtap waits for one reply: a stalled server fails the fault (and
# its clone) after this, never hangs it.
FETCH_TIMEOUT_MS = int(os.environ.get("SFMPI_FETCH_TIMEOUT_MS", "10000"))
# The kernel's read-ahead on memtap's file: what one fault brings in beyond its
# page. Measured on one clone's start and one command: 0 fetched 15 MiB of a
# 512 MiB guest, 128 KiB fetched 69 MiB; a round trip per 4 KiB page is the
# price (the multicast and prefetch issue brings pages ahead of faults).
READ_AHEAD_KB = int(os.environ.get("SFMPI_MEMTAP_READ_AHEAD_KB", "0"))
WORKING_SET = "ram.ws"


def prefetch_enabled() -> bool:
    """Working-set prefetch: on unless SFMPI_PREFETCH=0."""
    return os.environ.get("SFMPI_PREFETCH", "1") != "0"


def multicast_enabled() -> bool:
    """Multicast distribution (docs/memory.md): on unless SFMPI_MULTICAST=0,
    which a network without multicast needs (hostd --no-multicast sets it)."""
    return os.environ.get("SFMPI_MULTICAST", "1") != "0"


def group_of(checkpoint: str) -> str:
    """The checkpoint's multicast group ADDRESS:PORT, the same on every host: in
    239.255/16 (organisation-local scope), port 20000-39999. Two checkpoints
    that share one only cost each other's receivers MAC checks (their keys differ)."""
    h = hashlib.sha256(checkpoint.encode()).digest()
    return f"239.255.{h[0]}.{h[1] or 1}:{20000 + int.from_bytes(h[2:4], 'big') % 20000}"


def check_group(text: object) -> str:
    """A group from another host's descriptor: 239.255.X.Y:PORT, or LazyMemoryError."""
    import ipaddress
    host, sep, port = str(text).rpartition(":")
    try:
        ok = sep and port.isdigit() and 0 < int(port) < 65536 and \
            ipaddress.IPv4Address(host) in ipaddress.IPv4Network("239.255.0.0/16")
    except ValueError:
        ok = False
    if not ok:
        raise LazyMemoryError(f"not a multicast group of sfmpi: {str(text)[:60]!r}")
    return str(text)


def page_map_of(ckpt: Checkpoint) -> Path:
    """The checkpoint's map of non-zero pages, made on first use (a C scan:
    holes skipped, data pages compared with zero)."""
    path = Path(ckpt.path) / PAGE_MAP
    if not path.exists():
        tmp = path.with_name(f".{PAGE_MAP}.tmp")
        pages = load_native().scan(str(ckpt.ram_file), str(tmp))
        os.replace(tmp, path)
        log.info("checkpoint %s: %d pages with data of %d", ckpt.id, pages, ckpt.ram_file.stat().st_size // 4096)
    return path


@dataclass
class Served:
    checkpoint: str
    memtap: Memtap | None          # None: served to other hosts only (export)
    users: set[str] = field(default_factory=set)
    token: str = ""
    remote: bool = False           # a memtap of another host's server (ram_from)


def _unwrapped(argv: list[str]) -> list[str]:
    return argv


class ServedMemory:
    """ram_for(ckpt, clones) / export(ckpt, users) / ram_from(...) / release(name) /
    vm_gone(rec) / explain(rec) / stats() / down().

    Alone on a machine, the memory server runs on the far side (farside.py) and
    memtap in hostd's families' namespace. In a cluster (`listen` = this host's
    address on the hosts' network) both run in hostd's own namespace: the
    server where every host's memtap can reach it, memtap where it reaches any
    host's server; FUSE mounts do not care about network namespaces."""

    def __init__(self, directory: Path, far: FarSide | None, near_wrap: Wrap, listen: str | None = None,
                 multicast: bool | None = None):
        self.dir = Path(directory)
        self.far = far
        self.listen = listen
        self.multicast = multicast_enabled() if multicast is None else multicast
        self.local = listen if listen is not None else NEAR_IP   # where this host's memtaps join groups
        self.working_sets: dict[str, tuple[Path, str]] = {}   # checkpoint -> (its working set's path, its VM)
        # VM -> the working set saved last for one of its checkpoints: a parent
        # that forks again and again (sfmpirun in a loop) makes a new
        # checkpoint each time, and its last one's faults predict the next's.
        self.last_working_set: dict[str, Path] = {}
        self.prefetch = prefetch_enabled()
        self.near_wrap = near_wrap if listen is None else _unwrapped
        self.server: MemoryServer | None = None
        self.served: dict[str, Served] = {}      # checkpoint -> this host's memtap of it
        self.exported: dict[str, Served] = {}    # checkpoint -> served to other hosts' memtaps
        self._deaths: dict[str, str] = {}     # clone -> why its memory failed, once it is gone
        self._lock = asyncio.Lock()

    async def ram_for(self, ckpt: Checkpoint, clones: list[str], opts: ServedOptions = ServedOptions()) -> str:
        """The file the clones map: memtap's, for this checkpoint."""
        async with self._lock:
            s = self.served.get(ckpt.id)
            if s is not None and not s.memtap.alive():
                await asyncio.to_thread(self._retire, s)
                s = None
            if s is None:
                s = await asyncio.to_thread(self._serve, ckpt, opts)
                self.served[ckpt.id] = s
            s.users.update(clones)
            return str(s.memtap.ram)

    def _server(self) -> MemoryServer:
        if self.server is None or not self.server.alive():
            if self.server is not None:
                self.server.stop()
            if self.listen is not None:
                server = MemoryServer(self.dir / "server", _unwrapped)
                server.start(self.listen, multicast=self.multicast)
            else:
                assert self.far is not None
                self.far.ensure()
                server = MemoryServer(self.dir / "server", self.far.wrap)
                server.start(self.far.server_ip, multicast=self.multicast)
            self.server = server
        return self.server

    def _multicast(self, group: str | None, opts: ServedOptions) -> Multicast | None:
        return Multicast(group, self.local) if self.multicast and opts.multicast and group else None

    def _serve(self, ckpt: Checkpoint, opts: ServedOptions) -> Served:
        page_map, server, token = self._export(ckpt)
        memtap = Memtap(self.dir / "memtap" / ckpt.id, self.near_wrap, ckpt.id)
        try:
            memtap.start(server.address, server.port, token, page_map, FETCH_TIMEOUT_MS, READ_AHEAD_KB,
                         self._multicast(group_of(ckpt.id), opts), opts.push, self.working_set_for(ckpt))
        except BaseException:
            server.remove(ckpt.id)
            raise
        return Served(ckpt.id, memtap, token=token)

    def _export(self, ckpt: Checkpoint) -> tuple[Path, MemoryServer, str]:
        page_map = page_map_of(ckpt)
        server = self._server()
        token = secrets.token_hex(32)
        try:
            server.remove(ckpt.id)            # a memtap that died left it there
        except LazyMemoryError:
            pass
        server.add(ckpt.id, token, ckpt.ram_file, page_map, group_of(ckpt.id) if self.multicast else None)
        self.working_sets[ckpt.id] = (Path(ckpt.path) / WORKING_SET, ckpt.vm)
        return page_map, server, token

    def working_set_for(self, ckpt: Checkpoint) -> Path | None:
        """What a fork's memtaps ask for first: the checkpoint's recorded working
        set, else the last one of its VM's checkpoints (same RAM size; memtap
        checks), else none."""
        if not self.prefetch:
            return None
        own = Path(ckpt.path) / WORKING_SET
        if own.exists():
            return own
        last = self.last_working_set.get(ckpt.vm)
        return last if last is not None and last.exists() else None

    def _forget(self, checkpoint: str) -> None:
        """The server stops serving a checkpoint. What its clones faulted is kept
        first, as its working set, if it has none yet: the first clones' faults
        are what a later fork's memtaps ask for before their clones do."""
        if self.server is None or not self.server.alive():
            return
        path, vm = self.working_sets.pop(checkpoint, (None, ""))
        try:
            if path is not None and path.parent.is_dir() and not path.exists():
                if self.server.save_working_set(checkpoint, path) == 0:
                    path.unlink(missing_ok=True)     # nothing faulted: the next fork records
                else:
                    self.last_working_set[vm] = path
            self.server.remove(checkpoint)
        except LazyMemoryError as exc:
            log.warning("checkpoint %s: %s", checkpoint, exc)

    # -- across hosts ------------------------------------------------------
    async def export(self, ckpt: Checkpoint, users: list[str]) -> dict:
        """Serve a checkpoint to memtaps on other hosts, for clones `users`
        (it stays served until release() let go of the last of them): where the
        server is, the token, and the page map a clone host needs."""
        async with self._lock:
            s = self.exported.get(ckpt.id)
            if s is None or self.server is None or not self.server.alive():
                page_map, server, token = await asyncio.to_thread(self._export, ckpt)
                s = self.exported[ckpt.id] = Served(ckpt.id, None, token=token)
            s.users.update(users)
            assert self.server is not None
            recorded = self.working_set_for(ckpt)
            return {"address": self.server.address, "port": self.server.port, "token": s.token,
                    "page_map": str(page_map_of(ckpt)), "group": group_of(ckpt.id) if self.multicast else None,
                    "working_set": str(recorded) if recorded else None}

    async def ram_from(self, ckpt_id: str, address: str, port: int, token: str, page_map: Path,
                       clones: list[str], group: str | None = None, opts: ServedOptions = ServedOptions(),
                       working_set: Path | None = None) -> str:
        """On a clone host: the file clones map, from another host's memory server
        (and its multicast group, unless this host has multicast off)."""
        async with self._lock:
            s = self.served.get(ckpt_id)
            if s is not None and s.memtap.alive() and s.token != token:
                # A new token means the parent's host serves the checkpoint
                # afresh (its memory server was restarted): this memtap's
                # server is gone, and so is every fetch its clones could make.
                log.warning("checkpoint %s is served anew from %s:%d; its old memtap goes (clones %s)",
                            ckpt_id, address, port, ", ".join(sorted(s.users)) or "none")
                await asyncio.to_thread(s.memtap.stop)
            if s is not None and not s.memtap.alive():
                await asyncio.to_thread(self._retire, s)
                s = None
            if s is None:
                memtap = Memtap(self.dir / "memtap" / ckpt_id, self.near_wrap, ckpt_id)
                await asyncio.to_thread(memtap.start, address, port, token, page_map, FETCH_TIMEOUT_MS,
                                        READ_AHEAD_KB, self._multicast(group, opts), opts.push, working_set)
                s = self.served[ckpt_id] = Served(ckpt_id, memtap, token=token, remote=True)
            s.users.update(clones)
            return str(s.memtap.ram)

    def release(self, name: str) -> None:
        """A clone on another host ended: the checkpoint it used may stop being served."""
        for key, s in list(self.exported.items()):
            s.users.discard(name)
            if not s.users:
                del self.exported[key]
                if key not in self.served:
                    self._forget(key)

    def _retire(self, s: Served) -> None:
        if s.memtap is not None:
            s.memtap.stop()
        if s.remote or s.checkpoint in self.exported:
            return                            # not ours to forget, or still wanted elsewhere
        self._forget(s.checkpoint)

    def vm_gone(self, rec: VmRecord, _reason: str = "") -> None:
        """A clone ended: the last of a checkpoint's clones takes its memtap along."""
        for key, s in list(self.served.items()):
            if rec.name in s.users:
                why = s.memtap.why_failed()
                if why:   # for an error reported after this (the exec that saw the clone die)
                    self._deaths[rec.name] = why
                    while len(self._deaths) > 256:
                        self._deaths.pop(next(iter(self._deaths)))
                s.users.discard(rec.name)
                if not s.users:
                    del self.served[key]
                    asyncio.get_running_loop().run_in_executor(None, self._retire, s)

    def explain(self, rec: VmRecord) -> str:
        """Why a served clone died, if its memory is the reason; else ''."""
        why = self._deaths.get(rec.name, "")
        for s in self.served.values():
            if rec.name in s.users:
                why = s.memtap.why_failed() or why
        return f"its memory could not be fetched: {why}" if why else ""

    def stats(self) -> dict:
        out: dict = {"server": None, "memtaps": []}
        if self.server is not None:
            slots = self.server.counters()
            out["server"] = {"address": f"{self.server.address}:{self.server.port}", "alive": self.server.alive(),
                             "pid": self.server.pid,
                             "totals": next((s.fields for s in slots if s.id == "*"), {}),
                             "checkpoints": {s.id: s.fields for s in slots if s.id != "*"}}
        for s in self.served.values():
            for slot in s.memtap.counters():
                out["memtaps"].append({"checkpoint": s.checkpoint, "alive": s.memtap.alive(), "pid": s.memtap.pid,
                                       "clones": sorted(s.users), **slot.fields,
                                       "fetch_p50_us": slot.latency_quantile_us(0.5),
                                       "fetch_p99_us": slot.latency_quantile_us(0.99),
                                       "latency_hist": list(slot.latency_hist)})
        return out

    def down(self) -> None:
        """Stop every memtap and the server, delete the far side."""
        for s in list(self.served.values()):
            self._retire(s)
        self.served.clear()
        self.exported.clear()
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.far.delete()
        sweep_leftovers(self.dir)


def sweep_leftovers(directory: Path) -> None:
    """What an earlier hostd of this state directory left: its memory daemons
    (known by their command line, which names this directory) and mounts."""
    import psutil
    mine = [p for p in psutil.process_iter(["cmdline"])
            if any(m in (p.info["cmdline"] or []) for m in ("sfmpi.native.memserver", "sfmpi.native.memtap"))
            and any(str(directory) in a for a in p.info["cmdline"] or [])]
    for p in mine:
        log.warning("stopping a memory daemon %d an earlier hostd left", p.pid)
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _gone, alive = psutil.wait_procs(mine, timeout=5)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    for mnt in (Path(directory) / "memtap").glob("*/mnt"):
        detach(mnt)
