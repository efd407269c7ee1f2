"""sfmpi: SnowFlock-style VM fork for QEMU/KVM clusters.

On the host: the `sfmpi` CLI and hostd (sfmpi.hostd). In a guest: the clone API
(sfmpi.api, re-exported here: `sfmpi.request_ticket(n)`, `sfmpi.clone(t)`, ...),
parallel sections (`with sfmpi.parallel(n) as s:`) and `sfmpi.ForkPoolExecutor`.
Nothing heavy is imported here, so `--help` stays fast.
"""
__version__ = "0.1.0"

_API = ("request_ticket", "clone", "checkpoint_parent", "create_clones", "exit", "join", "kill",
        "whoami", "members", "Ticket", "Checkpoint", "Statuses", "Member")


def __getattr__(name):  # PEP 562: the API module loads on first use
    if name in _API:
        from . import api
        return getattr(api, name)
    if name in ("parallel", "Section", "CloneFailed"):
        from . import sections
        return getattr(sections, name)
    if name in ("ForkPoolExecutor", "BrokenForkPool"):
        from . import forkpool
        return getattr(forkpool, name)
    raise AttributeError(f"module 'sfmpi' has no attribute {name!r}")
