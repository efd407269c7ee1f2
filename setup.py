from setuptools import setup

# hostd/'s sub-packages, one concern each (docs/architecture.md).
HOSTD_PARTS = ("daemon", "state", "vm", "fork", "guestapi", "net", "policy")

# launcher/ and hostd/ sit at the top of the repository (the design card's
# layout) but install inside the sfmpi package, so nothing generic lands in
# site-packages.
setup(
    name="sfmpi",
    version="0.1.0",
    description="SnowFlock-style virtual-machine fork for QEMU/KVM clusters",
    python_requires=">=3.11",
    packages=["sfmpi", "sfmpi.guest", "sfmpi.launcher", "sfmpi.hostd"] +
             [f"sfmpi.hostd.{part}" for part in HOSTD_PARTS],
    package_dir={"sfmpi": "sfmpi", "sfmpi.launcher": "launcher", "sfmpi.hostd": "hostd"},
    install_requires=["qemu.qmp>=0.0.3", "click>=8", "rich>=13", "psutil>=5", "pyroute2>=0.7",
                      "paramiko>=2.12", "jsonschema>=4"],
    extras_require={"test": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6"]},
    entry_points={"console_scripts": ["sfmpi = sfmpi.cli:main", "sfclone = sfmpi.sfclone:run",
                                        "sfmpirun = sfmpi.launcher.run:main"]},
)
