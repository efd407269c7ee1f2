import subprocess

from setuptools import Extension, setup

# hostd/'s sub-packages, one concern each (docs/architecture.md).
HOSTD_PARTS = ("daemon", "state", "vm", "fork", "guestapi", "net", "policy", "memory", "master", "cluster", "lab",
               "pool", "console", "monitor", "resources", "control", "vm.libvirt")


def pkg_config(flag: str, package: str) -> list[str]:
    """libfuse3's and libcrypto's flags; on a machine without pkg-config, Debian's paths."""
    try:
        out = subprocess.run(["pkg-config", flag, package], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = {("--cflags", "fuse3"): "-I/usr/include/fuse3", ("--libs", "fuse3"): "-lfuse3 -lpthread",
               ("--cflags", "libcrypto"): "", ("--libs", "libcrypto"): "-lcrypto"}[flag, package]
    return out.split()


# sfmpi._native: the lazy memory path (native/README.md). Imported lazily, so
# the CLI's --help, job scripts and most unit tests work without it.
NATIVE = Extension(
    "sfmpi._native",
    sources=[f"native/memory/{name}.c" for name in
             ("protocol", "pagemap", "counters", "server", "fetch", "memtap", "module", "mcast", "mcsend", "mcrecv",
              "workingset")],
    extra_compile_args=["-std=gnu11", "-Wall", "-Wextra", *pkg_config("--cflags", "fuse3"),
                        *pkg_config("--cflags", "libcrypto")],
    extra_link_args=[*pkg_config("--libs", "fuse3"), *pkg_config("--libs", "libcrypto")],
)

# Preloaded into the QEMU of a served clone (native/qemu-nothp/nothp.c says why);
# an Extension only so that it is built and installed next to sfmpi._native.
NOTHP = Extension("sfmpi._nothp", sources=["native/qemu-nothp/nothp.c"], extra_compile_args=["-Wall", "-Wextra"],
                  extra_link_args=["-ldl"])

# Preloaded into every clone's QEMU whose parent reports free pages
# (native/qemu-keepram/keepram.c says why).
KEEPRAM = Extension("sfmpi._keepram", sources=["native/qemu-keepram/keepram.c"],
                    extra_compile_args=["-Wall", "-Wextra"], extra_link_args=["-ldl"])

# launcher/, jobs/ and hostd/ sit at the top of the repository (the design card's
# layout) but install inside the sfmpi package, so nothing generic lands in
# site-packages.
setup(
    name="sfmpi",
    version="0.1.0",
    description="SnowFlock-style virtual-machine fork for QEMU/KVM clusters",
    python_requires=">=3.11",
    ext_modules=[NATIVE, NOTHP, KEEPRAM],
    packages=["sfmpi", "sfmpi.guest", "sfmpi.native", "sfmpi.launcher", "sfmpi.jobs", "sfmpi.hostd"] +
             [f"sfmpi.hostd.{part}" for part in HOSTD_PARTS],
    package_dir={"sfmpi": "sfmpi", "sfmpi.launcher": "launcher", "sfmpi.jobs": "jobs", "sfmpi.hostd": "hostd"},
    # The console's page (hostd/console/static/): installed next to its server, which serves it.
    package_data={"sfmpi.hostd.console": ["static/*"]},
    install_requires=["qemu.qmp>=0.0.3", "click>=8", "rich>=13", "psutil>=5", "pyroute2>=0.7",
                      "paramiko>=2.12", "jsonschema>=4",
                      # Slurm's hostlist syntax (SLURM_JOB_NODELIST=lab[1-3]) without a Slurm install
                      "python-hostlist>=1.21",
                      # per-VM statistics in the Prometheus text format (hostd/monitor/export.py)
                      "prometheus_client>=0.16"],
    # libvirt-python only for the libvirt driver (imported lazily; built against libvirt-dev).
    extras_require={"test": ["pytest>=7", "pytest-timeout>=2", "hypothesis>=6", "selenium>=4", "libvirt-python>=9"],
                    "libvirt": ["libvirt-python>=9"]},
    entry_points={"console_scripts": ["sfmpi = sfmpi.cli:main", "sfclone = sfmpi.sfclone:run",
                                        "sfmpirun = sfmpi.launcher.run:main"]},
)
