"""Frozen disks for clones on other hosts: read-only NBD exports over TLS.

One qemu-storage-daemon per hostd serves every exported checkpoint disk on
one port (NBD_PORT on this host's cluster address), each as an export named
after the checkpoint, added and removed over its QMP socket as remote clones
come and go. A clone host's overlay reads the clusters it lacks through to the
export (vm/cmdline.py NbdBacking). qemu-storage-daemon rather than one
qemu-nbd per checkpoint: one listener and one port whatever the number of
checkpoints, and exports change without a restart.

The NBD server takes only clients whose certificate the cluster's CA signed
(verify-peer): the same keys as the master and hostds' channels.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import subprocess
import time
from pathlib import Path

from qemu.qmp import QMPClient

from sfmpi.errors import CheckpointError

log = logging.getLogger("sfmpi.hostd.nbd")

START_TIMEOUT = 15.0
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,60}$")


def daemon_argv(address: str, port: int, tls_dir: Path, qmp: Path, pidfile: Path) -> list[str]:
    """qemu-storage-daemon with an NBD server (TLS, peers verified) and a QMP socket. Pure."""
    return ["qemu-storage-daemon",
            "--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={tls_dir},verify-peer=on",
            "--nbd-server", f"addr.type=inet,addr.host={address},addr.port={int(port)},tls-creds=tls0",
            "--chardev", f"socket,id=qmp0,path={qmp},server=on,wait=off",
            "--monitor", "chardev=qmp0", "--pidfile", str(pidfile)]


def node_name(export: str) -> str:
    if not _NAME_RE.match(export):
        raise CheckpointError(f"{export!r} cannot name an NBD export")
    return f"x-{export}"


class NbdExports:
    """export(name, disk) / unexport(name) / stop(); the daemon starts with the first export."""

    def __init__(self, directory: Path, address: str, port: int, tls_dir: Path):
        self.dir = Path(directory)
        self.address, self.port, self.tls_dir = address, port, tls_dir
        self.popen: subprocess.Popen | None = None
        self.qmp: QMPClient | None = None
        self.exports: set[str] = set()
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    async def _ensure(self) -> QMPClient:
        if self.qmp is not None and self.alive():
            return self.qmp
        await self.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        sock, log_path = self.dir / "qsd.qmp", self.dir / "qsd.log"
        sock.unlink(missing_ok=True)
        with open(log_path, "ab") as out:
            self.popen = subprocess.Popen(daemon_argv(self.address, self.port, self.tls_dir, sock,
                                                      self.dir / "qsd.pid"),
                                          stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not sock.exists():
            if not self.alive() or time.monotonic() > deadline:
                said = log_path.read_text(errors="replace").strip().splitlines()[-1:] if log_path.exists() else []
                await self.stop()
                raise CheckpointError(f"the NBD server (qemu-storage-daemon) did not start on "
                                      f"{self.address}:{self.port}: {' '.join(said) or 'no output'}")
            await asyncio.sleep(0.02)
        qmp = QMPClient("nbd-exports")
        try:
            await asyncio.wait_for(qmp.connect(str(sock)), START_TIMEOUT)
        except Exception as exc:
            await self.stop()
            raise CheckpointError(f"the NBD server's QMP socket: {exc}") from exc
        self.qmp = qmp
        log.info("NBD server %d on %s:%d", self.popen.pid, self.address, self.port)
        return qmp

    async def export(self, name: str, disk: str) -> dict:
        """Export a frozen qcow2 layer (with its backing chain) read-only as `name`; idempotent."""
        node = node_name(name)
        async with self._lock:
            qmp = await self._ensure()
            if name not in self.exports:
                try:
                    await asyncio.wait_for(qmp.execute("blockdev-add", {
                        "driver": "qcow2", "node-name": node, "read-only": True,
                        "file": {"driver": "file", "filename": disk}}), 30)
                    await asyncio.wait_for(qmp.execute("block-export-add", {
                        "type": "nbd", "id": node, "node-name": node, "name": name, "writable": False}), 30)
                except Exception as exc:
                    with contextlib.suppress(Exception):
                        await qmp.execute("blockdev-del", {"node-name": node})
                    raise CheckpointError(f"cannot export the disk of checkpoint {name} over NBD: {exc}") from exc
                self.exports.add(name)
                log.info("NBD export %s: %s", name, disk)
        return {"host": self.address, "port": self.port, "export": name}

    async def unexport(self, name: str) -> None:
        async with self._lock:
            if name not in self.exports or self.qmp is None or not self.alive():
                self.exports.discard(name)
                return
            node = node_name(name)
            self.exports.discard(name)
            try:
                # hard: a clone host that died keeps no connection open forever.
                await asyncio.wait_for(self.qmp.execute("block-export-del", {"id": node, "mode": "hard"}), 30)
                for _ in range(100):   # the export goes when its last client is cut
                    names = {e["id"] for e in await self.qmp.execute("query-block-exports")}
                    if node not in names:
                        break
                    await asyncio.sleep(0.05)
                await asyncio.wait_for(self.qmp.execute("blockdev-del", {"node-name": node}), 30)
            except Exception as exc:
                log.warning("NBD export %s: removing it: %s", name, exc)

    async def stop(self) -> None:
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.disconnect(), 5)
            self.qmp = None
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.terminate()
                try:
                    await asyncio.to_thread(self.popen.wait, 10)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    await asyncio.to_thread(self.popen.wait)
            self.popen = None
        self.exports.clear()

