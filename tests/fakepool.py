"""A pool's database with no pool behind it: what the console tests draw.

The rows are written through PoolDb as the controller writes them, and a
stand-in controller process (a sleeping Python whose command line reads
`... serve NAME`, which is what pool_status checks) keeps the pool's state
"serving" instead of "controller-dead". The caller ends it with stop().
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sfmpi.hostd.pool.db import PoolDb, now_ms

MIB = 1 << 20


class FakePool:
    def __init__(self, home: Path, name: str = "web", vms: int = 2, port: int = 8080):
        self.home = Path(home)
        self.name = name
        directory = self.home / "pools" / name
        directory.mkdir(parents=True, exist_ok=True)
        self.db = PoolDb(directory / "pool.db")
        self.db.init_params({"max_vm_count": 4})
        self.db.size_ip_pool(4, port)
        self.vms = [f"{name}-w{i}" for i in range(1, vms + 1)]
        for i, vm in enumerate(self.vms, start=1):
            self.db.add_vm(vm, self.db.reserve_ip(4), f"10.0.0.{10 + i}")
        self.controller = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", "serve", name],
                                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.frontend = "http://127.0.0.1:18080/"
        self.db.set_info(name=name, state="serving", frontend=self.frontend, pid=self.controller.pid,
                         port=port, service="echo")
        self.db.event("up", None, f"serving at {self.frontend} with {vms} worker(s)")

    def report(self, vm: str, cpu: float, ram_mib: float, at: int | None = None) -> None:
        """One load report, as the controller records it (memory in bytes, as the agent sends it)."""
        self.db.report(vm, cpu, int(ram_mib * MIB), idle=False, at=now_ms() if at is None else at)

    def stop(self) -> None:
        if self.controller.poll() is None:
            self.controller.kill()
        self.controller.wait()
        self.db.close()
