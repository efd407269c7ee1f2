"""`sfmpi image build --packages`: a user's Debian package is in the guest."""
from __future__ import annotations

import subprocess

import pytest

pytestmark = pytest.mark.timeout(1200)


def test_image_with_extra_package_boots_and_runs_it(cli):
    p = subprocess.run(["sfmpi", "image", "build", "--packages", "hello"], env=cli.env,
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr
    image = p.stdout.strip().splitlines()[-1]
    assert image.endswith("disk.qcow2")
    cli("vm", "start", "withpkg", "--image", image, "--mem", "256M")
    try:
        assert cli.exec("withpkg", "hello").stdout == "Hello, world!\n"
    finally:
        cli("vm", "stop", "withpkg")
