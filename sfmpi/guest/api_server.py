"""The agent's local side: the clone API socket for programs in the guest.

Protocol `sfclone/1` (docs/clone-api.md): one JSON request and one JSON answer
per connection. Calls that need hostd are forwarded over the agent's
virtio-serial channel; the rest (whoami) is answered here. A `clone` whose
answer carries an identity is a clone's copy of the call: the VM is
re-identified (sfmpi.guest.identity) before the program gets its ID.
"""
from __future__ import annotations

import grp
import json
import os
import socket
import threading
import time

API_VERSION = 1
DEFAULT_SOCKET = "/run/sfmpi/api.sock"
GROUP = "sfmpi"
# How long the agent waits for hostd per call (None: as long as hostd is there;
# a lost hostd connection fails the call at once).
TIMEOUTS = {"ticket": 60.0, "clone": 900.0, "checkpoint": 900.0, "create_clones": 900.0,
            "kill": 120.0, "exit": 120.0, "join": None, "members": 60.0}
FORWARDED = {
    "ticket": ("n", "timeout"),
    "clone": ("ticket",),
    "checkpoint": (),
    "create_clones": ("checkpoint", "ticket"),
    "exit": ("status",),
    "join": ("ticket", "timeout"),
    "kill": ("ticket",),
    "members": ("ticket",),
}


# A clone resumes with every code path cold: under TCG each one is translated
# again, and what wakes up with it (systemd on the clock step, the kernel's
# workers) took 0.1-0.7 s of the one vCPU before the call could return. The
# thread that re-identifies the clone and answers runs real-time until the
# answer is sent; the rest runs right after. It waits at that priority in the
# parent too (blocked, it costs nothing), so it is real-time from the first
# instruction in a clone.
REALTIME_PRIORITY = 10


def enter_realtime() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))
    except OSError:
        pass  # not permitted (agent not root): only slower


def leave_realtime() -> None:
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except OSError:
        pass


def failure(kind: str, message: str) -> dict:
    return {"v": API_VERSION, "ok": False, "error": {"type": kind, "message": message}}


class ApiServer:
    def __init__(self, agent, path: str = DEFAULT_SOCKET):
        self.agent = agent
        self.path = path
        self.clone_busy = threading.Lock()
        self.sock: socket.socket | None = None

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        try:
            os.chown(self.path, 0, grp.getgrnam(GROUP).gr_gid)
            os.chmod(self.path, 0o660)
        except KeyError:
            os.chmod(self.path, 0o600)  # no sfmpi group: root only
        sock.listen(64)
        self.sock = sock
        threading.Thread(target=self._accept_loop, daemon=True, name="api-accept").start()

    def _accept_loop(self) -> None:
        assert self.sock is not None
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                line = conn.makefile("rb").readline(1 << 20)
                answer = self.handle(line)
            except OSError:
                return
            if answer is None:
                return
            try:
                conn.sendall((json.dumps(answer, separators=(",", ":")) + "\n").encode())
            except OSError:
                pass  # the caller went away; nothing to undo here
            finally:
                leave_realtime()

    # -- one request -----------------------------------------------------
    def handle(self, line: bytes) -> dict | None:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not an object")
        except ValueError:
            return failure("UsageError", "malformed request: one JSON object per line expected")
        if req.get("v") != API_VERSION:
            return failure("ProtocolError", f"protocol version {req.get('v')!r} not supported "
                                            f"(this agent speaks sfclone/{API_VERSION})")
        op = req.get("op")
        if op == "whoami":
            return self.whoami()
        if op not in FORWARDED:
            return failure("UsageError", f"unknown op {op!r}")
        args = {k: req.get(k) for k in FORWARDED[op]}
        if op in ("clone", "checkpoint", "create_clones"):
            if not self.clone_busy.acquire(blocking=False):
                return failure("BusyError", "another clone call is in progress in this VM")
            try:
                return self.forward_fork(op, args)
            finally:
                self.clone_busy.release()
        answer = self.agent.request(op, args, TIMEOUTS[op])
        return self._to_client(answer)

    def forward_fork(self, op: str, args: dict) -> dict:
        """A call the VM is forked inside: the answer differs in parent and clones."""
        from sfmpi.guest import identity
        enter_realtime()
        timing: dict = {}
        answer = self.agent.request(op, args, TIMEOUTS[op], timing)
        t_answer = time.monotonic()
        if not answer.get("ok"):
            return self._to_client(answer)
        if "identity" in answer:
            # We are a clone. Nothing runs in the program before this is done.
            try:
                steps = identity.apply(answer, run_hooks=True)
            except Exception as exc:
                self.agent.send({"ev": "cloned", "id": answer.get("id"), "ok": False, "error": str(exc)})
                # hostd destroys this VM now; the caller never sees a return.
                return failure("CloneError", f"clone {answer.get('id')}: {exc}")
            self.agent.identity = dict(answer["identity"])
            # Where a clone's time goes in the guest (hostd logs it). The guest's
            # clock stood still from the parent's pause to the clone's resume, so
            # `to_answer` is mostly the clone's time from resume to the answer.
            self.agent.send({"ev": "cloned", "id": answer["id"], "ok": True,
                             "guest_ms": {"to_answer": (timing["arrived"] - timing["sent"]) * 1000.0,
                                          "wake": (t_answer - timing["arrived"]) * 1000.0,
                                          "identity": (time.monotonic() - t_answer) * 1000.0, **steps}})
        elif answer.get("hosts"):
            identity.write_hosts(answer["hosts"])
        result = {k: v for k, v in answer.items()
                  if k not in ("re", "identity", "time", "entropy", "machine_id", "boot_id", "hosts")}
        return self._to_client(result)

    def whoami(self) -> dict:
        ident = self.agent.identity
        if not ident:
            return failure("HostdError", "this VM has no identity yet (hostd has not configured it)")
        return {"v": API_VERSION, "ok": True, "id": ident.get("id", 0),
                "role": "parent" if ident.get("id", 0) == 0 else "clone",
                "family": ident.get("family"), "ip": ident.get("ip"), "mac": ident.get("mac"),
                "hostname": ident.get("hostname"), "ticket": ident.get("ticket")}

    @staticmethod
    def _to_client(answer: dict) -> dict:
        out = {k: v for k, v in answer.items() if k != "re"}
        out["v"] = API_VERSION
        return out
