"""Per-VM statistics (issue 20, in progress): what hostd samples of each VM's
QEMU from /proc, QMP and the tap; see procfs.py for the readers."""
