"""A real Grid Engine on this machine, for the batch tests: sge_qmaster and one
sge_execd (Debian's cell `default`), the sfmpi parallel environment from
`sfmpi jobs sge-pe`, and a queue that uses it.

Grid Engine's daemons detach and keep their configuration in the cell's spool,
so start() records what it changes (the cell's act_qmaster and host_aliases,
the global and scheduler configurations) and stop() puts it back, removes the
queue, the PE and the exec host it added and stops the two daemons it started,
by the PIDs in their pid files. Everything talks over loopback.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import psutil

SGE_ROOT = Path("/var/lib/gridengine")
CELL = "default"
COMMON = SGE_ROOT / CELL / "common"
SPOOL = Path("/var/spool/gridengine")
QUEUE = "sfmpi.q"
PE = "sfmpi"


def queue_text(template: str, host: str, slots: int) -> str:
    """The test queue from qconf's queue template: this host, `slots` slots, the sfmpi PE. Pure."""
    values = {"qname": QUEUE, "hostlist": host, "slots": str(slots), "pe_list": PE, "shell": "/bin/bash",
              # Guests under TCG keep the load high: no load alarm may close the queue.
              "load_thresholds": "NONE", "qtype": "BATCH INTERACTIVE"}
    out = []
    for line in template.splitlines():
        key = line.split(None, 1)[0] if line.strip() else ""
        out.append(f"{key:<22}{values[key]}" if key in values else line)
    return "\n".join(out) + "\n"


def set_fields(text: str, fields: dict[str, str]) -> str:
    out = []
    for line in text.splitlines():
        key = line.split(None, 1)[0] if line.strip() else ""
        out.append(f"{key:<33}{fields[key]}" if key in fields else line)
    return "\n".join(out) + "\n"


class GridEngine:
    def __init__(self, directory: Path, slots: int = 2, env: dict | None = None):
        self.dir = directory
        self.host = socket.gethostname().split(".")[0]
        self.slots = slots
        self.env = {**os.environ, "SGE_ROOT": str(SGE_ROOT), "SGE_CELL": CELL, **(env or {})}
        self.saved: dict[str, str | None] = {}
        self.undo: list = []
        self.jobs: list[str] = []

    def __enter__(self) -> "GridEngine":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def q(self, *argv: str, check: bool = True, cwd: Path | None = None, env: dict | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess:
        p = subprocess.run(list(argv), capture_output=True, text=True, env={**self.env, **(env or {})},
                           cwd=cwd, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
        return p

    def _write(self, name: str, text: str) -> Path:
        path = self.dir / name
        path.write_text(text)
        return path

    def _save_file(self, path: Path, text: str) -> None:
        self.saved[str(path)] = path.read_text() if path.exists() else None
        path.write_text(text)

    def start(self) -> None:
        try:
            self._save_file(COMMON / "act_qmaster", self.host + "\n")
            if socket.gethostbyname(self.host).startswith("127."):
                self._save_file(COMMON / "host_aliases", f"{self.host} localhost\n")
            self.q("/usr/sbin/sge_qmaster")
            self.undo.append(self._stop_qmaster)
            _wait(lambda: self.q("qconf", "-sh", check=False).returncode == 0, "sge_qmaster")
            conf = self.q("qconf", "-sconf", "global").stdout
            self._write("global", set_fields(conf, {"min_uid": "0", "min_gid": "0"}))
            self.q("qconf", "-Mconf", str(self.dir / "global"))
            self.undo.append(lambda: (self._write("global", conf), self.q("qconf", "-Mconf", str(self.dir / "global"))))
            sconf = self.q("qconf", "-ssconf").stdout
            self.q("qconf", "-Msconf", str(self._write("sconf", set_fields(sconf, {"schedule_interval": "0:0:1"}))))
            self.undo.append(lambda: self.q("qconf", "-Msconf", str(self._write("sconf.orig", sconf))))
            self.q("qconf", "-Ae", str(self._write("exechost", f"hostname {self.host}\nload_scaling NONE\n"
                                                   "complex_values NONE\nuser_lists NONE\nxuser_lists NONE\n"
                                                   "projects NONE\nxprojects NONE\nusage_scaling NONE\n"
                                                   "report_variables NONE\n")))
            self.undo.append(lambda: self.q("qconf", "-de", self.host, check=False))
            self.q("qconf", "-as", self.host)
            self.undo.append(lambda: self.q("qconf", "-ds", self.host, check=False))
            self.q("/usr/sbin/sge_execd")
            self.undo.append(self._stop_execd)
            pe = subprocess.run(["sfmpi", "jobs", "sge-pe"], capture_output=True, text=True, check=True,
                                env=self.env).stdout
            self.q("qconf", "-Ap", str(self._write("pe", pe)))
            self.undo.append(lambda: self.q("qconf", "-dp", PE, check=False))
            self.q("qconf", "-Aq", str(self._write("queue", queue_text(_queue_template(self), self.host,
                                                                       self.slots))))
            self.undo.append(lambda: self.q("qconf", "-dq", QUEUE, check=False))
            _wait(self._queue_open, f"queue {QUEUE} open", timeout=60)
        except BaseException:
            self.stop()
            raise

    def _queue_open(self) -> bool:
        out = self.q("qstat", "-f", "-q", QUEUE, check=False).stdout
        rows = [l.split() for l in out.splitlines() if l.startswith(QUEUE + "@")]
        # queuename qtype resv/used/tot. load arch [states]
        return bool(rows) and all(len(r) == 5 for r in rows)

    def _pid(self, path: Path) -> int | None:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _stop_execd(self) -> None:
        pid = self._pid(SPOOL / "execd" / self.host / "execd.pid")
        self.q("qconf", "-ke", self.host, check=False)
        _gone(pid)

    def _stop_qmaster(self) -> None:
        pid = self._pid(SPOOL / "qmaster" / "qmaster.pid")
        self.q("qconf", "-km", check=False)
        _gone(pid)

    def submit(self, script: Path, cwd: Path, *args: str) -> str:
        job = self.q("qsub", "-terse", *args, str(script), cwd=cwd).stdout.strip().split(".")[0]
        self.jobs.append(job)
        return job

    def job_running(self, job: str) -> bool:
        return self.q("qstat", "-j", job, check=False).returncode == 0

    def wait_gone(self, job: str, timeout: float = 900) -> None:
        _wait(lambda: not self.job_running(job), f"job {job} ended", timeout=timeout)

    def exit_status(self, job: str) -> int | None:
        """From the accounting file (qacct): the job's exit status."""
        for _ in range(20):
            p = self.q("qacct", "-j", job, check=False)
            for line in p.stdout.splitlines():
                if line.startswith("exit_status"):
                    return int(line.split()[1])
            time.sleep(0.5)
        return None

    def stop(self) -> None:
        for job in self.jobs:
            self.q("qdel", "-f", job, check=False)
        for undo in reversed(self.undo):
            try:
                undo()
            except AssertionError:
                pass
        self.undo.clear()
        for path, text in self.saved.items():
            if text is None:
                Path(path).unlink(missing_ok=True)
            else:
                Path(path).write_text(text)
        self.saved.clear()


def _queue_template(ge: GridEngine) -> str:
    """qconf's own queue template: `qconf -aq` hands it to $EDITOR, which copies it and refuses."""
    copy = ge.dir / "queue.template"
    editor = ge.dir / "copy-template.sh"
    editor.write_text(f"#!/bin/sh\ncp \"$1\" {copy}\nexit 1\n")
    editor.chmod(0o755)
    ge.q("qconf", "-aq", check=False, env={"EDITOR": str(editor)})
    return copy.read_text()


def _gone(pid: int | None, timeout: float = 30) -> None:
    if pid is None:
        return
    try:
        p = psutil.Process(pid)
        p.wait(timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        if "sge_" in p.name():
            p.kill()


def _wait(cond, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"Grid Engine: {what} not so within {timeout:.0f} s")
