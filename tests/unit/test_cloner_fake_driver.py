"""The Cloner, and the clone API on top of it, against a fake VM driver: no QEMU, no VM.

Real here: the Cloner, the VmRegistry on a Store (SQLite in tmp_path), Admission
with its Budget, a checkpoint directory with its manifest (as
tests/unit/test_checkpoint_manifest.py makes one), the command line (vm_argv),
the address plan, and, for the clone API, CloneApi, TicketBook and GuestSide
(hostd's real CloneHost). Fake: the VM runtime (launch gives a Vm whose QEMU
and agent only record what they are asked) and the families' network.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
from types import SimpleNamespace

import pytest

from sfmpi.errors import CapacityError, CloneError, NetworkError, NotFound, QemuError, UsageError
from sfmpi.hostd.daemon.host import GuestSide
from sfmpi.hostd.fork.cloner import Cloner
from sfmpi.hostd.fork.manifest import Checkpoint
from sfmpi.hostd.guestapi.clone_api import CloneApi
from sfmpi.hostd.guestapi.tickets import TicketBook, TicketState
from sfmpi.hostd.net import netplan
from sfmpi.hostd.net.families import Family
from sfmpi.hostd.policy.admission import Admission, Budget, Usage
from sfmpi.hostd.state.records import VmRecord, VmRole, VmState
from sfmpi.hostd.state.store import Store
from sfmpi.hostd.vm.cmdline import Launch, MachineSpec, launch_argv
from sfmpi.hostd.vm.registry import Vm, VmRegistry

SPEC = MachineSpec(mem_mb=256, cpus=1, accel="tcg", kernel="/k", initrd="/i", append="x", disk_size=1 << 30)
STATE = b"QEVM device state \x00\x01" * 64
TEMPLATE = b"QFI\xfb" + b"\x00" * 60 + b"overlay template"
FAMILY_NO = 5
OK_REPORT = {"ev": "cloned", "ok": True, "guest_ms": {"identity": 4.0}}
QMP_ORDER = ["migrate-set-capabilities", "migrate-incoming", "cont"]


# -- the fake driver ----------------------------------------------------------------
class FakeQemu:
    """What the Cloner asks of a QEMU: QMP commands, the migration listener, its exit."""

    def __init__(self, name: str, journal: list, fail_load: bool = False, load_s: float = 0.0):
        self.name = name
        self.journal = journal          # (VM, what) of every QEMU, in order
        self.fail_load = fail_load
        self.load_s = load_s            # how long its state takes to load
        self.commands: list[tuple[str, dict | None]] = []
        self.exited = asyncio.Event()
        self._listening = False
        self.stopped = False

    async def execute(self, cmd: str, args: dict | None = None, timeout: float = 60.0):
        if cmd == "migrate-incoming":
            assert self._listening, "migrate-incoming before the MIGRATION listener is on"
        self.commands.append((cmd, args))
        self.journal.append((self.name, cmd))
        await asyncio.sleep(0)
        return {}

    def listen(self, *names: str):
        assert names == ("MIGRATION",)
        return object()

    @contextlib.contextmanager
    def listening(self, _listener):
        self._listening = True
        try:
            yield
        finally:
            self._listening = False

    async def wait_migration(self, _listener, want: set[str], timeout: float = 120.0) -> str:
        assert self._listening and "completed" in want
        await asyncio.sleep(self.load_s)
        if self.fail_load:
            raise QemuError(f"VM {self.name}: migration failed (fault injected)")
        self.journal.append((self.name, "loaded"))
        return "completed"

    def failure_report(self) -> str:
        return ""

    async def stop(self) -> None:
        self.stopped = True


class FakeAgent:
    """The clone's agent: takes the greeting, reports as told."""

    def __init__(self, report: dict):
        self.report = report
        self.sent: list[dict] = []
        self.waited: list[str] = []

    async def send_op(self, msg: dict) -> None:
        self.sent.append(msg)

    async def wait_event(self, name: str, timeout: float) -> dict:
        self.waited.append(name)
        await asyncio.sleep(0)
        return dict(self.report, ev=name)


class FakeRuntime:
    """What the Cloner (and GuestSide) use of VmRuntime. Records reserve, release
    and delete as the real one does, so the registry and its "gone" event are real."""

    driver = SimpleNamespace(name="direct")

    def __init__(self, root, vms: VmRegistry):
        self.root, self.vms = root, vms
        (root / "disks").mkdir(exist_ok=True)
        (root / "shm").mkdir(exist_ok=True)
        self.reports: dict[str, dict] = {}      # clone name -> its agent's report (else OK_REPORT)
        self.fail_load: set[str] = set()        # clones whose state does not load
        self.load_s: dict[str, float] = {}      # clone name -> seconds its state takes to load
        self.journal: list[tuple[str, str]] = []
        self.launched: list[SimpleNamespace] = []
        self.abandoned: list[tuple[str, BaseException | None]] = []
        self.released: list[tuple[str, str]] = []
        self._layers = itertools.count(1)
        self.on_launch = lambda rec: None

    def files(self, name: str) -> dict:
        shm = self.root / "shm"
        return dict(ram_path=str(shm / f"{name}.ram"), qmp_path=str(shm / f"{name}.qmp"),
                    agent_path=str(shm / f"{name}.agent"), log_path=str(self.root / f"{name}.log"),
                    serial_log=str(self.root / f"{name}.serial"))

    def new_layer(self, name: str) -> str:
        return str(self.root / "disks" / f"{name}-{next(self._layers)}.qcow2")

    def reserve(self, rec: VmRecord) -> None:
        self.vms.reserve(rec)

    def state_uri(self, fd: int) -> str:
        return f"fd:{fd}"     # the direct driver's: inherited under the same number

    async def launch(self, rec: VmRecord, launch: Launch, state_fd: int | None = None,
                     agent: bool = True, state: VmState | None = None) -> Vm:
        pass_fds = (state_fd,) if state_fd is not None else ()
        for fd in pass_fds:
            os.fstat(fd)  # the device state's descriptor is open while QEMU starts
        assert self.vms.store.get_vm(rec.name) is not None, "launched before its record was reserved"
        self.on_launch(rec)
        self.launched.append(SimpleNamespace(name=rec.name, argv=launch_argv(launch), fds=pass_fds,
                                             overlay=open(rec.overlay, "rb").read()))
        vm = Vm(rec=rec, qemu=FakeQemu(rec.name, self.journal, rec.name in self.fail_load,
                                       self.load_s.get(rec.name, 0.0)),
                agent=FakeAgent(self.reports.get(rec.name, OK_REPORT)))
        self.vms.add(vm)
        return vm

    def release(self, rec: VmRecord, keep_logs: bool = False, reason: str = "stopped") -> None:
        self.released.append((rec.name, reason))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rec.overlay)
        self.vms.announce_gone(rec, reason)

    async def abandon(self, name: str, exc: BaseException | None = None) -> None:
        self.abandoned.append((name, exc))
        vm = self.vms.detach(name)
        if vm is not None:
            await vm.qemu.stop()
        rec = self.vms.record(name) or (vm.rec if vm is not None else None)
        if rec is not None:
            self.release(rec, reason="failed to start" if exc else "stopped")
            self.vms.delete(name)

    async def stop(self, name: str) -> dict:
        vm = self.vms.detach(name)
        rec = vm.rec if vm is not None else self.vms.record(name)
        if rec is None:
            raise NotFound(f"no VM named {name}")
        self.release(rec)
        self.vms.delete(name)
        return {"name": name, "state": "stopped"}


class StandInNet:
    """The part of FamilyNetwork a Family reads (its options) and that goes down with it."""
    nat = False
    open_ports = ()

    def __init__(self):
        self.downs = 0

    def down(self):
        self.downs += 1


class FakeFamilies:
    """ensure, free_ids, add, drop_if_empty as the Cloner uses them; leave_soon is
    what hostd wires to the registry's "gone" event."""

    def __init__(self):
        self.by_name: dict[str, Family] = {}
        self.calls: list[tuple] = []
        self.fail_add: Exception | None = None

    async def ensure(self, name: str, number: int | None = None, options=None) -> Family:
        self.calls.append(("ensure", name))
        fam = self.by_name.get(name)
        if fam is None:
            fam = self.by_name[name] = Family(name=name, number=number or FAMILY_NO, net=StandInNet())
        return fam

    def free_ids(self, fam: Family, count: int, name_taken=lambda name: False) -> list[int]:
        self.calls.append(("free_ids", fam.name, count))
        used = set(fam.members.values())
        return [k for k in range(1, netplan.MAX_ID + 1)
                if k not in used and not name_taken(netplan.hostname(fam.name, k))][:count]

    async def add(self, fam: Family, members: list[tuple[str, int]]) -> dict[str, str]:
        self.calls.append(("add", fam.name, list(members)))
        if self.fail_add is not None:
            raise self.fail_add
        fam.members.update(members)
        return {vm: netplan.tap_name(fam.number, k) for vm, k in members}

    def drop_if_empty(self, fam: Family) -> None:
        self.calls.append(("drop_if_empty", fam.name))
        if not fam.members:
            self.drop(fam)

    def leave_soon(self, vm: str) -> None:
        for fam in list(self.by_name.values()):
            if fam.members.pop(vm, None) is not None and not fam.members:
                self.drop(fam)

    def drop(self, fam: Family) -> None:
        self.by_name.pop(fam.name, None)
        fam.net.down()

    def of_vm(self, vm: str) -> Family | None:
        return next((f for f in self.by_name.values() if vm in f.members), None)

    def remote_member(self, name: str):
        return next(((f, *f.remote[name]) for f in self.by_name.values() if name in f.remote), None)

    def is_up(self, name: str) -> bool:
        return name in self.by_name


# -- the world ----------------------------------------------------------------------
def make_checkpoint(root, family: str = "p", guest_req: int | None = None, driver: str = "direct") -> Checkpoint:
    d = root / "checkpoints" / "p-ck1"
    d.mkdir(parents=True)
    (d / "state").write_bytes(STATE)
    with open(d / "ram", "wb") as f:
        f.truncate(SPEC.mem_mb << 20)   # sparse
    (d / "overlay.qcow2").write_bytes(TEMPLATE)   # what each clone's overlay starts as
    disks = root / "disks"
    disks.mkdir(exist_ok=True)
    base, top = disks / "image.qcow2", disks / "p-1.qcow2"
    for p in (base, top):
        p.write_bytes(b"QFI\xfb")
    c = Checkpoint(id="p-ck1", vm="p", path=str(d), machine=SPEC.to_json(), disk=str(top),
                   disk_chain=(str(base),), state_sha256=hashlib.sha256(STATE).hexdigest(), state_size=len(STATE),
                   ram_size=SPEC.mem_mb << 20, ram_allocated=0, mode="paused", pause_ms=1.0,
                   qemu_version="QEMU emulator version 7.2.0", family=family, guest_req=guest_req,
                   driver=driver)
    c.write()
    return Checkpoint.load(d)


def record(name: str, role: VmRole, state: VmState = VmState.RUNNING, netid: int = 0) -> VmRecord:
    return VmRecord(name=name, role=role, state=state, spec=SPEC.to_json(), overlay="", ram_path="",
                    qmp_path="", agent_path="", log_path="", serial_log="", family="p", family_no=FAMILY_NO,
                    netid=netid)


def build(tmp_path, budget=Budget(mem_mb=4096, vcpus=16), parent=True, tickets: TicketBook | None = None):
    store = Store(tmp_path / "state.db")
    vms = VmRegistry(store)
    runtime = FakeRuntime(tmp_path, vms)
    families = FakeFamilies()
    vms.on_gone(lambda rec, _reason: families.leave_soon(rec.name))   # as hostd wires it

    def usage() -> Usage:   # what Host.usage counts: live records, and the room tickets hold
        live = [r for r in vms.records() if r.state not in (VmState.STOPPED, VmState.CRASHED)]
        held_mb, held_cpus = tickets.reserved() if tickets is not None else (0, 0)
        return Usage(mem_mb=sum(r.spec["mem_mb"] for r in live) + held_mb,
                     vcpus=sum(r.spec["cpus"] for r in live) + held_cpus)

    admission = Admission(budget, usage)
    ckpt = make_checkpoint(tmp_path)

    def find(ref: str) -> Checkpoint:
        if ref != ckpt.id:
            raise NotFound(f"no checkpoint {ref}")
        return Checkpoint.load(ckpt.path)

    cloner = Cloner(runtime, vms, admission, families, find)
    if parent:
        # The parent runs, in its family: ID 0, and its record counts against the budget.
        vms.add(Vm(rec=record("p", VmRole.PARENT), qemu=FakeQemu("p", []), agent=None))
        families.by_name["p"] = Family(name="p", number=FAMILY_NO, net=StandInNet(), members={"p": 0})
    return SimpleNamespace(store=store, vms=vms, runtime=runtime, families=families, admission=admission,
                           cloner=cloner, ckpt=ckpt, tickets=tickets)


def clone_records(w) -> list[VmRecord]:
    return [r for r in w.vms.records() if r.role == VmRole.CLONE]


# -- host side: sfmpi clone CKPT -n N ------------------------------------------------------
def test_a_checkpoint_of_the_other_driver_is_refused_before_anything_is_reserved(tmp_path):
    # A libvirt domain's migration stream loads only into a libvirt domain (docs/libvirt.md).
    w = build(tmp_path)
    libvirt_ckpt = Checkpoint.load(w.ckpt.path)
    libvirt_ckpt = Checkpoint(**{**{k: getattr(libvirt_ckpt, k) for k in Checkpoint.__dataclass_fields__},
                                 "driver": "libvirt"})
    w.cloner.find = lambda _ref: libvirt_ckpt
    with pytest.raises(UsageError, match="taken under the libvirt driver.*this hostd runs the direct driver"):
        asyncio.run(w.cloner.clone(w.ckpt.id, 2))
    assert clone_records(w) == [] and w.runtime.launched == []
    assert w.families.by_name["p"].members == {"p": 0}


def test_a_clone_of_three_leaves_three_running_records_with_their_family_ids(tmp_path):
    w = build(tmp_path)
    # ID 2 is held by a clone of an earlier request; a crashed VM keeps the name p-1 until down.
    w.families.by_name["p"].members["p-2"] = 2
    w.store.put_vm(record("p-1", VmRole.CLONE, VmState.CRASHED, netid=1))

    res = asyncio.run(w.cloner.clone(w.ckpt.id, 3))

    assert res["checkpoint"] == w.ckpt.id and res["requested"] == 3 and res["granted"] == 3
    assert res["clones"] == ["p-3", "p-4", "p-5"] and res["ids"] == [3, 4, 5]
    recs = {r.name: r for r in clone_records(w) if r.state != VmState.CRASHED}
    assert sorted(recs) == ["p-3", "p-4", "p-5"]
    for name, rec in recs.items():
        k = int(name.split("-")[1])
        assert rec.state == VmState.RUNNING and rec.role == VmRole.CLONE
        assert (rec.family, rec.family_no, rec.netid) == ("p", FAMILY_NO, k)
        assert rec.checkpoint == w.ckpt.id and rec.ticket == ""
        assert rec.ram_path == str(w.ckpt.ram_file)   # the checkpoint's RAM, mapped privately
        assert rec.backing == (w.ckpt.disk, *w.ckpt.disk_chain)
        assert w.vms.find(name).rec == rec            # the live copy is the stored one
    assert w.families.by_name["p"].members == {"p": 0, "p-2": 2, "p-3": 3, "p-4": 4, "p-5": 5}
    assert ("add", "p", [("p-3", 3), ("p-4", 4), ("p-5", 5)]) in w.families.calls
    # Each clone is greeted with its own identity (host side: `identify`) and waited for.
    for name in recs:
        k = int(name.split("-")[1])
        agent = w.vms.find(name).agent
        (greeting,) = agent.sent
        assert greeting["op"] == "identify"
        assert greeting["identity"] == {**netplan.identity(FAMILY_NO, "p", k), "id": k, "netid": k, "ticket": None,
                                        "host": ""}
        assert greeting["checkpoint"] == {"id": w.ckpt.id, "family": "p"}
        assert agent.waited == ["identified"]
    assert w.runtime.abandoned == []


def test_each_clone_starts_on_a_copy_of_the_template_with_the_checkpoints_state(tmp_path):
    w = build(tmp_path)
    asyncio.run(w.cloner.clone(w.ckpt.id, 2))
    assert [lc.name for lc in w.runtime.launched] == ["p-1", "p-2"]
    for lc in w.runtime.launched:
        rec = w.vms.find(lc.name).rec
        assert lc.overlay == TEMPLATE and rec.overlay != str(w.ckpt.overlay_template)
        argv = lc.argv
        assert argv[argv.index("-incoming") + 1] == "defer"
        assert f"mem-path={w.ckpt.ram_file},share=off" in argv[argv.index("-object") + 1]
        assert f"mac={netplan.mac(FAMILY_NO, rec.netid)}" in " ".join(argv)
        assert len(lc.fds) == 1
        qemu = w.vms.find(lc.name).qemu
        assert dict(qemu.commands)["migrate-incoming"] == {"uri": f"fd:{lc.fds[0]}"}


def test_the_qmp_commands_of_each_clone_come_in_order_and_all_resume_together(tmp_path):
    w = build(tmp_path)
    w.runtime.load_s["p-3"] = 0.05    # the others are ready long before it
    res = asyncio.run(w.cloner.clone(w.ckpt.id, 3))
    for name in res["clones"]:
        qemu = w.vms.find(name).qemu
        assert [c for c, _ in qemu.commands] == QMP_ORDER
        caps = qemu.commands[0][1]["capabilities"]
        assert {c["capability"]: c["state"] for c in caps} == {"events": True, "x-ignore-shared": True}
    # The barrier: no clone continues before every clone's state has loaded.
    journal = w.runtime.journal
    last_load = max(i for i, (_vm, what) in enumerate(journal) if what == "loaded")
    first_cont = min(i for i, (_vm, what) in enumerate(journal) if what == "cont")
    assert last_load < first_cont, journal


def test_a_capacity_refusal_comes_before_anything_is_reserved_or_launched(tmp_path):
    # The parent holds 256 of 512 MiB: one more VM of 256 MiB fits, not three.
    w = build(tmp_path, budget=Budget(mem_mb=512, vcpus=16))
    with pytest.raises(CapacityError, match="room for 1 more"):
        asyncio.run(w.cloner.clone(w.ckpt.id, 3))
    assert w.runtime.launched == [] and clone_records(w) == []
    assert w.families.calls == []          # not even the family was touched
    assert w.families.by_name["p"].members == {"p": 0}
    # Taking what fits is the caller's choice.
    res = asyncio.run(w.cloner.clone(w.ckpt.id, 3, allow_fewer=True))
    assert res["granted"] == 1 and res["clones"] == ["p-1"]


@pytest.mark.parametrize("parent", [True, False], ids=["family-with-parent", "family-made-for-the-clones"])
def test_one_clone_failing_to_reidentify_undoes_the_whole_request(tmp_path, parent):
    w = build(tmp_path, parent=parent)
    w.runtime.reports["p-2"] = {"ok": False, "error": "hook 10-net failed: exit 3"}
    with pytest.raises(CloneError) as ei:
        asyncio.run(w.cloner.clone(w.ckpt.id, 3))
    assert "clone 2 (p-2)" in str(ei.value) and "hook 10-net failed: exit 3" in str(ei.value)
    # Never half-done: every clone is abandoned, none is left in the registry or the store.
    assert sorted(name for name, _ in w.runtime.abandoned) == ["p-1", "p-2", "p-3"]
    assert all(exc is ei.value for _, exc in w.runtime.abandoned)
    assert clone_records(w) == [] and sorted(w.vms.live) == (["p"] if parent else [])
    assert all(w.vms.find(n) is None for n in ("p-1", "p-2", "p-3"))
    assert not any(f.name.startswith("p-") for f in (tmp_path / "disks").glob("p-?-*.qcow2"))
    # The family does not keep them: it stays with its parent, or goes if it was made for them.
    if parent:
        assert w.families.by_name["p"].members == {"p": 0}
    else:
        assert not w.families.is_up("p")


def test_a_clone_whose_state_does_not_load_stops_the_others_before_they_resume(tmp_path):
    w = build(tmp_path)
    w.runtime.fail_load.add("p-2")
    w.runtime.load_s.update({"p-1": 0.0, "p-2": 0.02, "p-3": 0.0})   # the others wait at the barrier
    with pytest.raises(QemuError, match="p-2: migration failed"):   # the cause, not the broken barrier
        # (bounded: a clone left waiting at the barrier would wait forever)
        asyncio.run(asyncio.wait_for(w.cloner.clone(w.ckpt.id, 3), 10.0))
    assert not any(what == "cont" for _vm, what in w.runtime.journal), "a clone resumed alone"
    assert sorted(name for name, _ in w.runtime.abandoned) == ["p-1", "p-2", "p-3"]
    assert clone_records(w) == [] and w.families.by_name["p"].members == {"p": 0}


@pytest.mark.parametrize("parent", [True, False], ids=["family-with-parent", "family-made-for-the-clones"])
def test_a_network_failure_while_reserving_launches_nothing_and_leaves_no_family_up(tmp_path, parent):
    w = build(tmp_path, parent=parent)
    w.families.fail_add = NetworkError("family p: nft refused the rules (fault injected)")
    with pytest.raises(NetworkError):
        asyncio.run(w.cloner.clone(w.ckpt.id, 2))
    assert w.runtime.launched == [] and clone_records(w) == []
    assert sorted(name for name, _ in w.runtime.released) == ["p-1", "p-2"]
    assert ("drop_if_empty", "p") in w.families.calls
    assert w.families.is_up("p") == parent


# -- in the guest: clone(ticket) through the clone API -----------------------------------
class ParentPort:
    """The parent's agent channel, as CloneApi sees it: it only collects answers."""
    vm_name = "p"

    def __init__(self):
        self.answers: dict[int, dict] = {}

    async def answer(self, req_id, result=None, error=None):
        assert req_id not in self.answers, f"request {req_id} answered twice"
        self.answers[req_id] = {"ok": error is None, **(result or {})} if error is None else \
            {"ok": False, "error": {"type": error[0], "message": error[1]}}


def guest_side(w) -> GuestSide:
    """hostd's real CloneHost over these parts (quotas and checkpoints taken are stand-ins)."""
    async def take_for_guest(name, mode, guest_req, ticket):
        assert (name, mode, guest_req) == ("p", "paused", None)
        return Checkpoint.load(w.ckpt.path)
    host = SimpleNamespace(
        vms=w.vms, admission=w.admission, cloner=w.cloner, families=w.families, runtime=w.runtime,
        store=w.store, checkpoints=SimpleNamespace(take_for_guest=take_for_guest), clone_memory="local", span=None,
        retention=SimpleNamespace(ticket_ended=lambda ticket: None),
        quotas=SimpleNamespace(room=lambda family, mem_mb, cpus: 1 << 16, check_ticket=lambda family: None,
                               check_checkpoint=lambda family: None))
    return GuestSide(host)


def clone_api_world(tmp_path, **kwargs):
    book = TicketBook()
    w = build(tmp_path, tickets=book, **kwargs)
    api = CloneApi(guest_side(w), book)
    w.vms.on_gone(api.vm_gone)   # as hostd wires it
    return w, api, book


async def ticket_then_clone(api: CloneApi, n: int) -> tuple[ParentPort, str]:
    port = ParentPort()
    await api.handle(port, {"req": 1, "op": "ticket", "n": n})
    assert port.answers[1]["ok"], port.answers
    t = port.answers[1]["ticket"]["id"]
    await api.handle(port, {"req": 2, "op": "clone", "ticket": t})
    return port, t


def test_clone_of_a_ticket_answers_the_parent_once_every_clone_is_greeted(tmp_path):
    w, api, book = clone_api_world(tmp_path)
    # A clone may call exit the moment it resumes: its slot is there before any clone starts.
    slots_at_launch = []
    w.runtime.on_launch = lambda rec: slots_at_launch.append([s.vm for s in book.slots.get(rec.ticket, [])])
    port, t = asyncio.run(ticket_then_clone(api, 3))
    assert slots_at_launch == [["p-1", "p-2", "p-3"]] * 3
    ans = port.answers[2]
    assert ans["ok"] is True and ans["id"] == 0 and ans["size"] == 3 and ans["ticket"] == t
    assert ans["ip"] == str(netplan.ip(FAMILY_NO, 0)) and ans["hostname"] == "p"
    recs = clone_records(w)
    assert sorted(r.name for r in recs) == ["p-1", "p-2", "p-3"]
    assert all(r.state == VmState.RUNNING and r.ticket == t for r in recs)
    # Each clone is answered on the parent's pending call, with its own ID and address.
    for k in (1, 2, 3):
        (greeting,) = w.vms.find(f"p-{k}").agent.sent
        assert (greeting["re"], greeting["id"], greeting["size"], greeting["ticket"]) == (2, k, 3, t)
        assert greeting["ip"] == str(netplan.ip(FAMILY_NO, k)) and greeting["hostname"] == f"p-{k}"
        assert w.vms.find(f"p-{k}").agent.waited == ["cloned"]
    assert book.tickets[t].state == TicketState.CLONED
    assert [(s.index, s.vm) for s in book.slots[t]] == [(1, "p-1"), (2, "p-2"), (3, "p-3")]
    assert book.reserved() == (0, 0)     # the clones are VMs now: their records count, not the ticket


def test_a_failing_clone_fails_the_clone_call_spends_the_ticket_and_leaves_no_clone(tmp_path):
    w, api, book = clone_api_world(tmp_path)
    w.runtime.reports["p-3"] = {"ok": False, "error": "hook 50-mpi failed: timed out after 60 s"}
    port, t = asyncio.run(ticket_then_clone(api, 3))
    ans = port.answers[2]
    assert ans["ok"] is False and ans["error"]["type"] == "CloneError"
    assert f"ticket {t}" in ans["error"]["message"] and "clone 3 (p-3)" in ans["error"]["message"]
    assert sorted(name for name, _ in w.runtime.abandoned) == ["p-1", "p-2", "p-3"]
    assert clone_records(w) == [] and w.families.by_name["p"].members == {"p": 0}
    assert book.tickets[t].state == TicketState.KILLED
    assert all(s.ended.is_set() and s.failure for s in book.slots[t])
    assert book.reserved() == (0, 0)


def test_a_ticket_is_refused_when_the_host_has_no_room_before_anything_launches(tmp_path):
    w, api, book = clone_api_world(tmp_path, budget=Budget(mem_mb=256, vcpus=16))   # the parent fills it
    port = ParentPort()
    asyncio.run(api.handle(port, {"req": 1, "op": "ticket", "n": 2}))
    assert port.answers[1]["ok"] is False and port.answers[1]["error"]["type"] == "CapacityError"
    assert book.tickets == {} and w.runtime.launched == [] and w.families.calls == []


def test_a_parent_gone_in_the_middle_of_its_clone_call_leaves_no_clone(tmp_path):
    # Its agent channel closes, which cancels the call: the Cloner is interrupted
    # mid-start, and the clone API stops what it had started.
    w, api, book = clone_api_world(tmp_path)
    w.runtime.load_s["p-2"] = 30.0

    async def main():
        port = ParentPort()
        await api.handle(port, {"req": 1, "op": "ticket", "n": 3})
        t = port.answers[1]["ticket"]["id"]
        call = asyncio.ensure_future(api.handle(port, {"req": 2, "op": "clone", "ticket": t}))
        while len(w.runtime.launched) < 3 or not any(what == "loaded" for _vm, what in w.runtime.journal):
            await asyncio.sleep(0.001)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        return t

    t = asyncio.run(asyncio.wait_for(main(), 10.0))
    assert clone_records(w) == [] and sorted(w.vms.live) == ["p"]
    assert sorted(name for name, _ in w.runtime.released) == ["p-1", "p-2", "p-3"]
    assert w.families.by_name["p"].members == {"p": 0}
    assert book.tickets[t].state == TicketState.KILLED and book.reserved() == (0, 0)
