"""A fork that spans hosts: this hostd's side of it, as the parent's host and as a clone host.

Parent's host (the checkpoint is here): asks the master where clones go,
serves the checkpoint's RAM from its memory server and its frozen disk over
NBD, joins the family's bridge to the clone hosts over VXLAN, and sends each
clone host the descriptor: the manifest, the device state (~1 MB) and the map
of non-zero pages, never the memory. Clone host: writes the descriptor into
its own checkpoint directory (remote/<id>), mounts the RAM through memtap from
the parent's host, puts each clone's overlay on the NBD export, joins the
family's network with the same family number, and starts the clones as it
would its own. When a clone host's clone ends it tells the parent's host,
which lets go of what it served for it.

Everything between hosts is over the cluster's mutual TLS (wire.py); what a
peer sends is still checked before it is used (a host may be compromised).
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import os
import re
import shutil
import time
from pathlib import Path

from sfmpi import proc
from sfmpi.errors import CloneError, HostdError, RoleError, SfmpiError, UsageError

from ..fork.cloner import Order, greeting_from
from ..fork.manifest import Checkpoint
from ..memory.options import ServedOptions
from ..memory.served import WORKING_SET, check_group
from ..net import netplan, tunnel
from ..vm.cmdline import NbdBacking, remote_overlay_argv
from . import keys, wire
from .config import MASTER_NAME, NBD_PORT, PEER_PORT, ClusterConfig
from .nbd import NbdExports

log = logging.getLogger("sfmpi.hostd.spanning")

START_TIMEOUT = 240.0
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,80}$")
MAX_STATE = 64 << 20
MAX_MAP = 16 << 20
MAX_WORKING_SET = 16 + 8192 * 12      # native/memory/workingset.h
MAX_HOSTS = 1024


def _checked(pattern: re.Pattern, value, what: str) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise UsageError(f"{what} {value!r} is not acceptable")
    return value


def _peers(value) -> set[str]:
    """Other hosts' underlay addresses, as a peer sends them."""
    if not isinstance(value, list) or len(value) > MAX_HOSTS or not all(isinstance(p, str) for p in value):
        raise UsageError(f"peers must be a list of at most {MAX_HOSTS} addresses")
    try:
        return {str(ipaddress.IPv4Address(p)) for p in value}
    except ValueError:
        raise UsageError(f"peers must be IPv4 addresses (got {value!r:.200})") from None


def _b64(value, limit: int, what: str) -> bytes:
    if not isinstance(value, str) or len(value) > limit * 4 // 3 + 4:
        raise UsageError(f"{what} is missing or too large")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise UsageError(f"{what} is not base64") from None


class Spanning:
    """The Cloner's `span` (place, join_family, start_remote, stop_remote) and
    the peer operations of this host (handlers())."""

    def __init__(self, config: ClusterConfig, paths, cloner, families, memory, runtime, vms, admission):
        self.config = config
        self.host = config.host
        self.paths = paths
        self.cloner, self.families, self.memory = cloner, families, memory
        self.runtime, self.vms, self.admission = runtime, vms, admission
        self.client = keys.client_context(config.keys, config.host)
        self.nbd = NbdExports(paths.home / "nbd", config.address, NBD_PORT, config.qemu_tls)
        self.addresses: dict[str, str] = {}          # host -> "ip:port" of its peer listener (from the master)
        self.exported: dict[str, set[str]] = {}      # checkpoint -> clones on other hosts using its disk
        self.origin: dict[str, tuple[str, str]] = {}  # clone here -> (parent's host, checkpoint), for clone.gone
        self.rooms: list[dict] = []                    # every host's room, from the last heartbeat
        # The clone API's: a clone of one of our tickets on another host exited or is gone.
        self.member_ended = lambda name, status=None, reason=None: None
        self._tasks: set[asyncio.Task] = set()

    # -- talking to others ----------------------------------------------
    async def master(self, op: str, timeout: float = 15.0, **args):
        host, port = self.config.master
        return await wire.call(host, port, self.client, MASTER_NAME, op, timeout=timeout, **args)

    async def peer(self, host: str, op: str, timeout: float = 30.0, **args):
        address = self.addresses.get(host)
        if address is None:
            hosts = {h["name"]: h["address"] for h in await self.master("hosts")}
            self.addresses.update(hosts)
            address = hosts.get(host)
            if address is None:
                raise HostdError(f"the master knows no host {host}")
        ip, _, port = address.rpartition(":")
        return await wire.call(ip, int(port or PEER_PORT), self.client, host, op, timeout=timeout, **args)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- parent's host ----------------------------------------------------
    async def place(self, family: str, n: int, mem_mb: int, cpus: int, allow_fewer: bool,
                    policy: str | None = None, ticket: str | None = None,
                    room_here: int | None = None) -> dict[str, int]:
        """Where n clones go. With a ticket the master also holds their room on
        each host until ticket_changed() says they run or ended; room_here caps
        this host's share at what its own admission would take."""
        extra = {"ticket": ticket, "room_here": room_here} if ticket else {}
        ans = await self.master("place", family=family, n=n, mem_mb=mem_mb, cpus=cpus, allow_fewer=allow_fewer,
                                policy=policy, **extra)
        self.addresses.update(ans["addresses"])
        return {str(h): int(c) for h, c in ans["placement"].items()}

    def ticket_changed(self, t) -> None:
        """A ticket placed by the master moved on: its copy there follows (cloned:
        its clones run and count in their hosts' heartbeats; joined or killed: its
        room is free). A master that does not answer expires it by itself."""
        state = {"cloned": "running", "joined": "ended", "killed": "ended"}.get(t.state.value)
        if t.placement is None or state is None:
            return

        async def tell() -> None:
            try:
                await self.master("ticket.state", ticket=t.id, state=state, timeout=5.0)
            except SfmpiError as exc:
                log.warning("ticket %s: telling the master it is %s: %s", t.id, state, exc)
        self._spawn(tell())

    def remote_room(self, mem_mb: int, cpus: int) -> int:
        """How many clones of (mem_mb, cpus) the other up hosts could take, as of the last heartbeat."""
        return sum(min(r["free_mem_mb"] // mem_mb, r["free_vcpus"] // cpus)
                   for r in self.rooms if r.get("up") and r.get("name") != self.host)

    async def stop_remote_vm(self, host: str, name: str) -> None:
        await self.peer(host, "clones.stop", names=[name])

    async def forward_exit(self, name: str, status: int) -> bool:
        """A clone here of another host's ticket called exit: that host finishes
        its slot; the clone stops here (and clone.gone follows)."""
        found = self.origin.get(name)
        if found is None:
            return False
        try:
            await self.peer(found[0], "clone.exited", name=name, status=status)
        except SfmpiError as exc:
            log.warning("clone %s: telling %s it exited: %s", name, found[0], exc)

        async def stop() -> None:
            with contextlib.suppress(SfmpiError):
                await self.runtime.stop(name)
        self._spawn(stop())
        return True

    def _ip_of(self, host: str) -> str:
        return self.addresses[host].rpartition(":")[0]

    async def join_family(self, fam, hosts: set[str]) -> None:
        """This host's bridge of the family floods to every host that holds its
        VMs. Hosts that held some before and get none of the new clones learn
        of the new hosts here (those that get clones learn with clones.start)."""
        holding = {h for _k, h in fam.remote.values()} | hosts
        if not holding:
            return
        await tunnel.span(self.paths.netns, fam.number, self.config.address, {self._ip_of(h) for h in holding})
        everyone = {self.config.address} | {self._ip_of(h) for h in holding}
        await asyncio.gather(*(
            self.peer(h, "family.peers", name=fam.name, number=fam.number,
                      peers=sorted(everyone - {self._ip_of(h)}))
            for h in sorted(holding - hosts) if hosts))

    async def family_peers_here(self, origin: str, name, number, peers) -> dict:
        """The parent's host of a family with clones here says which hosts it now spans."""
        fam_name = _checked(_ID_RE, name, "family name")
        number = netplan.check_family(number)
        addresses = _peers(peers)
        fam = self.families.by_name.get(fam_name)
        if fam is None or fam.number != number or \
                not any(self.origin.get(vm, ("",))[0] == origin for vm in fam.members):
            raise UsageError(f"{origin} holds no family {fam_name} (number {number}) with clones on {self.host}")
        await tunnel.span(self.paths.netns, number, self.config.address, addresses)
        return {"peers": sorted(addresses)}

    async def start_remote(self, ckpt: Checkpoint, fam, host: str, orders: list[Order],
                           greeting: dict | None = None, ticket: str = "",
                           served: ServedOptions = ServedOptions()) -> dict:
        names = [o.name for o in orders]
        mem = await self.memory.export(ckpt, names)
        disk = await self.nbd.export(ckpt.id, ckpt.disk)
        self.exported.setdefault(ckpt.id, set()).update(names)
        size = await _virtual_size(ckpt.disk)
        holding = {h for _k, h in fam.remote.values()}
        descriptor = {
            "manifest": ckpt.to_json(),
            "state": base64.b64encode(ckpt.state_file.read_bytes()).decode(),
            "page_map": base64.b64encode(Path(mem["page_map"]).read_bytes()).decode(),
            "memory": {"address": mem["address"], "port": mem["port"], "token": mem["token"],
                       "group": mem["group"] if served.multicast else None, **served.to_json(),
                       "working_set": base64.b64encode(Path(mem["working_set"]).read_bytes()).decode()
                       if mem["working_set"] else None},
            "disk": {**disk, "size": size},
        }
        peers = sorted({self.config.address} | {self._ip_of(h) for h in holding} - {self._ip_of(host)})
        t0 = time.monotonic()
        res = await self.peer(host, "clones.start", timeout=START_TIMEOUT, descriptor=descriptor,
                              family={"name": fam.name, "number": fam.number, "peers": peers},
                              greeting=greeting or {"kind": "identify"}, ticket=ticket,
                              orders=[{"name": o.name, "netid": o.netid, "index": o.index} for o in orders])
        log.info("%d clones of %s started on %s in %.0f ms", len(orders), ckpt.id, host,
                 (time.monotonic() - t0) * 1000.0)
        return res

    async def stop_remote(self, by_host: dict[str, list[Order]]) -> None:
        async def stop(host: str, orders: list[Order]) -> None:
            with contextlib.suppress(SfmpiError):
                await self.peer(host, "clones.stop", names=[o.name for o in orders])
        await asyncio.gather(*(stop(h, o) for h, o in by_host.items()))

    async def hosts_down(self, down: set[str]) -> None:
        """The master says these hosts stopped answering: our clones there are
        lost (their tickets' slots fail; the rest of each job goes on)."""
        for fam in list(self.families.by_name.values()):
            for name, (_k, host) in list(fam.remote.items()):
                if host in down:
                    log.warning("clone %s is lost with host %s", name, host)
                    await self.remote_gone(name)
                    self.member_ended(name, reason=f"its host {host} stopped answering")

    async def remote_gone(self, name: str) -> None:
        """A clone of ours on another host ended: let go of what was served for it."""
        for fam in self.families.by_name.values():
            fam.remote.pop(name, None)
        self.memory.release(name)
        for ckpt_id, users in list(self.exported.items()):
            users.discard(name)
            if not users:
                del self.exported[ckpt_id]
                await self.nbd.unexport(ckpt_id)

    # -- clone host --------------------------------------------------------
    async def start_here(self, origin: str, descriptor: dict, family: dict, orders: list,
                         greeting: dict | None = None, ticket: str = "") -> dict:
        t0 = time.monotonic()
        if not isinstance(greeting or {}, dict) or not isinstance(ticket, str) or len(ticket) > 80:
            raise UsageError("clones.start: greeting must be an object, ticket a short string")
        greet, awaited = greeting_from(greeting or {"kind": "identify"})
        if not isinstance(descriptor, dict) or not isinstance(family, dict) or not isinstance(orders, list):
            raise UsageError("clones.start: descriptor, family and orders are required")
        ckpt_id = _checked(_ID_RE, (descriptor.get("manifest") or {}).get("id"), "checkpoint id")
        fam_name = _checked(_ID_RE, family.get("name"), "family name")
        number = netplan.check_family(family.get("number"))
        peers = _peers(family.get("peers"))
        if not orders or len(orders) > netplan.MAX_ID:
            raise UsageError("clones.start: 1..250 clones")
        wanted = [Order(name=_checked(_ID_RE, o.get("name"), "VM name"), netid=netplan.check_id(o.get("netid")),
                        index=netplan.check_id(o.get("index"))) for o in orders if isinstance(o, dict)]
        if len(wanted) != len(orders) or any(o.name != netplan.hostname(fam_name, o.netid) for o in wanted):
            raise UsageError("clones.start: every clone is named after its family and ID")
        ckpt = await asyncio.to_thread(self._import, ckpt_id, descriptor)
        spec = ckpt.spec
        mem = descriptor.get("memory") if isinstance(descriptor.get("memory"), dict) else {}
        working_set = await asyncio.to_thread(self._import_working_set, ckpt, mem.get("working_set"))
        disk = descriptor.get("disk") or {}
        backing = NbdBacking(host=str(disk.get("host")), port=int(disk.get("port")), export=ckpt_id,
                             tls_dir=str(self.config.qemu_tls), server_name=origin)
        template = ckpt.overlay_template
        if not template.exists():
            partial = template.with_name(template.name + ".partial")
            await proc.run_async(remote_overlay_argv(str(partial), backing, int(disk.get("size"))))
            os.rename(partial, template)
        self.cloner.remote_disks[ckpt_id] = backing
        names = [o.name for o in wanted]
        async with self.admission.lock:
            self.admission.admit(len(wanted), spec.mem_mb, spec.cpus, False, what=f"clones of {ckpt_id} from {origin}")
            other = next((f.name for f in self.families.by_name.values() if f.number == number and f.name != fam_name),
                         None)
            if other is not None:
                raise CloneError(f"family number {number} is family {other}'s on {self.host}")
            fam = await self.families.ensure(fam_name, number)
            if fam.number != number:
                raise CloneError(f"family {fam_name} is number {fam.number} on {self.host}, not {number}")
            taken = [o.name for o in wanted if o.netid in fam.members.values() or self.vms.name_taken(o.name)]
            if taken:
                self.families.drop_if_empty(fam)
                raise CloneError(f"{self.host} already has VMs {', '.join(taken)}")
            ram = await self.memory.ram_from(ckpt_id, str(mem.get("address")), int(mem.get("port")),
                                             str(mem.get("token")), Path(ckpt.path) / "ram.map", names,
                                             check_group(mem["group"]) if mem.get("group") is not None else None,
                                             ServedOptions.from_json(mem), working_set)
            recs = await self.cloner._reserve(ckpt, fam, wanted, ticket=ticket, memory="served", ram=ram)
        for name in names:
            self.origin[name] = (origin, ckpt_id)
        await tunnel.span(self.paths.netns, number, self.config.address, peers)
        try:
            return await self.cloner.start(ckpt, fam, wanted, recs, greet, awaited, t0)
        except BaseException:
            for name in names:
                self.origin.pop(name, None)
            raise

    def _import(self, ckpt_id: str, descriptor: dict) -> Checkpoint:
        """The descriptor as a checkpoint directory of this host: manifest, device state, page map."""
        directory = self.paths.checkpoints / "remote" / ckpt_id
        state = _b64(descriptor.get("state"), MAX_STATE, "device state")
        page_map = _b64(descriptor.get("page_map"), MAX_MAP, "page map")
        ckpt = Checkpoint.parse(descriptor.get("manifest"), directory, remote=True)
        if ckpt.id != ckpt_id:
            raise UsageError("clones.start: the manifest's id does not match")
        if directory.exists():
            try:
                ckpt.verify_state()
                return ckpt
            except SfmpiError:
                shutil.rmtree(directory)
        partial = directory.with_name(f".{ckpt_id}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(mode=0o700, parents=True)
        (partial / "state").write_bytes(state)
        (partial / "ram.map").write_bytes(page_map)
        ckpt.write(partial)
        os.rename(partial, directory)
        ckpt.verify_state()
        return ckpt

    @staticmethod
    def _import_working_set(ckpt: Checkpoint, encoded: object) -> Path | None:
        """The parent's host's recorded working set, next to the imported
        checkpoint (memtap checks every entry against the RAM's size)."""
        path = Path(ckpt.path) / WORKING_SET
        if encoded is None:
            path.unlink(missing_ok=True)
            return None
        data = _b64(encoded, MAX_WORKING_SET, "working set")
        tmp = path.with_name(f".{WORKING_SET}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path

    async def stop_here(self, names: list) -> dict:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UsageError("clones.stop: names must be a list of VM names")
        stopped = []
        for name in names:
            rec = self.vms.record(name)
            if rec is not None and name in self.origin:
                with contextlib.suppress(SfmpiError):
                    await self.runtime.stop(name)
                stopped.append(name)
        return {"stopped": stopped}

    def vm_gone(self, rec, reason: str) -> None:
        """A clone of another host's checkpoint ended here: tell that host."""
        found = self.origin.pop(rec.name, None)
        if found is None:
            return
        origin, ckpt_id = found

        async def tell() -> None:
            try:
                await self.peer(origin, "clone.gone", name=rec.name, reason=reason)
            except SfmpiError as exc:
                log.warning("could not tell %s that clone %s ended: %s", origin, rec.name, exc)
        self._spawn(tell())
        if not any(c == ckpt_id for _o, c in self.origin.values()):
            self.cloner.remote_disks.pop(ckpt_id, None)

    # -- the peer listener's operations -------------------------------------
    def handlers(self, list_vms, latest_stats=lambda: [], set_resources=None) -> dict:
        async def ping(peer, _args):
            return {"host": self.host, "pid": os.getpid()}

        async def vm_list(peer, _args):
            return list_vms()

        async def stats_latest(peer, _args):
            return latest_stats()

        async def vm_set(peer, args):
            # A VM's settings change only as the admin asked the master (`vm set --all`).
            if peer != MASTER_NAME or set_resources is None:
                raise RoleError(f"only the master sets a VM's resources on {self.host} (not {peer})")
            name, settings = args.get("name"), args.get("settings")
            if not isinstance(name, str) or not isinstance(settings, dict):
                raise UsageError("vm.set: a VM name and an object of settings")
            return await set_resources(name, settings)

        async def clones_start(peer, args):
            return await self.start_here(peer, args.get("descriptor"), args.get("family"), args.get("orders"),
                                         args.get("greeting"), args.get("ticket") or "")

        async def family_peers(peer, args):
            return await self.family_peers_here(peer, args.get("name"), args.get("number"), args.get("peers"))

        async def clones_stop(peer, args):
            return await self.stop_here(args.get("names"))

        async def clone_gone(peer, args):
            name = args.get("name")
            if not isinstance(name, str):
                raise UsageError("clone.gone: name")
            held = self.families.remote_member(name)
            if held is not None and held[2] != peer:
                raise UsageError(f"{peer} does not hold clone {name}")
            await self.remote_gone(name)
            self.member_ended(name, reason=str(args.get("reason") or "gone")[:500])
            return {}

        async def clone_exited(peer, args):
            name, status = args.get("name"), args.get("status")
            if not isinstance(name, str) or isinstance(status, bool) or not isinstance(status, int) \
                    or not 0 <= status <= 255:
                raise UsageError("clone.exited: name and a status 0..255")
            held = self.families.remote_member(name)
            if held is None or held[2] != peer:
                raise UsageError(f"{peer} does not hold clone {name}")
            self.member_ended(name, status=status)
            return {}
        return {"ping": ping, "vm.list": vm_list, "stats.latest": stats_latest, "vm.set": vm_set,
                "clones.start": clones_start, "clones.stop": clones_stop,
                "family.peers": family_peers,
                "clone.gone": clone_gone, "clone.exited": clone_exited}

    async def down(self) -> None:
        await self.nbd.stop()
        for task in list(self._tasks):
            task.cancel()


async def _virtual_size(disk: str) -> int:
    import json
    _rc, out, _err = await proc.run_async(["qemu-img", "info", "--output=json", "-U", disk])
    return int(json.loads(out)["virtual-size"])


class Membership:
    """Registration with the master and the heartbeats after it; the peer listener."""

    def __init__(self, span: Spanning, usage, budget, list_vms, latest_stats=lambda: [], set_resources=None):
        self.span, self.usage, self.budget = span, usage, budget
        self.server = wire.WireServer(keys.server_context(span.config.keys, span.host),
                                      span.handlers(list_vms, latest_stats, set_resources))
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.server.start(self.span.config.address, PEER_PORT)
        self._task = asyncio.ensure_future(self._beat())

    async def _register(self) -> float:
        ans = await self.span.master("register", name=self.span.host, address=self.span.config.address,
                                     peer_port=PEER_PORT, mem_mb=self.budget.mem_mb, vcpus=self.budget.vcpus)
        return float(ans.get("heartbeat_s", 1.0))

    async def _beat(self) -> None:
        interval, registered = 1.0, False
        while True:
            try:
                if not registered:
                    interval = await self._register()
                    registered = True
                    log.info("registered with the master at %s:%d", *self.span.config.master)
                used = self.usage()
                ans = await self.span.master("heartbeat", name=self.span.host, used_mem_mb=used.mem_mb,
                                             used_vcpus=used.vcpus, timeout=max(2.0, interval * 3))
                registered = bool(ans.get("registered"))
                if isinstance(ans.get("rooms"), list):
                    self.span.rooms = [r for r in ans["rooms"] if isinstance(r, dict)]
                    await self.span.hosts_down({str(r.get("name")) for r in self.span.rooms if not r.get("up")})
            except SfmpiError as exc:
                log.warning("master: %s", exc)
                registered = False
            except Exception:  # a bug: logged, and the heartbeats go on
                log.exception("heartbeat to the master")
                registered = False
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.server.close()
        # Down at once in the master's eyes: no clone is placed here meanwhile.
        try:
            await self.span.master("leave", name=self.span.host, timeout=3.0)
        except SfmpiError as exc:
            log.info("could not tell the master this host leaves: %s", exc)
