"""Family networks on the host: one bridge per family, a tap per VM, the
nftables rules of hostd/net/nft.py and a DHCP responder (hostd/net/dhcp.py) per family.

The kernel is the source of truth and the allocator: several hostd instances
(different state directories) may share one host, so a family number belongs
to whoever managed to create bridge sfbr<f>. The bridge is created first and
deleted last, which makes it the lock on everything else named after f (taps
sft<f>x<k>, nft tables sfmpi_f<f>), and lets a later process clean up after a
crashed one by name alone.

Calls block (netlink, `nft`, a short wait for dnsmasq); hostd's event loop
should run them in an executor.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from sfmpi import proc
from sfmpi.errors import CapacityError, CommandError, NetworkError

from . import netplan, nft
from .dhcp import DhcpServer

log = logging.getLogger("sfmpi.hostd.network")


def run_nft(script: str) -> None:
    proc.run(["nft", "-f", "-"], input=script.encode())


def _sysctl(path: str, value: str) -> None:
    # Missing files are fine (e.g. no IPv6 in this kernel: nothing to disable).
    with contextlib.suppress(FileNotFoundError):
        Path("/proc/sys", path).write_text(value)


def _read_sysctl(path: str) -> str:
    return Path("/proc/sys", path).read_text().strip()


def _disable_ipv6(ifname: str) -> None:
    # Otherwise the host gives the link a link-local address and sends router
    # solicitations and DAD probes into the family (nft.py: no IPv6 plan).
    _sysctl(f"net/ipv6/conf/{ifname}/disable_ipv6", "1")


def _index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _create_bridge(ipr: IPRoute, f: int) -> None:
    """Raises NetlinkError(EEXIST) when the bridge exists: the family is taken."""
    ipr.link("add", ifname=netplan.bridge_name(f), kind="bridge",
             address=netplan.gateway_mac(f),  # fixed, see netplan.gateway_mac
             br_stp_state=0, br_forward_delay=0,
             # Snooping would forward a multicast group only to ports that
             # answered a querier, and a family has none: just flood it.
             br_mcast_snooping=0)


def allocate_family(start: int = netplan.FIRST_FAMILY) -> int:
    """Claim the first free family number from `start` on (wrapping around) by
    creating its bridge; the caller then owns it and brings it up with FamilyNetwork."""
    netplan.check_family(start)
    span = netplan.LAST_FAMILY - netplan.FIRST_FAMILY + 1
    with IPRoute() as ipr:
        for i in range(span):
            f = netplan.FIRST_FAMILY + (start - netplan.FIRST_FAMILY + i) % span
            try:
                _create_bridge(ipr, f)
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:
                    continue
                raise NetworkError(f"cannot create bridge {netplan.bridge_name(f)}: {exc}") from exc
            _disable_ipv6(netplan.bridge_name(f))
            log.info("allocated family %d", f)
            return f
    raise CapacityError(f"all {span} family networks on this host are in use")


def leftover_tables() -> list[str]:
    """Every nft table named like a family's or an uplink's (hostd/net/uplink.py),
    as "family name" (e.g. "bridge sfmpi_f5")."""
    text = proc.output(["nft", "list", "tables"])
    return sorted(" ".join(line.split()[1:3]) for line in text.splitlines()
                  if re.match(r"^table \S+ sfmpi_(f\d+|h[0-9a-f]+)$", line.strip()))


def nat_families() -> list[str]:
    """NAT tables in this namespace, whichever hostd owns them: only a NAT family
    has a `table ip` (nft.family_tables), and an uplink's masquerade is one too."""
    return [t.split()[1] for t in leftover_tables() if t.startswith("ip ")]


# NAT needs net.ipv4.ip_forward=1: answers to masqueraded traffic are routed in
# from the uplink, and IPv4 forwarding is decided on the interface a packet
# comes in on. The sysctl is host-wide and shared by every hostd on the host,
# so the value it had before the first NAT family is kept in a host-wide file,
# and put back by whoever takes down the last NAT family (the nft tables say
# which are left, after a crash too). /run is tmpfs: the file goes at reboot,
# as does the sysctl's value. The file exists only while we changed the value.
FORWARDING_DIR = Path("/run/sfmpi")
IP_FORWARD = "net/ipv4/ip_forward"


@contextlib.contextmanager
def _forwarding_lock():
    """Serialises "turn on + add a NAT table" against "last NAT table gone -> restore"
    across processes; yields the file that holds the saved value."""
    FORWARDING_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(FORWARDING_DIR, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield FORWARDING_DIR / "ip_forward.saved"
    finally:
        os.close(fd)


def _forwarding_on(saved: Path) -> None:
    """Caller holds _forwarding_lock. Keeps the first value we overwrite, only that one."""
    was = _read_sysctl(IP_FORWARD)
    if was == "1":
        return
    if not saved.exists():
        saved.write_text(was + "\n")
    log.warning("NAT family: enabling %s (was %s; restored after the last NAT family)",
                IP_FORWARD.replace("/", "."), was)
    _sysctl(IP_FORWARD, "1")


def restore_forwarding() -> None:
    """Put ip_forward back as it was before the first NAT family, if none is left."""
    saved = FORWARDING_DIR / "ip_forward.saved"
    if not saved.exists():  # the common case: we never changed it, nothing to lock
        return
    with _forwarding_lock() as saved:
        if not saved.exists() or nat_families():
            return
        was = saved.read_text().strip()
        if was not in ("0", "1"):  # not ours to interpret: leave the sysctl as it is
            log.warning("%s holds %r; not restoring %s", saved, was, IP_FORWARD)
        else:
            log.info("last NAT family gone: %s back to %s", IP_FORWARD.replace("/", "."), was)
            _sysctl(IP_FORWARD, was)
        saved.unlink()


class FamilyNetwork:
    """Bridge, taps, nft rules and DHCP of family f (the parent VM is `name`).

    nat: egress to the host's uplink, masqueraded. open_ports: ports of the
    family's VMs that routed traffic from outside the family may reach.

    up() / down() (safe twice, and after a crash of whoever brought it up) /
    context manager. Files go to state_dir/sfbr<f>/.
    """

    def __init__(self, f: int, name: str, state_dir: Path, nat: bool = False,
                 open_ports: Iterable[nft.OpenPort | str] = (), manage_forwarding: bool = True):
        """manage_forwarding: turn on (and later restore) the namespace's IPv4
        forwarding for NAT. Off in hostd's own namespace, where it is always on."""
        self.manage_forwarding = manage_forwarding
        self.f = netplan.check_family(f)
        self.name = name
        self.nat = bool(nat)
        self.open_ports = nft.parse_open_ports(open_ports)
        self.bridge = netplan.bridge_name(f)
        self.dir = Path(state_dir) / self.bridge
        self.dhcp = DhcpServer(f, self.dir)
        self.ports: dict[int, str] = {}  # ID -> port ifname
        self._own_taps: set[int] = set()  # ports we created (add_vms), not attached

    # -- lifecycle -------------------------------------------------------
    def up(self) -> "FamilyNetwork":
        """Bring the family up; its bridge may already exist (allocate_family, or a
        previous process): tables are re-made empty and VMs must be added again."""
        try:
            with IPRoute() as ipr:
                if _index(ipr, self.bridge) is None:
                    _create_bridge(ipr, self.f)
                _disable_ipv6(self.bridge)
                index = _index(ipr, self.bridge)
                with contextlib.suppress(NetlinkError):  # EEXIST: a previous up()
                    ipr.addr("add", index=index, address=str(netplan.gateway(self.f)),
                             prefixlen=netplan.PREFIX)
                ipr.link("set", index=index, state="up")
            # Link-local frames (LLDP, 802.1X) are learned from without passing
            # any nft hook, so they could move another VM's MAC to a guest's
            # port. pyroute2 has no bridge boolopts: iproute2 sets this one.
            proc.run(["ip", "link", "set", self.bridge, "type", "bridge", "no_linklocal_learn", "1"])
            self._add_tables()
            self.dir.mkdir(parents=True, exist_ok=True)
            self.dhcp.write_hosts(self._dhcp_entries())
            self.dhcp.start()
        except (NetlinkError, CommandError, OSError) as exc:
            with contextlib.suppress(NetworkError):  # the cause below is what matters
                self.down()
            raise NetworkError(f"family {self.f} ({self.name}): cannot bring up {self.bridge}: {exc}") from exc
        log.info("family %d (%s) up on %s, %s", self.f, self.name, self.bridge, netplan.subnet(self.f))
        return self

    def _add_tables(self) -> None:
        script = nft.family_tables(self.f, self.nat, self.open_ports)
        if not self.nat or not self.manage_forwarding:
            run_nft(script)
            return
        # Forwarding on and the NAT table in, under the lock: a concurrent
        # down() of the last other NAT family must not restore in between.
        with _forwarding_lock() as saved:
            _forwarding_on(saved)
            run_nft(script)

    def down(self) -> None:
        """Remove everything of family f, whatever is left of it; bridge last (it is the lock)."""
        problems = []

        def attempt(what: str, fn, *args) -> None:
            try:
                fn(*args)
            except (NetlinkError, CommandError, OSError) as exc:
                problems.append(f"{what}: {exc}")

        attempt("dnsmasq", self.dhcp.stop)
        attempt("nft tables", run_nft, nft.delete_family(self.f))
        # Whether or not this family had NAT (after a crash nobody knows).
        if self.manage_forwarding:
            attempt("ip_forward", restore_forwarding)
        attempt("links", self._delete_links)
        attempt("files", lambda: shutil.rmtree(self.dir, ignore_errors=True))
        self.ports.clear()
        self._own_taps.clear()
        if problems:
            raise NetworkError(f"family {self.f}: down left things behind: " + "; ".join(problems))

    def _delete_links(self) -> None:
        taps = re.compile(rf"^{netplan.tap_prefix(self.f)}\d+$")
        with IPRoute() as ipr:
            for link in ipr.get_links():
                if taps.match(link.get_attr("IFLA_IFNAME") or ""):
                    with contextlib.suppress(NetlinkError):  # gone meanwhile
                        ipr.link("del", index=link["index"])
            # The tunnel to other hosts of the family (tunnel.py), if it spanned any.
            for name in (netplan.vxlan_name(self.f), self.bridge):
                index = _index(ipr, name)
                if index is not None:
                    with contextlib.suppress(NetlinkError):
                        ipr.link("del", index=index)

    def __enter__(self) -> "FamilyNetwork":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # -- VMs -------------------------------------------------------------
    def add_vms(self, ks: Iterable[int]) -> list[str]:
        """Create persistent taps for IDs ks and attach them; returns the tap names."""
        ks = [netplan.check_id(k) for k in ks]
        taps = [netplan.tap_name(self.f, k) for k in ks]
        try:
            with IPRoute() as ipr:
                for k, tap in zip(ks, taps):
                    # A tap that exists may be held open by a running QEMU
                    # (hostd restarted): keep it; re-creating would fail with EBUSY.
                    if _index(ipr, tap) is None:
                        ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
                    self._own_taps.add(k)
        except NetlinkError as exc:
            raise NetworkError(f"family {self.f}: cannot create tap: {exc}") from exc
        self.attach_ports(zip(ks, taps))
        return taps

    def attach_ports(self, ports: Iterable[tuple[int, str]]) -> None:
        """Make existing links (taps, or veths in tests) the ports of IDs k, with
        their rules (one nft transaction) and DHCP entries."""
        ports = [(netplan.check_id(k), ifname) for k, ifname in ports]
        # Rules first: a port is never in the bridge without them.
        try:
            run_nft(nft.add_vms(self.f, [(k, ifname, netplan.mac(self.f, k), str(netplan.ip(self.f, k)))
                                         for k, ifname in ports]))
        except CommandError as exc:
            raise NetworkError(f"family {self.f}: cannot add rules for IDs "
                               f"{[k for k, _ in ports]}: {exc}") from exc
        try:
            with IPRoute() as ipr:
                bridge = _index(ipr, self.bridge)
                for k, ifname in ports:
                    index = _index(ipr, ifname)
                    if index is None:
                        raise NetworkError(f"family {self.f}: ID {k}: no link {ifname}")
                    _disable_ipv6(ifname)
                    ipr.link("set", index=index, master=bridge, state="up")
                    self.ports[k] = ifname
        except NetlinkError as exc:
            raise NetworkError(f"family {self.f}: cannot attach ports: {exc}") from exc
        self._update_dhcp()

    def remove_vms(self, ks: Iterable[int]) -> None:
        """Drop IDs ks: rules, DHCP entries, and their links from the bridge (the
        taps add_vms created stay, down, for the ID's next VM). IDs not present
        are fine."""
        ks = [netplan.check_id(k) for k in ks]
        ports = {k: self.ports.get(k, netplan.tap_name(self.f, k)) for k in ks}
        try:
            with IPRoute() as ipr:
                for k, ifname in ports.items():
                    index = _index(ipr, ifname)
                    if index is None:
                        continue
                    if k in self._own_taps or ifname == netplan.tap_name(self.f, k):
                        # Kept for the next VM with this ID, off the bridge and
                        # down (no traffic, no rules); down() deletes it with the
                        # family. Clones come and go in batches, and deleting a
                        # link waits for RCU grace periods: ~18 ms each, so 8
                        # stopped clones held up the next clone request ~150 ms.
                        ipr.link("set", index=index, master=0, state="down")
                    else:
                        ipr.link("set", index=index, master=0)
            run_nft(nft.remove_vms(self.f, ks, ports))
        except (NetlinkError, CommandError) as exc:
            raise NetworkError(f"family {self.f}: cannot remove IDs {ks}: {exc}") from exc
        finally:
            for k in ks:
                self.ports.pop(k, None)
            self._update_dhcp()

    def _dhcp_entries(self) -> list[tuple[str, str, str]]:
        return [(netplan.mac(self.f, k), str(netplan.ip(self.f, k)), netplan.hostname(self.name, k))
                for k in sorted(self.ports)]

    def _update_dhcp(self) -> None:
        self.dhcp.write_hosts(self._dhcp_entries())
        if self.dhcp.pid:
            self.dhcp.reload()

    # -- diagnostics -----------------------------------------------------
    def counters(self) -> dict[str, int]:
        """Drop counters, {"bridge/vm_3_mac": packets, "inet/to_host": ...} (see nft.py)."""
        out = {}
        for family in ("bridge", "inet"):
            text = proc.output(["nft", "-j", "list", "counters", "table", family, nft.table_name(self.f)])
            out.update(nft.parse_counters(text))
        return out
