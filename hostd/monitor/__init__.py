"""Per-VM statistics (issue 20, in progress): what hostd will sample of each
VM: procfs.py (CPU of QEMU and its vCPU threads, PSS), devices.py (vCPU
thread IDs from QMP, the tap's counters), history.py (rates, a bounded
history), export.py (the Prometheus text format). Not yet run by hostd."""
