#!/usr/bin/python3
"""sfmpi-agent: runs as root in every guest, talks to hostd over virtio-serial.

Standard library only (the guest has python3 and the sfmpi package, nothing else
is promised). It serves two sides:
- hostd, over the virtio-serial port: `vm exec`, pings, identities;
- programs in the guest, over /run/sfmpi/api.sock (sfmpi.guest.api_server):
  the clone API of docs/clone-api.md, forwarded to hostd as requests.

Wire protocol with hostd (version 2), one JSON object per line each way:
  host -> guest  {"op": "ping"}
                 {"op": "exec", "id": N, "argv": [...], "env": {...}, "cwd": "/"}
                 {"op": "signal", "id": N, "sig": 15, "grace": 10}  (SIGKILL after grace s)
                 {"op": "identify", "identity": {...}, "time": t, "entropy": b64, "machine_id": hex}
                 {"re": R, "ok": true|false, ...}      answer to the guest's request R
  guest -> host  {"ev": "ready", "version": 2, "hostname": ..., "boot_id": ..., "uptime": s}
                 {"ev": "out", "id": N, "fd": 1|2, "data": base64}
                 {"ev": "exit", "id": N, "code": C}     (C < 0: killed by signal -C)
                 {"ev": "error", "id": N, "message": text}
                 {"ev": "identified", "ok": true|false, "error": text}
                 {"ev": "cloned", "id": k, "ok": true|false, "error": text}
                 {"req": R, "op": "ticket"|"clone"|..., ...}   a clone-API call
"ready" is sent at start and as the answer to every ping, so a host that
(re)connects later, or a clone that has just been resumed, learns the agent is
alive with one round trip.

Why a poll-and-sleep loop: while no host is connected, the port reports
POLLHUP and read() returns 0 at once, so a plain blocking read would spin.
"""
from __future__ import annotations

import base64
import glob
import contextlib
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

PROTOCOL_VERSION = 2
PORT_NAME = "org.sfmpi.0"


def find_port(timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    tried_modprobe = False
    while time.monotonic() < deadline:
        udev_path = f"/dev/virtio-ports/{PORT_NAME}"
        if os.path.exists(udev_path):
            return udev_path
        for name_file in glob.glob("/sys/class/virtio-ports/*/name"):
            with open(name_file) as f:
                if f.read().strip() == PORT_NAME:
                    dev = "/dev/" + name_file.split("/")[-2]
                    if os.path.exists(dev):
                        return dev
        if not tried_modprobe:
            subprocess.run(["modprobe", "virtio_console"], check=False)
            tried_modprobe = True
        time.sleep(0.1)
    raise SystemExit(f"sfmpi-agent: virtio-serial port {PORT_NAME} not found")


class Pending:
    """A clone-API request waiting for hostd's answer."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer: dict | None = None
        self.arrived = 0.0

    def resolve(self, answer: dict) -> None:
        self.arrived = time.monotonic()
        self.answer = answer
        self.done.set()


class Agent:
    def __init__(self, fd: int):
        self.fd = fd
        self.write_lock = threading.Lock()
        self.jobs: dict[int, subprocess.Popen] = {}
        self.pending: dict[int, Pending] = {}
        self.pending_lock = threading.Lock()
        # Request ids must not repeat in a clone either: the clone carries this
        # counter in memory, and hostd answers a clone's copy of request R.
        self.req_ids = itertools.count(1)
        self.identity: dict = {}
        self.connected = False

    @classmethod
    def open(cls, port_path: str) -> "Agent":
        return cls(os.open(port_path, os.O_RDWR))

    # -- sending ---------------------------------------------------------
    def send(self, msg: dict) -> bool:
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        with self.write_lock:
            try:
                while data:
                    n = os.write(self.fd, data)
                    data = data[n:]
            except OSError:
                # No host connected: the message has nobody to go to. The host
                # pings on connect, so nothing is lost that matters.
                return False
        return True

    def ready(self) -> None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                boot_id = f.read().strip()
            with open("/proc/uptime") as f:
                uptime = float(f.read().split()[0])
        except OSError:
            boot_id, uptime = "", 0.0
        self.send({"ev": "ready", "version": PROTOCOL_VERSION,
                   "hostname": socket.gethostname(), "boot_id": boot_id, "uptime": uptime})

    # -- requests to hostd (the clone API) -------------------------------
    def request(self, op: str, args: dict, timeout: float | None, timing: dict | None = None) -> dict:
        """Send a clone-API call to hostd and wait for its answer. `timing` gets
        when it was sent and when the answer arrived (time.monotonic())."""
        req_id = next(self.req_ids)
        waiter = Pending()
        with self.pending_lock:
            self.pending[req_id] = waiter
        try:
            t_sent = time.monotonic()
            if not self.send({"req": req_id, "op": op, **args}):
                return _failure("HostdError", "the agent cannot reach hostd (virtio-serial port closed)")
            if not waiter.done.wait(timeout):
                return _failure("HostdError", f"hostd did not answer {op} in {timeout:.0f} s")
            if timing is not None:
                timing.update(sent=t_sent, arrived=waiter.arrived)
            return waiter.answer or _failure("HostdError", "empty answer from hostd")
        finally:
            with self.pending_lock:
                self.pending.pop(req_id, None)

    def _answer(self, msg: dict) -> None:
        with self.pending_lock:
            waiter = self.pending.get(msg.get("re"))
        if waiter is not None:
            waiter.resolve(msg)

    def _fail_pending(self, why: str) -> None:
        with self.pending_lock:
            waiters = list(self.pending.values())
        for w in waiters:
            w.resolve(_failure("HostdError", why))

    # -- receiving -------------------------------------------------------
    def serve(self) -> None:
        self.ready()
        buf = b""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while True:
            events = poller.poll(1000)
            if not events:
                continue
            _, mask = events[0]
            if not mask & select.POLLIN:
                self._host_gone()
                time.sleep(0.05)  # host not connected (POLLHUP): wait for it
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self._host_gone()
                time.sleep(0.05)
                continue
            self.connected = True
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    self.dispatch(line)

    def _host_gone(self) -> None:
        # A call waiting for hostd would otherwise wait forever: hostd forgot it.
        if self.connected:
            self.connected = False
            self._fail_pending("lost the connection to hostd")

    def dispatch(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
            if "re" in msg:
                self._answer(msg)
                return
            op = msg["op"]
        except (ValueError, KeyError, TypeError):
            self.send({"ev": "error", "id": None, "message": "malformed request"})
            return
        if op == "ping":
            self.ready()
        elif op == "exec":
            threading.Thread(target=self.run_job, args=(msg,), daemon=True).start()
        elif op == "signal":
            try:
                job = self.jobs.get(msg.get("id"))
                if job is not None:
                    os.killpg(job.pid, int(msg.get("sig", signal.SIGTERM)))
                    if msg.get("grace"):
                        # Time to clean up (sfmpirun destroys its clones), then no choice.
                        timer = threading.Timer(float(msg["grace"]), self._kill_if_running, args=(job,))
                        timer.daemon = True
                        timer.start()
            except ProcessLookupError:
                pass
            except (TypeError, ValueError, OSError) as exc:
                # A bad request must not end the agent (serve() would die with it).
                self.send({"ev": "error", "id": None, "message": f"bad signal request: {exc}"})
        elif op == "identify":
            threading.Thread(target=self.identify, args=(msg,), daemon=True).start()
        else:
            self.send({"ev": "error", "id": msg.get("id"), "message": f"unknown op {op!r}"})

    @staticmethod
    def _kill_if_running(job: subprocess.Popen) -> None:
        if job.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)

    def identify(self, msg: dict) -> None:
        """The parent's identity at boot, or a host-side clone's after resume (an
        in-guest clone's comes with the answer to its clone call)."""
        from sfmpi.guest import identity
        try:
            identity.apply(msg, run_hooks=msg["identity"].get("id", 0) != 0)
            self.identity = dict(msg["identity"])
            self.send({"ev": "identified", "ok": True})
        except Exception as exc:  # reported to hostd, which fails the VM start visibly
            self.send({"ev": "identified", "ok": False, "error": str(exc)})

    # -- running commands ------------------------------------------------
    def run_job(self, msg: dict) -> None:
        job_id = msg.get("id")
        env = dict(os.environ)
        env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        env.setdefault("HOME", "/root")
        env.update(msg.get("env") or {})
        try:
            proc = subprocess.Popen(
                msg["argv"], cwd=msg.get("cwd") or "/", env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except (OSError, KeyError, TypeError) as exc:
            self.send({"ev": "error", "id": job_id, "message": str(exc)})
            self.send({"ev": "exit", "id": job_id, "code": 127})
            return
        self.jobs[job_id] = proc
        streams = {proc.stdout.fileno(): 1, proc.stderr.fileno(): 2}
        while streams:
            readable, _, _ = select.select(list(streams), [], [])
            for fd in readable:
                data = os.read(fd, 32768)
                if not data:
                    del streams[fd]
                    continue
                self.send({"ev": "out", "id": job_id, "fd": streams[fd],
                           "data": base64.b64encode(data).decode()})
        code = proc.wait()
        self.jobs.pop(job_id, None)
        self.send({"ev": "exit", "id": job_id, "code": code})


def _failure(kind: str, message: str) -> dict:
    return {"ok": False, "error": {"type": kind, "message": message}}


def main() -> None:
    port = sys.argv[1] if len(sys.argv) > 1 else find_port()
    agent = Agent.open(port)
    from sfmpi.guest.api_server import ApiServer
    ApiServer(agent).start()
    agent.serve()


if __name__ == "__main__":
    main()
