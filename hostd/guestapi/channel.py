"""AgentChannel: hostd's end of the virtio-serial link to sfmpi-agent in a guest.

QEMU exposes the guest port as a listening Unix socket (chardev socket,
server=on). One client at a time: hostd holds the connection for the VM's life.
The wire protocol is documented in sfmpi/guest/agent.py.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import re
import time
from collections import deque
from typing import Awaitable, Callable

from sfmpi.errors import AgentError, ProtocolError

from . import schemas

log = logging.getLogger("sfmpi.hostd.agent")

OutputSink = Callable[[int, bytes], Awaitable[None]]
RequestHandler = Callable[["AgentChannel", dict], Awaitable[None]]
# Events the agent sends once, that hostd waits for by name.
AWAITED_EVENTS = ("identified", "cloned")
# Seconds between SIGTERM and SIGKILL for a command whose caller went away.
EXEC_KILL_GRACE = 10.0
# A guest that stops reading its port fills the socket: a write gives up then.
SEND_TIMEOUT = 30.0
# Clone-API calls of one VM in progress at once (its agent has 16 client slots).
MAX_PENDING_REQUESTS = 64
_REQ_AT_START = re.compile(rb'^\s*\{\s*"req"\s*:\s*(\d{1,16})\s*[,}]')
# Rejected lines logged per VM before the log goes quiet (one line per 1000 after).
LOGGED_REJECTS = 20


class AgentChannel:
    def __init__(self, vm_name: str, socket_path: str):
        self.vm_name = vm_name
        self.socket_path = socket_path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ready_info: dict | None = None
        self._ready = asyncio.Event()
        self._jobs: dict[int, asyncio.Queue] = {}
        self._ids = itertools.count(1)
        self._task: asyncio.Task | None = None
        # Clone-API calls from programs in the guest (set by hostd's manager).
        self.on_request: RequestHandler | None = None
        self._requests: set[asyncio.Task] = set()
        self._events: dict[str, deque] = {name: deque() for name in AWAITED_EVENTS}
        self._event_arrived = asyncio.Condition()
        self.rejected = 0     # lines refused (malformed, invalid, too long)
        # The last load report (validated), with hostd's clock: a pool's controller reads it.
        self.last_load: dict | None = None

    async def connect(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.reader, self.writer = await asyncio.open_unix_connection(
                    self.socket_path, limit=schemas.MAX_LINE)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if time.monotonic() > deadline:
                    raise AgentError(f"VM {self.vm_name}: agent socket {self.socket_path}: {exc}") from exc
                await asyncio.sleep(0.01)
        self._task = asyncio.ensure_future(self._read_loop())

    async def close(self) -> None:
        for task in list(self._requests):
            task.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 5.0)
            self.writer = None
        for q in self._jobs.values():
            q.put_nowait({"ev": "lost"})

    async def _send(self, msg: dict) -> None:
        if self.writer is None:
            raise AgentError(f"VM {self.vm_name}: agent channel is not connected")
        self.writer.write((json.dumps(msg) + "\n").encode())
        try:
            await asyncio.wait_for(self.writer.drain(), SEND_TIMEOUT)
        except asyncio.TimeoutError:
            raise AgentError(f"VM {self.vm_name}: the guest has not read from its agent port in "
                             f"{SEND_TIMEOUT:.0f} s") from None

    async def _read_loop(self) -> None:
        assert self.reader is not None
        try:
            while True:
                try:
                    line = await self.reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as exc:   # the guest went away mid-line
                    line = exc.partial
                    if not line:
                        break
                except asyncio.LimitOverrunError as exc:
                    await self._too_long(exc.consumed)
                    continue
                await self._handle_line(line)
        finally:
            for q in self._jobs.values():
                q.put_nowait({"ev": "lost"})

    async def _too_long(self, buffered: int) -> None:
        """A line over MAX_LINE: its start says which call it was (the agent writes
        "req" first), so that call still gets its answer; the rest is skipped."""
        assert self.reader is not None
        head = await self.reader.read(min(buffered, 256))
        exc = ProtocolError(f"line longer than {schemas.MAX_LINE} bytes")
        self._reject(head, exc)
        while True:  # skip to the end of the line, a buffer at a time
            try:
                await self.reader.readuntil(b"\n")
                break
            except asyncio.LimitOverrunError as more:
                await self.reader.read(more.consumed)
            except asyncio.IncompleteReadError:
                break
        m = _REQ_AT_START.match(head)
        if m and 0 < int(m.group(1)) <= schemas.REQ_ID_MAX:
            await self.answer(int(m.group(1)), error=("UsageError", f"hostd refused the call: the request is "
                                                                    f"longer than {schemas.MAX_LINE} bytes"))

    def _reject(self, line: bytes, exc: Exception) -> None:
        self.rejected += 1
        if self.rejected <= LOGGED_REJECTS or self.rejected % 1000 == 0:
            log.warning("VM %s: refused a line from the guest (%d so far): %s %r", self.vm_name,
                        self.rejected, exc, line[:80])

    async def _handle_line(self, line: bytes) -> None:
        """One line from the guest: parsed, validated, then acted on (hostd/guestapi/schemas.py)."""
        try:
            msg = schemas.parse_line(line)
        except ProtocolError as exc:
            # Also what a guest that just resumed may deliver: the tail of a
            # line it was writing at the checkpoint.
            self._reject(line, exc)
            return
        try:
            schemas.check(msg)
        except ProtocolError as exc:
            self._reject(line, exc)
            await self._refuse(msg, exc)
            return
        ev = msg.get("ev")
        if "req" in msg:
            self._dispatch_request(msg)
        elif ev in self._events:
            await self._deliver(ev, msg)
        elif ev == "load":
            self.last_load = {"cpu": float(msg["cpu"]), "ram": int(msg["ram"]),
                              "ram_total": int(msg.get("ram_total", 0)), "at": time.time()}
        elif ev == "ready":
            self.ready_info = msg
            self._ready.set()
        elif msg.get("id") in self._jobs:
            await self._jobs[msg["id"]].put(msg)

    async def _refuse(self, msg: dict, exc: ProtocolError) -> None:
        """An invalid message still gets its answer: a call an error, an awaited report a failure."""
        req, ev = msg.get("req"), msg.get("ev")
        if "req" in msg and isinstance(req, int) and not isinstance(req, bool) and 0 < req <= schemas.REQ_ID_MAX:
            # A call refused by its schema is a program's bad argument (docs/clone-api.md:
            # UsageError, "malformed request, n < 1, bad status"), whatever the field.
            await self.answer(req, error=("UsageError", f"hostd refused the call: {exc}"))
        elif isinstance(ev, str) and ev in self._events:  # (a list or object as "ev" is unhashable)
            # Whoever waits for this report (a clone's start) fails now, not at its timeout.
            await self._deliver(ev, {"ev": ev, "ok": False,
                                     "error": f"malformed {ev} report from the guest: {exc}"})

    async def _deliver(self, ev: str, msg: dict) -> None:
        async with self._event_arrived:
            queue = self._events[ev]
            if len(queue) >= 16:  # nobody waits for these: a guest repeating itself
                queue.popleft()
            queue.append(msg)
            self._event_arrived.notify_all()

    def _dispatch_request(self, msg: dict) -> None:
        if len(self._requests) >= MAX_PENDING_REQUESTS:
            self._spawn(self.answer(msg["req"], error=("CapacityError", f"VM {self.vm_name} has "
                                                       f"{MAX_PENDING_REQUESTS} clone-API calls in progress")))
            return
        if self.on_request is None:
            self._spawn(self.answer(msg["req"], error=("HostdError", "hostd takes no requests from this VM")))
            return
        self._spawn(self.on_request(self, msg))

    def _spawn(self, coro) -> None:
        # Referenced until done (a bare future may be collected), cancelled by close().
        task = asyncio.ensure_future(coro)
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def answer(self, req_id, result: dict | None = None, error: tuple[str, str] | None = None) -> None:
        """Answer the guest's request req_id (never raises: the VM may be gone)."""
        msg = {"re": req_id, "ok": error is None, **(result or {})}
        if error is not None:
            msg["error"] = {"type": error[0], "message": error[1]}
        try:
            await self._send(msg)
        except (AgentError, OSError, ConnectionError) as exc:
            log.info("VM %s: could not answer request %s: %s", self.vm_name, req_id, exc)

    async def send_op(self, msg: dict) -> None:
        await self._send(msg)

    async def wait_event(self, name: str, timeout: float) -> dict:
        """The next `name` event from the agent (kept if it came before the wait)."""
        async def arrived() -> dict:
            async with self._event_arrived:
                await self._event_arrived.wait_for(lambda: bool(self._events[name]))
                return self._events[name].popleft()
        try:
            return await asyncio.wait_for(arrived(), timeout)
        except asyncio.TimeoutError:
            raise AgentError(f"VM {self.vm_name}: the agent did not report {name} in {timeout:.0f} s") from None

    async def wait_ready(self, timeout: float, ping_every: float = 0.5) -> dict:
        """Ping until the agent answers. Returns its `ready` message."""
        self._ready.clear()
        deadline = time.monotonic() + timeout
        while True:
            await self._send({"op": "ping"})
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError(f"VM {self.vm_name}: guest agent did not answer in {timeout:.0f} s")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ready.wait(), min(ping_every, left))
                return self.ready_info or {}

    async def exec(self, argv: list[str], sink: OutputSink, env: dict | None = None,
                   cwd: str | None = None) -> int:
        """Run argv in the guest, stream output to sink(fd, data), return the exit code."""
        job_id = next(self._ids)
        queue: asyncio.Queue = asyncio.Queue()
        self._jobs[job_id] = queue
        try:
            await self._send({"op": "exec", "id": job_id, "argv": list(argv), "env": env or {},
                              "cwd": cwd or "/"})
            while True:
                msg = await queue.get()
                ev = msg.get("ev")
                if ev == "out":
                    await sink(int(msg["fd"]), base64.b64decode(msg["data"]))
                elif ev == "exit":
                    return int(msg["code"])
                elif ev == "error":
                    await sink(2, f"sfmpi-agent: {msg.get('message')}\n".encode())
                elif ev == "lost":
                    raise AgentError(f"VM {self.vm_name}: agent connection lost while running {argv[0]}")
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                # The caller went away (Ctrl-C, closed connection): like ssh's hang-up,
                # the command may clean up (sfmpirun destroys its clones) before it is killed.
                await self._send({"op": "signal", "id": job_id, "sig": 15, "grace": EXEC_KILL_GRACE})
            raise
        finally:
            self._jobs.pop(job_id, None)
