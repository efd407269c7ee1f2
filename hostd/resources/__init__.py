"""Per-VM resource settings (`sfmpi vm set`): cgroups, QEMU I/O throttling, traffic limits on the tap."""
