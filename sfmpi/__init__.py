"""sfmpi: SnowFlock-style VM fork for QEMU/KVM clusters.

On the host: the `sfmpi` CLI and hostd (sfmpi.hostd). In a guest: the clone API
(issue #3). Nothing heavy is imported here, so `--help` stays fast.
"""
__version__ = "0.1.0"
