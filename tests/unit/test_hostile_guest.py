"""A hostile guest, without VMs: whatever a guest writes to its agent port, hostd stays up and answers.

hostd's end is the real AgentChannel, connected over a real Unix socket that
this test listens on (as QEMU's chardev would); the accepted end is "the
guest". Its calls go to the real CloneApi and TicketBook; only the rest of
hostd (CloneHost: checkpoints, clones, VMs) is a fake, with one parent VM.

What every example must show:
- the channel's read loop still runs (hostd stays up);
- every line that parses as a JSON object and carries a valid request id (an
  integer 1..2**53) gets exactly one answer with that "re"; an invalid call is an
  error (ok false, with an error type), never a crash of hostd (HostdError);
- a line that cannot be parsed (not JSON, nested beyond what the parser may
  see) gets no answer: nothing in it can be trusted, not even its request id;
  nor does anything that is not a call (events, answers replayed as if the guest
  answered itself); a line longer than schemas.MAX_LINE that starts with its
  request id (as the agent writes them) gets an error, or a program that passed
  a huge argument would wait forever (join has no timeout of its own);
- no ticket is left cloning, every change of a ticket's state follows its
  lifecycle (CheckedBook), and once all tickets are killed no room is held and
  no clone runs.
A sentinel call at the end of each example says that every line before it was
read and acted on (the channel handles lines in order).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sfmpi import errors
from sfmpi.errors import CheckpointError, CloneError, NotFound
from sfmpi.hostd.fork.cloner import greeting_from
from sfmpi.hostd.guestapi import schemas
from sfmpi.hostd.guestapi.channel import AgentChannel
from sfmpi.hostd.guestapi.clone_api import CloneApi
from sfmpi.hostd.guestapi.tickets import TicketBook, TicketState
from sfmpi.hostd.state.records import VmRecord, VmRole, VmState
from sfmpi.hostd.vm.registry import Vm

PARENT = "p"
FAMILY_LIMIT = 8
HOST_ROOM = 6
SENTINEL = 10 ** 9          # request ids of the harness's own calls: far above the examples'
KILL_ALL = 2 * 10 ** 9
ANSWER_TIMEOUT = 5.0
_socket_names = itertools.count()

FUZZ = settings(max_examples=250, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
SEQUENCES = settings(max_examples=150, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# -- the rest of hostd, faked ---------------------------------------------------
def record(name: str, role: VmRole, ticket: str = "", netid: int = 0) -> VmRecord:
    return VmRecord(name=name, role=role, state=VmState.RUNNING, spec={"mem_mb": 256, "cpus": 1},
                    overlay="", ram_path="", qmp_path="", agent_path="", log_path="", serial_log="",
                    family=PARENT, family_no=7, netid=netid, ticket=ticket)


@dataclass(frozen=True)
class FakeCheckpoint:
    """What CloneApi reads of a checkpoint."""
    id: str
    vm: str
    family: str
    guest_req: int | None
    resources: dict = field(default_factory=dict)


class FakeHost:
    """CloneHost with one parent VM. fail: None, or where a clone request fails:
    "checkpoint" (taking it), "clone" (a clone fails and the cloner abandons them
    all, as the real Cloner does), "leaky" (it fails and leaves its clones to the
    clone API), "bug" (a plain exception)."""

    def __init__(self, fail: str | None = None, hold: asyncio.Event | None = None, stop_s: float = 0.0):
        self.fail = fail
        self.hold = hold   # when given, a clone call waits for it once its clones are registered
        self.stop_s = stop_s   # how long stopping a VM takes (the real stop waits for QEMU)
        self.vms: dict[str, Vm] = {PARENT: Vm(rec=record(PARENT, VmRole.PARENT), qemu=None)}
        self.api: CloneApi | None = None   # gets the VM registry's "gone" event
        self.checkpoints: dict[str, FakeCheckpoint] = {}
        self.greetings: dict[str, list[dict]] = defaultdict(list)   # ticket -> first messages of its clones
        self.stopped: list[str] = []
        self.ended: list[str] = []
        self._ckpt_ids = itertools.count(1)
        self._clone_ids = itertools.count(1)

    def vm(self, name):
        return self.vms.get(name)

    def is_member(self, name):
        return name in self.vms

    async def forward_exit(self, name, status):
        return False

    def room(self, family, mem_mb, cpus):
        assert isinstance(mem_mb, int) and isinstance(cpus, int)
        return HOST_ROOM

    def room_here(self, family, mem_mb, cpus):
        return HOST_ROOM

    async def place_ticket(self, family, n, mem_mb, cpus, ticket, room_here):
        return None          # one host: no master

    def check_ticket_quota(self, family):
        pass

    def check_checkpoint_quota(self, family):
        pass

    async def checkpoint(self, name, mode, guest_req, ticket):
        await asyncio.sleep(0)
        if self.fail == "checkpoint":
            raise CheckpointError(f"VM {name}: checkpoint failed (fault injected)")
        # A request id is what the agent's counter sends: a real integer.
        assert guest_req is None or type(guest_req) is int
        ckpt = FakeCheckpoint(id=f"ck-{next(self._ckpt_ids)}", vm=name, family=PARENT, guest_req=guest_req)
        self.checkpoints[ckpt.id] = ckpt
        return ckpt

    def checkpoint_of_family(self, ckpt_id, family):
        ckpt = self.checkpoints.get(ckpt_id)
        if ckpt is None or ckpt.family != family:
            raise NotFound(f"no checkpoint {ckpt_id} in family {family}")
        return ckpt

    async def clone_for_ticket(self, ckpt, count, ticket, greeting, on_reserved, placement=None):
        assert type(count) is int and 1 <= count <= HOST_ROOM
        names = [f"{PARENT}-{next(self._clone_ids)}" for _ in range(count)]
        for k, name in enumerate(names, 1):
            self.vms[name] = Vm(rec=record(name, VmRole.CLONE, ticket, k), qemu=None)
        on_reserved(names)
        await asyncio.sleep(0)
        if self.hold is not None:
            await self.hold.wait()
        if self.fail in ("clone", "leaky"):
            if self.fail == "clone":
                for name in names:
                    self._gone(name, "failed to start")
            raise CloneError(f"clone 1 ({names[0]}): hook 10-net failed (fault injected)")
        if self.fail == "bug":
            raise RuntimeError("a bug in hostd (fault injected)")
        for k, name in enumerate(names, 1):
            ident = {"id": k, "family": PARENT, "ip": f"10.100.7.{k + 2}", "hostname": name}
            greet, _awaited = greeting_from(greeting)
            self.greetings[ticket].append(greet(ident, {"time": 0.0}))
        return {"total_ms": 3.0, "resumed_ms": 2.0}

    def identity_of(self, name):
        return {"family": PARENT, "ip": "10.100.7.2", "hostname": name} if name in self.vms else {}

    def family_hosts(self, name):
        return [[PARENT, "10.100.7.2"]]

    async def stop_vm(self, name):
        self.stopped.append(name)
        await asyncio.sleep(self.stop_s)
        if name not in self.vms:
            raise NotFound(f"no VM named {name}")
        self._gone(name, "stopped")

    def _gone(self, name, reason):
        vm = self.vms.pop(name)
        if self.api is not None:
            self.api.vm_gone(vm.rec, reason)

    def ticket_ended(self, ticket):
        self.ended.append(ticket)

    def clones(self) -> list[str]:
        return [n for n, vm in self.vms.items() if vm.rec.role == VmRole.CLONE]


G, CING, CED, J, K = (TicketState.GRANTED, TicketState.CLONING, TicketState.CLONED, TicketState.JOINED,
                      TicketState.KILLED)
# The lifecycle (docs/clone-api.md): granted -> cloned -> joined | killed; a
# killed ticket may still be joined (its statuses collected) or killed again;
# joined is final (two joins waiting together both return).
LIFECYCLE = {(G, CING), (G, K), (CING, CED), (CING, K), (CED, J), (CED, K), (K, K), (K, J), (J, J)}


class CheckedBook(TicketBook):
    """The real TicketBook, with every change of a ticket's state checked against the lifecycle."""

    def set_state(self, t, state, **changes):
        now = self.tickets.get(t.id)
        if now is not None:
            assert (now.state, state) in LIFECYCLE, f"ticket {t.id}: {now.state.value} -> {state.value}"
        return super().set_state(t, state, **changes)


# -- the guest's end of the port -------------------------------------------------
def _refuse_constant(name):
    raise AssertionError(f"hostd wrote {name} to the guest")


class Guest:
    """Writes lines to hostd and collects what comes back, by "re"."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hostd_reads):
        self.reader, self.writer = reader, writer
        self.hostd_reads = hostd_reads   # () -> bool: hostd's read loop still runs
        self.answers: dict[int, list[dict]] = defaultdict(list)
        self.strays: list = []          # anything that is not an answer to a call
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while line := await self.reader.readline():
            try:
                msg = json.loads(line, parse_constant=_refuse_constant)
            except Exception as exc:
                msg = ("unreadable", line, exc)
            if isinstance(msg, dict) and type(msg.get("re")) is int:
                self.answers[msg["re"]].append(msg)
            else:
                self.strays.append(msg)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self, req: int, timeout: float = ANSWER_TIMEOUT) -> dict:
        await until(lambda: bool(self.answers.get(req)) or not self.hostd_reads(), f"request {req} is answered",
                    timeout)
        assert self.answers.get(req), f"hostd's read loop ended before it answered request {req}"
        return self.answers[req][0]

    async def call(self, msg: dict, timeout: float = ANSWER_TIMEOUT) -> dict:
        await self.send((json.dumps(msg) + "\n").encode())
        return await self.answer(msg["req"], timeout)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def session(sock_dir, host: FakeHost, book: TicketBook):
    """hostd's AgentChannel for VM `p`, connected to a socket the guest listens on."""
    path = str(sock_dir / f"agent{next(_socket_names)}.sock")
    accepted: asyncio.Future = asyncio.get_running_loop().create_future()
    server = await asyncio.start_unix_server(lambda r, w: accepted.set_result((r, w)), path=path,
                                             limit=1 << 20)
    api = CloneApi(host, book)
    host.api = api
    channel = AgentChannel(PARENT, path)
    channel.on_request = api.handle
    guest = None
    try:
        await channel.connect()
        reader, writer = await asyncio.wait_for(accepted, ANSWER_TIMEOUT)
        guest = Guest(reader, writer, hostd_reads=lambda: not channel._task.done())
        yield channel, api, guest
    finally:
        if guest is not None:
            await guest.close()
        await channel.close()
        server.close()
        await server.wait_closed()
        with contextlib.suppress(Exception):
            for task in list(api._tasks):
                task.cancel()
            await asyncio.gather(*api._tasks, return_exceptions=True)


async def until(predicate, what: str, timeout: float = ANSWER_TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.001)


async def kill_every_ticket(guest: Guest, book: TicketBook, host: FakeHost, channel: AgentChannel,
                            api: CloneApi) -> None:
    """The guest kills all its tickets; then hostd has nothing in progress and holds no room."""
    # Clone calls still under way finish first (the fake's steps are instant).
    await until(lambda: all(t.state != TicketState.CLONING for t in book.tickets.values()),
                "no ticket is cloning")
    for i, t in enumerate(list(book.tickets.values())):
        ans = await guest.call({"req": KILL_ALL + i, "op": "kill", "ticket": t.id})
        assert ans["ok"] is True, ans
    # Pending joins return once their clones are killed; timeouts are cancelled.
    # (hostd's sets of tasks in progress: peeked at only to know when it is idle.)
    await until(lambda: not channel._requests and not api._tasks, "hostd is idle")
    assert all(t.state != TicketState.CLONING for t in book.tickets.values())
    assert book.reserved() == (0, 0)
    assert host.clones() == [], "a clone of a killed ticket runs on"
    for slots in book.slots.values():
        assert all(s.ended.is_set() for s in slots)


# -- what a hostile guest writes -------------------------------------------------
class Raw(str):
    """JSON text written as is: numbers json.dumps cannot write (1e400) and tokens
    Python's json writes and reads though they are not JSON (NaN, Infinity)."""


def dump(v) -> str:
    if isinstance(v, Raw):
        return str(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dump(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(dump(x) for x in v) + "]"
    return json.dumps(v)


def value_of(v):
    """What a (possibly Raw) value reads as."""
    if isinstance(v, Raw):
        return json.loads(v)
    if isinstance(v, dict):
        return {k: value_of(x) for k, x in v.items()}
    if isinstance(v, list):
        return [value_of(x) for x in v]
    return v


def is_int(v) -> bool:
    return type(v) is int


def is_number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


# What each field of a call may be (docs/clone-api.md), written out here, not taken from schemas.py.
VALID_FIELD = {
    "n": lambda v: is_int(v) and 1 <= v <= schemas.MAX_CLONES,
    "timeout": lambda v: v is None or (is_number(v) and 0 < v <= 7 * 24 * 3600),
    "ticket": lambda v: isinstance(v, str) and 1 <= len(v) <= 128,
    "checkpoint": lambda v: isinstance(v, str) and len(v) <= 128 and re.fullmatch(r"[a-z0-9][a-z0-9-]*", v),
    "status": lambda v: v is None or (is_int(v) and 0 <= v <= 255),
    # Settings by name (docs/monitoring.md); any dict of known names counts as
    # valid here, so that a bad one is always refused for its names or its shape.
    "resources": lambda v: v is None or (isinstance(v, dict) and all(k in RESOURCE_NAMES for k in v)),
}
RESOURCE_NAMES = ("cpu_shares", "cpu_limit", "mem_limit", "disk_iops", "disk_bps", "net_rate", "priority")
FIELDS = {"ticket": ("n", "timeout", "resources"), "clone": ("ticket",), "create_clones": ("checkpoint", "ticket"),
          "exit": ("status",), "join": ("ticket", "timeout"), "kill": ("ticket",), "members": ("ticket",)}
# Tickets are "p-tN", checkpoints "ck-N": a bogus one never names a real one.
bogus_ticket = st.text(min_size=1, max_size=128).filter(lambda s: not s.startswith("p-t"))
bogus_checkpoint = st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,40}\Z").filter(lambda s: not s.startswith("ck-"))


def valid_call(op: str, draw) -> dict:
    fields = {"ticket": {"n": draw(st.integers(1, 8)), "timeout": draw(st.sampled_from([None, 30, 0.5])),
                         "resources": draw(st.sampled_from([None, {}, {"priority": "low"},
                                                            {"cpu_limit": 50, "net_rate": "10mbit"},
                                                            {"cpu_shares": None}]))},
              "clone": {"ticket": draw(bogus_ticket)}, "checkpoint": {},
              "create_clones": {"checkpoint": draw(bogus_checkpoint), "ticket": draw(bogus_ticket)},
              "exit": {"status": draw(st.integers(0, 255))},
              "join": {"ticket": draw(bogus_ticket), "timeout": 1}, "kill": {"ticket": draw(bogus_ticket)},
              "members": {"ticket": draw(bogus_ticket)}}
    return {"op": op, **fields[op]}


SPECIAL_VALUES = [Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e400"), Raw("-1e400"), Raw("1e-400"),
                  Raw("-0"), Raw("-0.0"), Raw("1E2"), 10 ** 30, -10 ** 30, 2 ** 53, 2 ** 53 + 1, 2 ** 64, 0, -1,
                  256, 4097, 1.0, 2.0, 0.5, True, False, None, "", "1", "x" * 12, [], {}, [1], {"n": 1}]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=20))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                         max_size=3),
                           max_leaves=8)
any_value = st.one_of(json_values, st.sampled_from(SPECIAL_VALUES))


def bad_value(field: str):
    return any_value.filter(lambda v: not VALID_FIELD[field](value_of(v)))


class _Id:
    def __repr__(self):
        return "ID"


ID = _Id()   # where a line's request id goes (None is one of the bad ids)


@dataclass
class Line:
    """One line to write. expect: "error" (exactly one answer, ok false), "any"
    (exactly one answer), "none" (no answer). The request id is filled in later."""
    msg: object                 # a dict whose "req" may be ID, or bytes as they are
    expect: str

    def render(self, req: int | None) -> bytes:
        if isinstance(self.msg, bytes):
            return self.msg + b"\n"
        msg = dict(self.msg)
        if msg.get("req") is ID:
            msg["req"] = req
        return (dump(msg) + "\n").encode()


@st.composite
def wrong_field(draw) -> Line:
    op = draw(st.sampled_from(sorted(FIELDS)))
    msg = valid_call(op, draw)
    field = draw(st.sampled_from(FIELDS[op]))
    if draw(st.booleans()) and field in schemas.REQUESTS[op].get("required", ()):
        msg.pop(field)                       # a required field left out
    else:
        msg[field] = draw(bad_value(field))
    return Line({"req": ID, **msg}, "error")


@st.composite
def wrong_op(draw) -> Line:
    op = draw(any_value.filter(lambda v: not (isinstance(value_of(v), str) and value_of(v) in schemas.REQUESTS)))
    return Line({"req": ID, "op": op, "ticket": "p-t1", "n": 1}, "error")


@st.composite
def wrong_req(draw) -> Line:
    """A call whose request id is no valid id: there is nothing to answer it on."""
    req = draw(any_value.filter(lambda v: not (is_int(value_of(v)) and 1 <= value_of(v) <= schemas.REQ_ID_MAX)))
    msg = valid_call(draw(st.sampled_from(sorted(FIELDS) + ["checkpoint"])), draw)
    return Line({"req": req, **msg}, "none")


@st.composite
def plausible_call(draw) -> Line:
    """Valid calls naming tickets and checkpoints that may exist by now (ticket,
    then clone, then join or kill): answered, ok or not."""
    op = draw(st.sampled_from(["ticket", "ticket", "clone", "checkpoint", "create_clones", "join", "kill",
                               "members", "exit"]))
    ticket = f"p-t{draw(st.integers(1, 3))}"
    msg = {"ticket": {"op": "ticket", "n": draw(st.integers(1, 5)),
                      "timeout": draw(st.sampled_from([None, 0.01, 3600]))},
           "clone": {"op": "clone", "ticket": ticket}, "checkpoint": {"op": "checkpoint"},
           "create_clones": {"op": "create_clones", "checkpoint": f"ck-{draw(st.integers(1, 2))}",
                             "ticket": ticket},
           "join": {"op": "join", "ticket": ticket, "timeout": draw(st.sampled_from([None, 0.01]))},
           "kill": {"op": "kill", "ticket": ticket}, "members": {"op": "members", "ticket": ticket},
           "exit": {"op": "exit", "status": 0}}[op]
    # exit is for clones only: in the parent it is always refused.
    return Line({"req": ID, **msg}, "error" if op == "exit" else "any")


@st.composite
def deep(draw) -> Line:
    """Nesting. Up to what the parser may see, the call is parsed and refused
    with an answer; beyond (the guard before the parser), it is not parsed."""
    depth = draw(st.one_of(st.integers(1, 4 * schemas.MAX_DEPTH - 1), st.integers(4 * schemas.MAX_DEPTH, 50000)))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a": ', "}")]))
    value = Raw(opener * depth + "1" + closer * depth)
    answered = depth + 1 <= 4 * schemas.MAX_DEPTH   # brackets on the line, the outer object's included
    # A line too deep and also too long is refused for its length first, and
    # that refusal is answered (it starts with its request id).
    size = depth * (len(opener) + len(closer)) + 40
    assume(abs(size - schemas.MAX_LINE) > 100)
    answered = answered or size > schemas.MAX_LINE
    return Line({"req": ID, "op": "ticket", "n": value}, "error" if answered else "none")


@st.composite
def long_line(draw) -> Line:
    over = draw(st.booleans())
    size = draw(st.integers(schemas.MAX_LINE, schemas.MAX_LINE + 40000) if over
                else st.integers(1000, schemas.MAX_LINE - 200))
    msg = {"req": ID, "op": "ticket", "n": 1, "pad": "x" * size}
    return Line(msg, "error" if over else "any")


def _is_call(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data), dict)
    except Exception:
        return False


garbage = st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")),
    st.text(max_size=100).map(lambda s: s.replace("\n", "").encode()),
    st.sampled_from([b"", b"{", b"}", b"[1, 2]", b"null", b"7", b'"req"', b'{"req": 1', b"\xff\xfe{}"]),
    # more digits than Python reads as an integer (4300)
    st.integers(4301, 20000).map(lambda k: b'{"req": 1, "op": "ticket", "n": ' + b"9" * k + b"}"),
).filter(lambda b: not _is_call(b)).map(lambda b: Line(b, "none"))

not_a_call = st.one_of(
    # events, of kinds known or not, well-formed or not (nobody waits for them here)
    st.fixed_dictionaries({"ev": st.one_of(st.sampled_from(["cloned", "identified", "ready", "out", "exit",
                                                            "error", "ping", ""]), any_value)},
                          optional={"ok": any_value, "id": any_value, "code": any_value, "fd": any_value,
                                    "data": any_value, "error": any_value, "guest_ms": any_value,
                                    "message": any_value}),
    # answers replayed, as if the guest answered itself (one to the sentinel too)
    st.fixed_dictionaries({"re": st.one_of(st.integers(0, 40), st.just(SENTINEL), any_value),
                           "ok": st.booleans()},
                          optional={"id": st.integers(0, 5), "size": st.integers(0, 5), "error": any_value}),
    # neither req nor ev
    st.dictionaries(st.text(max_size=8).filter(lambda k: k not in ("req", "ev")), any_value, max_size=4),
    st.fixed_dictionaries({"op": st.sampled_from(sorted(FIELDS)), "ticket": st.just("p-t1"), "n": st.just(1)}),
).map(lambda d: Line((dump(d)).encode(), "none"))

hostile_line = st.one_of(wrong_field(), wrong_op(), wrong_req(), deep(), long_line(), garbage, not_a_call)


@st.composite
def lines(draw) -> list[Line]:
    """Hostile lines with a guest's valid calls among them, in order: a ticket,
    then clone (or checkpoint and create_clones) with it, then join, kill, ..."""
    skeleton = []
    start = draw(st.sampled_from(["clone", "create_clones", None]))
    if start is not None:
        skeleton.append(Line({"req": ID, "op": "ticket", "n": draw(st.integers(1, 4)),
                              "timeout": draw(st.sampled_from([None, 0.01, 3600]))}, "any"))
        if start == "create_clones":
            skeleton.append(Line({"req": ID, "op": "checkpoint"}, "any"))
            skeleton.append(Line({"req": ID, "op": "create_clones", "checkpoint": "ck-1", "ticket": "p-t1"},
                                 "any"))
        else:
            skeleton.append(Line({"req": ID, "op": "clone", "ticket": "p-t1"}, "any"))
    skeleton += draw(st.lists(plausible_call(), max_size=5))
    hostile = draw(st.lists(hostile_line, max_size=12))
    # Each valid call goes in at a place of its own among the hostile lines, in order.
    places = sorted(draw(st.lists(st.integers(0, len(hostile)), min_size=len(skeleton),
                                  max_size=len(skeleton))))
    out = list(hostile)
    for offset, (place, line) in enumerate(zip(places, skeleton)):
        out.insert(place + offset, line)
    return out or [Line({"req": ID, "op": "checkpoint"}, "any")]


# -- the tests --------------------------------------------------------------------
async def drive(sock_dir, items: list[Line]) -> None:
    host, book = FakeHost(), CheckedBook(family_limit=FAMILY_LIMIT)
    async with session(sock_dir, host, book) as (channel, api, guest):
        expected: dict[int, str] = {}
        data = []
        for i, item in enumerate(items, 1):
            data.append(item.render(i))
            if item.expect != "none":
                expected[i] = item.expect
        # Written while hostd answers: neither end may wait for the other to read.
        await guest.send(b"".join(data))
        ans = await _sentinel(guest, SENTINEL)
        assert ans["ok"] is False and ans["error"]["type"] == "TicketError", ans
        assert not channel._task.done(), "hostd's read loop ended"

        await kill_every_ticket(guest, book, host, channel, api)
        await _sentinel(guest, SENTINEL + 1)
        assert not channel._task.done(), "hostd's read loop ended"

        kill_ids = {KILL_ALL + i for i in range(len(book.tickets))}
        assert guest.strays == []
        calls = set(expected) | {SENTINEL, SENTINEL + 1} | kill_ids
        assert set(guest.answers) - calls == set(), "answers to lines that carried no valid request id"
        assert calls - set(guest.answers) == set(), "calls never answered"
        for req, answers in guest.answers.items():
            assert len(answers) == 1, f"request {req} answered {len(answers)} times: {answers}"
            ans = answers[0]
            assert type(ans["ok"]) is bool
            if not ans["ok"]:
                err = ans["error"]
                assert issubclass(getattr(errors, err["type"], type), errors.SfmpiError), ans
                assert isinstance(err["message"], str) and err["message"]
                assert err["type"] != "HostdError", f"hostd failed on request {req}: {ans}"
            if expected.get(req) == "error":
                assert ans["ok"] is False, f"line {data[req - 1][:200]!r} was accepted: {ans}"
        # A join that returned reports every clone of its ticket: it returns once all are gone.
        for i, item in enumerate(items, 1):
            if (isinstance(item.msg, dict) and item.msg.get("op") == "join" and item.msg["req"] is ID
                    and guest.answers[i][0]["ok"]):
                _check_join(guest.answers[i][0], book, item.msg["ticket"])
        for ticket, greetings in host.greetings.items():
            assert [g["id"] for g in greetings] == list(range(1, len(greetings) + 1))
            assert all(type(g["re"]) is int and g["re"] in expected for g in greetings)


async def _sentinel(guest: Guest, req: int) -> dict:
    """A call whose answer says that every line written before it was read and acted
    on (hostd handles the lines of a VM in order)."""
    return await guest.call({"req": req, "op": "members", "ticket": "sentinel"})


@FUZZ
@given(items=lines())
def test_whatever_the_guest_writes_hostd_stays_up_and_answers_each_call_once(tmp_path, items):
    asyncio.run(drive(tmp_path, items))


# Interactive: a guest that reads its answers and goes on with what they gave it.
# A step names a ticket (or checkpoint) by its place among those it was granted;
# one past the end names none.
which = st.sampled_from([0, 0, 0, 1, 2])
ticket_timeout = st.sampled_from([None, None, 0.02, 600.0])
exit_step = st.tuples(st.just("exit"), which, st.integers(1, 4), st.integers(0, 255))
step = st.one_of(
    exit_step, exit_step, exit_step,
    st.tuples(st.just("join"), which, st.sampled_from([None, 0.02])),
    st.tuples(st.just("kill"), which),
    st.tuples(st.just("members"), which),
    st.tuples(st.just("ticket"), st.integers(1, 6), ticket_timeout),
    st.tuples(st.just("clone"), which),
    st.tuples(st.just("checkpoint")),
    st.tuples(st.just("create_clones"), st.sampled_from([0, 0, 1]), which),
)


@st.composite
def actions(draw) -> list[tuple]:
    """Mostly: a ticket, a clone with it, then whatever a program does next."""
    start = draw(st.sampled_from(["clone", "clone", "create_clones", None]))
    steps = []
    if start is not None:
        steps.append(("ticket", draw(st.integers(1, 4)), draw(ticket_timeout)))
        steps += [("clone", 0)] if start == "clone" else [("checkpoint",), ("create_clones", 0, 0)]
    return steps + draw(st.lists(step, max_size=10))


class ClonePort:
    """A clone's own agent channel, as the clone API sees it (the clone calls exit)."""

    def __init__(self, vm_name: str):
        self.vm_name = vm_name
        self.answers: list = []

    async def answer(self, req_id, result=None, error=None):
        self.answers.append((req_id, result, error))


async def play(sock_dir, steps: list[tuple], fail: str | None) -> None:
    host, book = FakeHost(fail), CheckedBook(family_limit=FAMILY_LIMIT)
    async with session(sock_dir, host, book) as (channel, api, guest):
        tickets: list[str] = []
        checkpoints: list[str] = []
        pending_joins: list[int] = []
        guest_ticket_of_join: dict[int, str] = {}
        req = itertools.count(1)

        def ticket(k: int) -> str:
            return tickets[k] if k < len(tickets) else "p-t999"

        for step in steps:
            op, r = step[0], next(req)
            if op == "ticket":
                ans = await guest.call({"req": r, "op": "ticket", "n": step[1], "timeout": step[2]})
                if ans["ok"]:
                    t = ans["ticket"]
                    assert 1 <= t["granted"] <= min(step[1], HOST_ROOM) and t["requested"] == step[1]
                    tickets.append(t["id"])
                else:
                    assert ans["error"]["type"] == "CapacityError", ans
            elif op in ("clone", "create_clones"):
                tid = ticket(step[-1])
                before = book.tickets.get(tid)
                slots_before, greeted_before = book.slots.get(tid), len(host.greetings[tid])
                if op == "clone":
                    ans = await guest.call({"req": r, "op": "clone", "ticket": tid})
                    answered_on = r
                else:
                    cid = checkpoints[step[1]] if step[1] < len(checkpoints) else "ck-99"
                    ans = await guest.call({"req": r, "op": "create_clones", "checkpoint": cid, "ticket": tid})
                    answered_on = host.checkpoints[cid].guest_req if cid in host.checkpoints else None
                usable = before is not None and before.state == TicketState.GRANTED
                if op == "create_clones" and answered_on is None:
                    usable = False
                t = book.tickets.get(tid)
                if not usable:
                    assert ans["ok"] is False and ans["error"]["type"] in ("TicketError", "NotFound"), ans
                    # (its state may move on meanwhile: a pending join, a timeout)
                    assert book.slots.get(tid) is slots_before and len(host.greetings[tid]) == greeted_before, \
                        "a refused call started clones"
                elif fail is None:
                    assert ans["ok"] is True, ans
                    m = before.granted
                    if op == "clone":
                        assert ans["id"] == 0 and ans["size"] == m and ans["ticket"] == tid
                        assert set(ans["timings"]) >= {"checkpoint_ms", "clones_ms", "resumed_ms", "total_ms"}
                    else:
                        assert ans["clones"] == list(range(1, m + 1))
                    assert t.state == TicketState.CLONED
                    assert [g["id"] for g in host.greetings[tid]] == list(range(1, m + 1))
                    assert {g["re"] for g in host.greetings[tid]} == {answered_on}
                    assert len(book.slots[tid]) == m
                else:
                    # (with fail == "checkpoint" no checkpoint exists for create_clones to use)
                    want = {"checkpoint": "CheckpointError", "clone": "CloneError", "leaky": "CloneError",
                            "bug": "HostdError"}[fail]
                    assert ans["ok"] is False and ans["error"]["type"] == want, ans
                    # The ticket is spent, not left cloning with its room held; no clone of it runs.
                    assert t.state == TicketState.KILLED
                    assert all(s.ended.is_set() for s in book.slots.get(tid, []))
                    assert not any(vm.rec.ticket == tid for vm in host.vms.values())
            elif op == "checkpoint":
                ans = await guest.call({"req": r, "op": "checkpoint"})
                if fail == "checkpoint":
                    assert ans["error"]["type"] == "CheckpointError", ans
                else:
                    assert ans["ok"] is True and ans["id"] == 0 and ans["checkpoint"]["family"] == PARENT
                    checkpoints.append(ans["checkpoint"]["id"])
            elif op == "exit":
                tid, index, status = ticket(step[1]), step[2], step[3]
                slots = book.slots.get(tid, [])
                if index <= len(slots) and not slots[index - 1].ended.is_set():
                    slot = slots[index - 1]
                    port = ClonePort(slot.vm)
                    await api.handle(port, {"req": 1, "op": "exit", "status": status})
                    assert port.answers == [], "exit was answered: the clone's VM is destroyed instead"
                    assert slot.ended.is_set() and slot.status == status and slot.failure is None
                    await until(lambda: slot.vm not in host.vms, f"clone {slot.vm} is stopped")
            elif op == "join":
                timeout = step[2]
                await guest.send((json.dumps({"req": r, "op": "join", "ticket": ticket(step[1]),
                                              "timeout": timeout}) + "\n").encode())
                tid = guest_ticket_of_join[r] = ticket(step[1])
                t = book.tickets.get(tid)
                waits = (t is not None and t.state in (TicketState.CLONED, TicketState.KILLED)
                         and any(not s.ended.is_set() for s in book.slots.get(tid, [])))
                if timeout is None and waits:
                    pending_joins.append(r)   # answered once its clones are gone (kill at the end)
                else:
                    ans = await guest.answer(r)
                    _check_join(ans, book, ticket(step[1]))
            elif op == "kill":
                tid = ticket(step[1])
                live = [s.index for s in book.slots.get(tid, []) if not s.ended.is_set()]
                ans = await guest.call({"req": r, "op": "kill", "ticket": tid})
                if tid in book.tickets:
                    # (a ticket's timeout may have ended some of them meanwhile)
                    assert ans["ok"] is True and set(ans["killed"]) <= set(live), ans
                    assert all(s.ended.is_set() for s in book.slots.get(tid, []))
                    assert book.tickets[tid].state in (TicketState.KILLED, TicketState.JOINED)
                else:
                    assert ans["error"]["type"] == "TicketError", ans
            elif op == "members":
                tid = ticket(step[1])
                ans = await guest.call({"req": r, "op": "members", "ticket": tid})
                if ans["ok"]:
                    assert [m["id"] for m in ans["members"]] == [s.index for s in book.slots.get(tid, [])]
                    for m in ans["members"]:
                        assert m["state"] in ("running", "exited", "failed")
                else:
                    assert ans["error"]["type"] == "TicketError", ans
            assert all(t.state != TicketState.CLONING for t in book.tickets.values()), \
                f"a ticket was left cloning after {step}"
            assert not channel._task.done(), "hostd's read loop ended"
            if fail != "bug":
                assert not any(a["error"]["type"] == "HostdError" for v in guest.answers.values() for a in v
                               if not a["ok"]), guest.answers

        await kill_every_ticket(guest, book, host, channel, api)
        for r in pending_joins:
            _check_join(await guest.answer(r), book, guest_ticket_of_join[r])
        for r, answers in guest.answers.items():
            assert len(answers) == 1, f"request {r} answered {len(answers)} times"
        assert guest.strays == []


def _check_join(ans: dict, book: TicketBook, tid: str) -> None:
    if not ans["ok"]:
        assert ans["error"]["type"] == "TicketError", ans
        return
    slots = book.slots.get(tid, [])
    reported = {**ans["statuses"], **ans["failures"]}
    assert sorted(reported) == sorted(str(s.index) for s in slots)
    for s in slots:
        if str(s.index) in ans["statuses"]:
            assert ans["statuses"][str(s.index)] == s.status


@SEQUENCES
@given(steps=actions(), fail=st.sampled_from([None, None, None, "checkpoint", "clone", "leaky", "bug"]))
def test_sequences_of_calls_keep_the_tickets_consistent(tmp_path, steps, fail):
    asyncio.run(play(tmp_path, steps, fail))


# -- single cases --------------------------------------------------------------------
def test_a_malformed_cloned_report_fails_its_waiter_at_once(tmp_path):
    async def main():
        host, book = FakeHost(), CheckedBook()
        async with session(tmp_path, host, book) as (channel, _api, guest):
            loop = asyncio.get_running_loop()
            for bad in (b'{"ev": "cloned", "ok": "yes"}', b'{"ev": "cloned", "ok": true, "id": 100000}',
                        b'{"ev": "cloned", "ok": true, "guest_ms": {"identity": NaN}}',
                        b'{"ev": "cloned", "ok": true, "guest_ms": {"identity": 1e400}}',
                        b'{"ev": "cloned", "ok": true, "error": ' + dump(Raw("[" * 40 + "]" * 40)).encode() + b"}"):
                waiter = asyncio.ensure_future(channel.wait_event("cloned", 60.0))
                t0 = loop.time()
                await guest.send(bad + b"\n")
                report = await asyncio.wait_for(waiter, 2.0)
                assert loop.time() - t0 < 2.0
                assert report["ok"] is False and "malformed cloned report" in report["error"], (bad, report)
            # A well-formed report is delivered as it came.
            await guest.send(b'{"ev": "cloned", "ok": true, "id": 2, "guest_ms": {"identity": 4.5}}\n')
            report = await channel.wait_event("cloned", 2.0)
            assert report == {"ev": "cloned", "ok": True, "id": 2, "guest_ms": {"identity": 4.5}}
            assert not channel._task.done()
    asyncio.run(main())


@pytest.mark.parametrize("timeout", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_a_ticket_timeout_that_is_no_number_is_refused_with_a_usage_error(tmp_path, timeout):
    # A NaN timeout once killed a ticket's clones at once; the agent forwards what a
    # program gave it, so the call must get its answer (its wait has no end of its own).
    async def main():
        host, book = FakeHost(), CheckedBook()
        async with session(tmp_path, host, book) as (channel, _api, guest):
            await guest.send(f'{{"req": 7, "op": "ticket", "n": 2, "timeout": {timeout}}}\n'.encode())
            ans = await guest.answer(7)
            assert ans["ok"] is False and ans["error"]["type"] == "UsageError", ans
            assert book.tickets == {}
            # join's timeout too: its wait in the agent never ends on its own.
            await guest.send(f'{{"req": 8, "op": "join", "ticket": "p-t1", "timeout": {timeout}}}\n'.encode())
            ans = await guest.answer(8)
            assert ans["ok"] is False and ans["error"]["type"] == "UsageError", ans
            assert not channel._task.done()
    asyncio.run(main())


def test_an_event_name_that_is_not_a_string_does_not_end_the_channel(tmp_path):
    async def main():
        host, book = FakeHost(), CheckedBook()
        async with session(tmp_path, host, book) as (channel, _api, guest):
            await guest.send(b'{"ev": [1]}\n{"ev": {"a": 1}}\n{"req": [2], "ev": ["x"]}\n')
            ans = await _sentinel(guest, 3)
            assert ans["error"]["type"] == "TicketError"
            assert not channel._task.done()
    asyncio.run(main())


def test_integral_floats_are_not_integers(tmp_path):
    # jsonschema's "integer" takes 3.0; what hostd does with it does not: a
    # checkpoint taken for request 3.0 records a guest_req its manifest check refuses.
    async def main():
        host, book = FakeHost(), CheckedBook()
        async with session(tmp_path, host, book) as (channel, _api, guest):
            await guest.send(b'{"req": 3.0, "op": "checkpoint"}\n{"req": 4, "op": "ticket", "n": 2.0}\n'
                             b'{"req": 5, "op": "exit", "status": 1.0}\n')
            assert (await guest.answer(4))["error"]["type"] == "UsageError"
            assert (await guest.answer(5))["error"]["type"] == "UsageError"
            await _sentinel(guest, 6)
            assert host.checkpoints == {} and 3 not in guest.answers and book.tickets == {}
    asyncio.run(main())


def test_join_and_kill_of_a_ticket_wait_until_its_clone_call_returned(tmp_path):
    # From another thread of the parent: a join would return at once with no clone
    # reported (and end the ticket its clones are still starting for), a kill would
    # miss the clones still to come.
    async def main():
        hold = asyncio.Event()
        host, book = FakeHost(hold=hold), CheckedBook()
        async with session(tmp_path, host, book) as (_channel, _api, guest):
            t = (await guest.call({"req": 1, "op": "ticket", "n": 3}))["ticket"]["id"]
            await guest.send(b'{"req": 2, "op": "clone", "ticket": "%s"}\n' % t.encode())
            await until(lambda: len(book.slots.get(t, [])) == 3, "the clones are registered")
            for req, op in ((3, "join"), (4, "kill")):
                ans = await guest.call({"req": req, "op": op, "ticket": t, "timeout": None})
                assert ans["ok"] is False and ans["error"]["type"] == "BusyError", ans
            assert book.tickets[t].state == TicketState.CLONING and len(host.clones()) == 3
            hold.set()
            assert (await guest.answer(2))["id"] == 0
            assert (await guest.call({"req": 5, "op": "kill", "ticket": t}))["killed"] == [1, 2, 3]
            ans = await guest.call({"req": 6, "op": "join", "ticket": t})
            assert ans["ok"] and ans["statuses"] == {} and set(ans["failures"]) == {"1", "2", "3"}
            assert book.tickets[t].state == TicketState.JOINED and host.clones() == []
    asyncio.run(main())


def test_a_kill_leaves_a_ticket_joined_by_a_join_that_returned_meanwhile(tmp_path):
    async def main():
        host, book = FakeHost(), CheckedBook()
        async with session(tmp_path, host, book) as (_channel, _api, guest):
            t = (await guest.call({"req": 1, "op": "ticket", "n": 2}))["ticket"]["id"]
            assert (await guest.call({"req": 2, "op": "clone", "ticket": t}))["ok"]
            await guest.send(b'{"req": 3, "op": "join", "ticket": "%s"}\n' % t.encode())
            ans = await guest.call({"req": 4, "op": "kill", "ticket": t})
            assert ans["ok"] is True and ans["killed"] == [1, 2], ans
            join = await guest.answer(3)
            assert join["ok"] and set(join["failures"]) == {"1", "2"}
            assert book.tickets[t].state == TicketState.JOINED
            assert book.reserved() == (0, 0)
    asyncio.run(main())


def test_a_kill_while_the_ticket_timeout_stops_its_clones_leaves_none_running(tmp_path):
    # The timeout fired and is stopping the clones (their slots ended already) when
    # the parent's kill comes: the kill must not cancel that stop half-way, or the
    # clones run on with nobody left to stop them.
    async def main():
        host, book = FakeHost(stop_s=0.05), CheckedBook()
        async with session(tmp_path, host, book) as (channel, api, guest):
            t = (await guest.call({"req": 1, "op": "ticket", "n": 2, "timeout": 0.01}))["ticket"]["id"]
            assert (await guest.call({"req": 2, "op": "clone", "ticket": t}))["ok"]
            await until(lambda: all(s.ended.is_set() for s in book.slots[t]), "the timeout ended the clones")
            assert host.clones() != []       # still being stopped
            ans = await guest.call({"req": 3, "op": "kill", "ticket": t})
            assert ans["ok"] is True and ans["killed"] == []
            await until(lambda: not channel._requests and not api._tasks, "hostd is idle")
            assert host.clones() == [], "clones of a killed ticket run on"
            assert all(s.failure.startswith("timeout") for s in book.slots[t])
    asyncio.run(main())


@pytest.mark.parametrize("how", ["kill", "failed clone"])
def test_the_parent_stopped_while_its_clones_are_being_stopped_leaves_none_running(tmp_path, how):
    # Stopping the parent cancels its calls in progress (its agent channel closes),
    # then announces it gone; the clones that call was stopping must stop all the same.
    async def main():
        host, book = FakeHost(fail="leaky" if how == "failed clone" else None, stop_s=0.05), CheckedBook()
        async with session(tmp_path, host, book) as (channel, api, guest):
            t = (await guest.call({"req": 1, "op": "ticket", "n": 2}))["ticket"]["id"]
            if how == "kill":
                assert (await guest.call({"req": 2, "op": "clone", "ticket": t}))["ok"]
                await guest.send(b'{"req": 3, "op": "kill", "ticket": "%s"}\n' % t.encode())
            else:
                await guest.send(b'{"req": 2, "op": "clone", "ticket": "%s"}\n' % t.encode())
            await until(lambda: len(host.stopped) == 2, "the clones are being stopped")
            await channel.close()                          # what stopping the parent does first
            api.vm_gone(host.vms.pop(PARENT).rec, "stopped")   # then the registry's "gone" event
            await until(lambda: not api._tasks, "hostd is idle")
            await asyncio.sleep(0.1)
            assert host.clones() == [], "clones run on after their parent"
            assert t not in book.tickets    # no one is left to join them
    asyncio.run(main())
