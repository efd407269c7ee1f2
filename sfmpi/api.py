"""The clone API for Python programs inside an sfmpi VM (SnowFlock's API, AOSA 18.7).

    import sfmpi
    t = sfmpi.request_ticket(4)        # m <= 4 clones granted by policy
    i = sfmpi.clone(t)                 # 0 in the parent, 1..m in the clones
    if i == 0:
        print(sfmpi.join(t))           # {1: 0, 2: 0, ...}: each clone's exit status
    else:
        ...work...
        sfmpi.exit(0)

Speaks protocol sfclone/1 (docs/clone-api.md) to the sfmpi agent's local
socket. Standard library only: it runs in the guest image.
"""
from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import dataclass

from .errors import ProtocolError, SfmpiError, from_wire

API_VERSION = 1
DEFAULT_SOCKET = "/run/sfmpi/api.sock"


@dataclass(frozen=True)
class Ticket:
    id: str
    requested: int
    granted: int
    family: str
    timeout: float | None = None
    resources: dict | None = None   # the settings its clones get instead of this VM's


@dataclass(frozen=True)
class Checkpoint:
    id: str
    family: str
    clone_id: int = 0   # in a clone created from this checkpoint: that clone's ID


class Statuses(dict):
    """join()'s answer: {clone ID: exit status}; clones that never called exit
    (crashed, killed, timed out) are absent from the dict and listed in .failures."""

    def __init__(self, statuses: dict[int, int], failures: dict[int, str]):
        super().__init__(statuses)
        self.failures = failures


def socket_path() -> str:
    return os.environ.get("SFMPI_API_SOCKET", DEFAULT_SOCKET)


def call(op: str, **args) -> dict:
    """One request, one answer; raises the error the agent reported."""
    path = socket_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            raise SfmpiError(f"cannot reach the sfmpi agent at {path}: {exc.strerror or exc} "
                             "(is this an sfmpi VM, and are you root or in group sfmpi?)") from None
        sock.sendall((json.dumps({"v": API_VERSION, "op": op, **args}) + "\n").encode())
        line = sock.makefile("rb").readline()
    finally:
        sock.close()
    if not line:
        raise ProtocolError(f"the sfmpi agent closed the connection without answering {op}")
    try:
        answer = json.loads(line)
    except ValueError:
        raise ProtocolError(f"unparsable answer from the sfmpi agent to {op}") from None
    if answer.get("v") != API_VERSION:
        raise ProtocolError(f"the agent answered with protocol version {answer.get('v')!r}, "
                            f"expected {API_VERSION}")
    if not answer.get("ok"):
        err = answer.get("error") or {}
        raise from_wire(err.get("type", "SfmpiError"), err.get("message", f"{op} failed"))
    return answer


def _ticket_id(ticket: Ticket | str) -> str:
    return ticket.id if isinstance(ticket, Ticket) else str(ticket)


def request_ticket(n: int, timeout: float | None = None, resources: dict | None = None) -> Ticket:
    """Reserve up to n clones; the ticket says how many (m) were granted.

    Clones inherit this VM's resource settings (`sfmpi vm set`); `resources`
    changes them for this ticket's clones only: {"priority": "low",
    "cpu_limit": 50, "net_rate": "10mbit", "cpu_shares": None, ...}, the names
    and values of `sfmpi vm set`, None dropping an inherited setting."""
    t = call("ticket", n=n, timeout=timeout, resources=resources)["ticket"]
    return Ticket(id=t["id"], requested=t["requested"], granted=t["granted"], family=t["family"],
                  timeout=t.get("timeout"), resources=t.get("resources"))


def clone(ticket: Ticket | str) -> int:
    """Fork this VM into the ticket's m clones: 0 here, 1..m in the clones."""
    return int(call("clone", ticket=_ticket_id(ticket))["id"])


def checkpoint_parent() -> Checkpoint:
    """Keep this instant as a VM descriptor for create_clones() later."""
    ans = call("checkpoint")
    c = ans["checkpoint"]
    return Checkpoint(id=c["id"], family=c["family"], clone_id=int(ans.get("id", 0)))


def create_clones(ckpt: Checkpoint | str, ticket: Ticket | str) -> list[int]:
    """Start the ticket's clones from an earlier checkpoint_parent()."""
    cid = ckpt.id if isinstance(ckpt, Checkpoint) else str(ckpt)
    return [int(i) for i in call("create_clones", checkpoint=cid, ticket=_ticket_id(ticket))["clones"]]


def exit(status: int = 0) -> None:  # noqa: A001 - SnowFlock's name for it
    """End this clone with a status the parent's join() sees. Does not return."""
    call("exit", status=int(status))
    raise ProtocolError("exit returned: the clone should have been destroyed")


def join(ticket: Ticket | str, timeout: float | None = None) -> Statuses:
    """Wait until every clone of the ticket has exited; their exit statuses."""
    ans = call("join", ticket=_ticket_id(ticket), timeout=timeout)
    return Statuses({int(k): int(v) for k, v in ans.get("statuses", {}).items()},
                    {int(k): str(v) for k, v in ans.get("failures", {}).items()})


def kill(ticket: Ticket | str) -> list[int]:
    """Destroy the ticket's clones now."""
    return [int(i) for i in call("kill", ticket=_ticket_id(ticket))["killed"]]


@dataclass(frozen=True)
class Member:
    """One clone of a used ticket, as members() reports it."""
    id: int
    state: str              # running, exited, failed
    ip: str | None          # None once it has ended
    hostname: str | None
    status: int | None = None
    failure: str | None = None


def members(ticket: Ticket | str) -> list[Member]:
    """The ticket's clones (parent only): ID, state, address and hostname."""
    return [Member(id=int(m["id"]), state=m["state"], ip=m.get("ip"), hostname=m.get("hostname"),
                   status=m.get("status"), failure=m.get("failure"))
            for m in call("members", ticket=_ticket_id(ticket))["members"]]


def ended_clone(ticket: Ticket | str, clone_id: int) -> Member | None:
    """Clone `clone_id`'s entry if it is no longer running, else None. A
    destroyed VM takes its connections along without closing them, so a
    parent waiting on a clone asks this now and then."""
    return next((m for m in members(ticket) if m.id == clone_id and m.state != "running"), None)


def family_subnet(ip: str) -> str:
    """The family network an address is on, as CIDR (every family is one /24:
    docs/clone-api.md). MPI libraries are told to use only this network."""
    return str(ipaddress.IPv4Interface(f"{ip}/24").network)


def whoami() -> dict:
    """This VM's ID (0: parent), role, family, IP, MAC, hostname and host (the
    physical host it runs on: clones of one fork may run on several)."""
    ans = call("whoami")
    return {k: v for k, v in ans.items() if k not in ("v", "ok")}
