"""Integration tests boot real VMs (TCG here). One parent per session; every
test forks from it. At the end: `sfmpi down`, then a leak check. On a failure
the QEMU logs and serial consoles are kept in tests/artifacts/."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from sfmpi.paths import Paths
from tests.leakcheck import leaks

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


class Cli:
    """Runs the real `sfmpi` command against one state directory."""

    def __init__(self, home: Path, extra_env: dict | None = None):
        self.home = home
        self.env = {**os.environ, "SFMPI_HOME": str(home), **(extra_env or {})}

    def __call__(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        p = subprocess.run(["sfmpi", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"sfmpi {' '.join(args)} exited {p.returncode}:\n{p.stderr}")
        return p

    def json(self, *args: str) -> dict | list:
        return json.loads(self(*args, "--json").stdout)

    def exec(self, vm: str, script: str, check: bool = True) -> subprocess.CompletedProcess:
        return self("vm", "exec", vm, "--", "sh", "-c", script, check=check)

    def put(self, vm: str, path: str, text: str) -> None:
        """Write a file in the guest (`vm exec` passes no stdin: a here-document)."""
        self.exec(vm, f"cat > {path} <<'SFMPI_EOF'\n{text}\nSFMPI_EOF")

    def clones_of(self, vm: str) -> list[str]:
        """VMs forked from `vm` that still exist (their names extend its name)."""
        return [r["name"] for r in self.json("vm", "list") if r["name"].startswith(vm + "-")]

    def assert_no_clones_left(self, vm: str, within: float = 30.0) -> None:
        """Clones are destroyed when they exit: give hostd a moment, then none may be left."""
        deadline = time.monotonic() + within
        while self.clones_of(vm) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert self.clones_of(vm) == []

    @property
    def paths(self) -> Paths:
        return Paths(self.home)

    def teardown(self, keep_logs: bool, whole_host_network: bool = False) -> list[str]:
        if keep_logs and (self.home / "vms").exists():
            dest = ARTIFACTS / self.home.name
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(self.home / "vms", dest / "vms")
            if (self.home / "hostd.log").exists():
                shutil.copy(self.home / "hostd.log", dest)
        self("down", check=False)
        return leaks(self.paths.home, self.paths.shm, whole_host_network)


def make_home(tag: str) -> Path:
    # Short paths: QMP and agent sockets must fit in sun_path (108 bytes).
    return Path(tempfile.mkdtemp(prefix=f"sfmpi-{tag}-", dir="/tmp")).resolve()


def pytest_configure(config):
    config.addinivalue_line("markers", "lab: a lab of hosts in network namespaces (no VMs); `-m lab` runs only these")
    config.addinivalue_line("markers", "slurm: real Slurm daemons over a lab (`-m slurm`)")
    config.addinivalue_line("markers", "sge: a real Grid Engine (`-m sge`)")
    config.addinivalue_line("markers", "browser: a headless Chromium (no VMs; `-m browser`)")
    config.addinivalue_line("markers", "libvirt: a private libvirtd and virtlogd (`-m libvirt`)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if outcome.get_result().failed:
        item.session.sfmpi_failed = True


@pytest.fixture(scope="session")
def cli(request):
    home = make_home("it")
    c = Cli(home)
    yield c
    # The last sfmpi of the session: no family link or nft table may be left on the host.
    left = c.teardown(keep_logs=getattr(request.session, "sfmpi_failed", False), whole_host_network=True)
    shutil.rmtree(home, ignore_errors=True)
    assert not left, f"sfmpi down left things behind: {left}"


@pytest.fixture(scope="session")
def parent(cli) -> str:
    """A running parent VM with state written before any checkpoint."""
    cli("vm", "start", "parent", "--mem", "512M", "--json")
    return "parent"


@pytest.fixture
def other_home(request):
    """A second state directory (its own hostd), torn down and leak-checked after the test."""
    homes = []

    def make(**env) -> Cli:
        c = Cli(make_home("x"), {k: str(v) for k, v in env.items()})
        homes.append(c)
        return c
    yield make
    for c in homes:
        left = c.teardown(keep_logs=getattr(request.session, "sfmpi_failed", False))
        shutil.rmtree(c.home, ignore_errors=True)
        assert not left, f"second home left things behind: {left}"
