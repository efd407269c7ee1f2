"""`sfmpi image build --packages`: a user's Debian packages are in the guest,
and an MPI application compiled by Debian, not by us, runs unmodified under
sfmpirun."""
from __future__ import annotations

import re
import subprocess

import pytest

pytestmark = pytest.mark.timeout(1500)

# hello: any package at all. netpipe-mpich2: NetPIPE's MPI ping-pong (NPmpich2),
# built by Debian against MPICH; it needs exactly 2 ranks.
PACKAGES = "hello,netpipe-mpich2"


def test_image_with_extra_packages_boots_and_runs_them(cli):
    p = subprocess.run(["sfmpi", "image", "build", "--packages", PACKAGES], env=cli.env,
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr
    image = p.stdout.strip().splitlines()[-1]
    assert image.endswith("disk.qcow2")
    cli("vm", "start", "withpkg", "--image", image, "--mem", "512M")
    try:
        assert cli.exec("withpkg", "hello").stdout == "Hello, world!\n"
        # Unmodified Debian binary, two ranks: one here, one in a fresh clone.
        run = cli.exec("withpkg", "cd /tmp && sfmpirun -n 2 NPmpich2 -u 4096", check=False)
        assert run.returncode == 0, run.stderr
        out = run.stdout + run.stderr   # NetPIPE reports progress on stderr
        assert re.search(r"^0: withpkg$", out, re.M), out
        assert re.search(r"^1: withpkg-1$", out, re.M), out
        sizes = re.findall(r"^\s*\d+:\s+(\d+) bytes .* Mbps", out, re.M)
        assert sizes and max(map(int, sizes)) >= 4096, out
        assert [r["name"] for r in cli.json("vm", "list") if r["name"].startswith("withpkg-")] == []
    finally:
        cli("vm", "stop", "withpkg")
