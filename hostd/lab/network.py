"""Bringing a lab up and down on this machine (the layout: topology.py).

A lab is found again by its namespaces' names in /run/netns, not by anything
stored: `down()` after a crash, or from another process, removes whatever
lab is there, whatever its size.
"""
from __future__ import annotations

import logging
import os

from sfmpi import proc
from sfmpi.errors import AlreadyExists, CommandError, NetworkError

from ..net.namespace import NETNS_DIR, enter_argv
from . import topology
from .topology import LAB_NS

log = logging.getLogger("sfmpi.hostd.lab")


def _namespaces() -> list[str]:
    if not NETNS_DIR.exists():
        return []
    return [p.name for p in NETNS_DIR.iterdir()]


def _delete(ns: str) -> None:
    """Delete one namespace; one already gone (a second down, a race) is fine."""
    if not os.path.exists(NETNS_DIR / ns):
        return
    try:
        proc.run(topology.delete_argv(ns), timeout=30)
    except CommandError as exc:
        if os.path.exists(NETNS_DIR / ns):
            raise NetworkError(f"cannot delete lab namespace {ns}: {exc.stderr.strip() or exc}") from exc
    else:
        log.info("lab namespace %s deleted", ns)


class LabNetwork:
    """up() / down() (safe twice) / hosts() / leftovers() / wrap()."""

    def __init__(self, k: int):
        self.names = topology.host_names(k)  # checks k
        self.k = k

    def exists(self) -> bool:
        return os.path.exists(NETNS_DIR / LAB_NS)

    def hosts(self) -> list[str]:
        """The lab hosts' namespaces that exist now, lab1 first."""
        return sorted((n for n in _namespaces() if topology.is_host_name(n)), key=topology.host_index)

    def leftovers(self) -> list[str]:
        """What down() removes and has not: after a down(), anything here is a leak."""
        return ([LAB_NS] if self.exists() else []) + self.hosts()

    def up(self) -> None:
        if self.leftovers():
            raise AlreadyExists(f"a lab is already up ({len(self.hosts())} hosts): run `sfmpi lab down` first")
        made: list[str] = []
        for argv in topology.up_argvs(self.k):
            try:
                proc.run(argv, timeout=30)
            except CommandError as exc:
                self._undo(made)
                raise NetworkError(f"lab up failed at `{' '.join(argv)}`: {exc.stderr.strip() or exc}") from exc
            # Only namespaces this call made are undone: `ip netns add` fails on
            # a name that exists, so one made meanwhile by someone else is not ours.
            if argv[1:3] == ["netns", "add"]:
                made.append(argv[3])
        log.info("lab up: %s on %s in %s", ", ".join(self.names), topology.BRIDGE, LAB_NS)

    def _undo(self, made: list[str]) -> None:
        for ns in reversed(made):
            try:
                _delete(ns)
            except NetworkError as exc:  # the first failure is the one to report
                log.warning("undoing a failed lab up: %s", exc)

    def down(self) -> None:
        """Remove every lab host and then the lab namespace, however many hosts
        there are (read from /run/netns, not self.k); ones already gone are fine."""
        for ns in reversed(self.hosts()):
            _delete(ns)
        _delete(LAB_NS)

    def wrap(self, name: str, argv: list[str]) -> list[str]:
        """argv run in lab host `name` (or the lab namespace): its network only,
        not its mount namespace, so a FUSE mount made inside stays visible outside."""
        if name != LAB_NS:
            topology.host_index(name)  # UsageError for a name that is no lab host
        return enter_argv(str(NETNS_DIR / name), argv)
