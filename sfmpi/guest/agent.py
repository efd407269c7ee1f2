#!/usr/bin/python3
"""The jobs runner of the guest agent: `vm exec` and its signals.

The agent is native/agent (sfmpi-agentd, C, root from boot). It owns hostd's
virtio-serial port and the clone-API socket, re-identifies clones, and hands
this module, its child, the lines it does not handle itself (exec, signal, and
anything unknown) over a socketpair; what this module writes there goes to
hostd unchanged. Running commands is no part of a clone's critical path, so it
stays in Python. Standard library only.

Wire protocol with hostd (version 2), one JSON object per line each way:
  host -> guest  {"op": "ping"}
                 {"op": "exec", "id": N, "argv": [...], "env": {...}, "cwd": "/"}
                 {"op": "signal", "id": N, "sig": 15, "grace": 10}  (SIGKILL after grace s)
                 {"op": "identify", "identity": {...}, "time": t, "entropy": b64, "machine_id": hex}
                 {"op": "load", "interval": s}      load reports every s seconds (0: none)
                 {"re": R, "ok": true|false, ...}      answer to the guest's request R
  guest -> host  {"ev": "ready", "version": 2, "hostname": ..., "boot_id": ..., "uptime": s}
                 {"ev": "out", "id": N, "fd": 1|2, "data": base64}
                 {"ev": "exit", "id": N, "code": C}     (C < 0: killed by signal -C)
                 {"ev": "error", "id": N, "message": text}
                 {"ev": "identified", "ok": true|false, "error": text}
                 {"ev": "cloned", "id": k, "ok": true|false, "error": text}
                 {"ev": "load", "cpu": percent, "ram": bytes, "ram_total": bytes}  (sfmpi/guest/load.py)
                 {"req": R, "op": "ticket"|"clone"|..., ...}   a clone-API call
"ready" is sent at start and as the answer to every ping, so a host that
(re)connects later, or a clone that has just been resumed, learns the agent is
alive with one round trip.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading

from sfmpi.guest.load import LoadReporter


class Agent:
    def __init__(self, fd: int):
        self.fd = fd
        self.write_lock = threading.Lock()
        self.jobs: dict[int, subprocess.Popen] = {}
        self.load = LoadReporter(self.send)

    def send(self, msg: dict) -> bool:
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        with self.write_lock:
            try:
                while data:
                    n = os.write(self.fd, data)
                    data = data[n:]
            except OSError:
                return False
        return True

    def serve(self) -> None:
        """Lines from sfmpi-agentd until it goes away (then so does this)."""
        buf = b""
        while True:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line.strip():
                    self.dispatch(line)

    def dispatch(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
            op = msg["op"]
        except (ValueError, KeyError, TypeError):
            self.send({"ev": "error", "id": None, "message": "malformed request"})
            return
        if op == "exec":
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
                # A bad request must not end the runner (serve() would die with it).
                self.send({"ev": "error", "id": None, "message": f"bad signal request: {exc}"})
        elif op == "load":
            try:
                self.load.set_interval(float(msg.get("interval", 0)))
            except (TypeError, ValueError) as exc:
                self.send({"ev": "error", "id": None, "message": f"bad load request: {exc}"})
        else:
            self.send({"ev": "error", "id": msg.get("id"), "message": f"unknown op {op!r}"})

    @staticmethod
    def _kill_if_running(job: subprocess.Popen) -> None:
        if job.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)

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


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] != "--jobs-fd":
        raise SystemExit("usage: python3 -m sfmpi.guest.agent --jobs-fd FD (started by sfmpi-agentd)")
    Agent(int(sys.argv[2])).serve()


if __name__ == "__main__":
    main()
