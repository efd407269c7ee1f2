"""The one error tree of sfmpi.

Every failure a user can cause ends as one of these, with a message that names
the host, the VM and the clone where that applies; the CLI prints the message
on one line and exits non-zero.
"""
from __future__ import annotations


class SfmpiError(Exception):
    """Root of every error sfmpi raises on purpose."""

    exit_code = 1


class UsageError(SfmpiError):
    """Bad input from the user: a value out of range, a malformed name."""

    exit_code = 2


class NotFound(SfmpiError):
    """A VM, image or checkpoint the user named does not exist."""


class AlreadyExists(SfmpiError):
    """A name the user chose is taken."""


class CommandError(SfmpiError):
    """An external command failed; carries its argv, exit code and stderr."""

    def __init__(self, argv: list[str], returncode: int, stderr: str):
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip().splitlines()[-1:] if stderr else []
        detail = f": {tail[0]}" if tail else ""
        super().__init__(f"{argv[0]} exited with {returncode}{detail}")


class QemuError(SfmpiError):
    """A QEMU process failed to start, crashed or refused a QMP command."""


class CheckpointError(SfmpiError):
    """A checkpoint could not be taken or is unusable (corrupt, incomplete)."""


class CapacityError(SfmpiError):
    """The host's memory or CPU budget cannot hold what was asked."""


class AgentError(SfmpiError):
    """The guest agent did not answer or reported a failure."""


class HostdError(SfmpiError):
    """hostd could not be reached, started, or is already running."""


class ImageError(SfmpiError):
    """The guest image is missing or could not be built."""


class RoleError(SfmpiError):
    """A clone-API call made in the wrong role: exit in the parent, join in a clone."""


class TicketError(SfmpiError):
    """A ticket that is unknown, already used, killed or expired."""


class BusyError(SfmpiError):
    """A second clone call while one is still in progress."""


class CloneError(SfmpiError):
    """A clone failed to come up (QEMU died, a clone.d hook failed)."""


class ProtocolError(SfmpiError):
    """The other end speaks another protocol version or sent garbage."""


class NetworkError(SfmpiError):
    """A family network (bridge, tap, nftables, DHCP) could not be set up."""


class LaunchError(SfmpiError):
    """sfmpirun could not start an MPI job on its clones, or a failure (an agent
    that cannot connect, a clone that died, a signal) ended it."""


class LazyMemoryError(SfmpiError):
    """Lazy memory could not be served: the extension sfmpi._native is not
    built, or a memory server or memtap failed or went away."""


class SectionError(SfmpiError):
    """A parallel section or fork pool could not run: a clone that never came,
    died or fell out of step with the others."""


# Errors cross the hostd socket as {"error": {"type": name, "message": text}};
# this table turns them back into the same class on the client side.
BY_NAME: dict[str, type[SfmpiError]] = {
    cls.__name__: cls
    for cls in (
        SfmpiError, UsageError, NotFound, AlreadyExists, CommandError, QemuError,
        CheckpointError, CapacityError, AgentError, HostdError, ImageError,
        RoleError, TicketError, BusyError, CloneError, ProtocolError, NetworkError, LaunchError,
        SectionError, LazyMemoryError,
    )
}


def from_wire(kind: str, message: str) -> SfmpiError:
    cls = BY_NAME.get(kind, SfmpiError)
    err = SfmpiError.__new__(cls)
    SfmpiError.__init__(err, message)
    return err


class PoolError(SfmpiError):
    """A service pool cannot be made, changed or reached (hostd/pool/)."""
