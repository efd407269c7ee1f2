#!/usr/bin/python3
"""sfmpi-agent: runs as root in every guest, talks to hostd over virtio-serial.

Standard library only: it is copied into the guest image as one file.

Wire protocol (version 1), one JSON object per line in each direction:
  host -> guest  {"op": "ping"}
                 {"op": "exec", "id": N, "argv": [...], "env": {...}, "cwd": "/"}
                 {"op": "signal", "id": N, "sig": 15}
  guest -> host  {"ev": "ready", "version": 1, "hostname": ..., "boot_id": ..., "uptime": s}
                 {"ev": "out", "id": N, "fd": 1|2, "data": base64}
                 {"ev": "exit", "id": N, "code": C}     (C < 0: killed by signal -C)
                 {"ev": "error", "id": N, "message": text}
"ready" is sent at start and as the answer to every ping, so a host that
(re)connects later, or a clone that has just been resumed, learns the agent is
alive with one round trip.

Why a poll-and-sleep loop: while no host is connected, the port reports
POLLHUP and read() returns 0 at once, so a plain blocking read would spin.
"""
from __future__ import annotations

import base64
import glob
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

PROTOCOL_VERSION = 1
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


class Agent:
    def __init__(self, port_path: str):
        self.fd = os.open(port_path, os.O_RDWR)
        self.write_lock = threading.Lock()
        self.jobs: dict[int, subprocess.Popen] = {}

    # -- sending ---------------------------------------------------------
    def send(self, msg: dict) -> None:
        data = (json.dumps(msg, separators=(",", ":")) + "\n").encode()
        with self.write_lock:
            try:
                while data:
                    n = os.write(self.fd, data)
                    data = data[n:]
            except OSError:
                # No host connected: the message has nobody to go to. The host
                # pings on connect, so nothing is lost that matters.
                pass

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
                time.sleep(0.05)  # host not connected (POLLHUP): wait for it
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                time.sleep(0.05)
                continue
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
        if op == "ping":
            self.ready()
        elif op == "exec":
            threading.Thread(target=self.run_job, args=(msg,), daemon=True).start()
        elif op == "signal":
            try:
                job = self.jobs.get(msg.get("id"))
                if job is not None:
                    os.killpg(job.pid, int(msg.get("sig", signal.SIGTERM)))
            except ProcessLookupError:
                pass
            except (TypeError, ValueError, OSError) as exc:
                # A bad request must not end the agent (serve() would die with it).
                self.send({"ev": "error", "id": None, "message": f"bad signal request: {exc}"})
        else:
            self.send({"ev": "error", "id": msg.get("id"), "message": f"unknown op {op!r}"})

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
    port = sys.argv[1] if len(sys.argv) > 1 else find_port()
    Agent(port).serve()


if __name__ == "__main__":
    main()
