"""The remote-shell agent sfmpirun gives the real launcher: Hydra's
`-launcher-exec`, Open MPI's `plm_rsh_agent`. Called like ssh, `AGENT [opts]
HOST COMMAND...`, it logs in to a clone with the job's key (paramiko), checks
the clone presents the pinned host key, runs COMMAND there through the remote
shell, relays stdin, stdout and stderr, and exits with COMMAND's status.

Hydra hangs when its launcher fails, so a failure to connect is also written to
the job directory, where sfmpirun sees it and ends the job; each host reached
is written there too, so sfmpirun also sees a launch that never happened.
"""
from __future__ import annotations

import base64
import getpass
import os
import select
import signal
import sys
import threading
from pathlib import Path

from . import plan

JOB_ENV = "SFMPIRUN_JOB"
FAILURES = "agent-failures"
REACHED = "agent-reached"
CONNECT_TIMEOUT = 15.0
# ssh options launchers may pass (-x, -q, ...) are skipped; these take a value, skipped too.
WITH_VALUE = {"-l", "-o", "-p", "-i", "-F"}


def split_argv(argv: list[str]) -> tuple[str, list[str], str | None]:
    """(host, command words, user from -l or user@host)."""
    user = None
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] in WITH_VALUE:
            if argv[i] == "-l" and i + 1 < len(argv):
                user = argv[i + 1]
            i += 2
        else:
            i += 1
    if i >= len(argv) - 1:
        raise SystemExit("usage: sfmpirun-agent [ssh options] HOST COMMAND...")
    host = argv[i]
    if "@" in host:
        user, host = host.split("@", 1)
    return host, argv[i + 1:], user


def record_failure(job_dir: Path, host: str, reason: str) -> None:
    with open(job_dir / FAILURES, "a") as f:
        f.write(f"{host}: {reason}\n")


def record_reached(job_dir: Path, host: str) -> None:
    # One short append per line (O_APPEND): agents running at once do not interleave.
    with open(job_dir / REACHED, "a") as f:
        f.write(host + "\n")


def reached_hosts(job_dir: Path) -> set[str]:
    try:
        return set((job_dir / REACHED).read_text().split())
    except FileNotFoundError:
        return set()


def _pinned_key(job_dir: Path):
    import paramiko
    kind, blob = (job_dir / "host_key.pub").read_text().split()[:2]
    if kind != "ssh-ed25519":
        raise ValueError(f"pinned host key of unsupported type {kind}")
    return kind, paramiko.Ed25519Key(data=base64.b64decode(blob))


def connect(job_dir: Path, host: str, user: str | None):
    import paramiko
    client = paramiko.SSHClient()
    kind, key = _pinned_key(job_dir)
    client.get_host_keys().add(host, kind, key)
    # A host that shows another key is not one of this job's clones.
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(host, username=user or getpass.getuser(),
                   pkey=paramiko.Ed25519Key.from_private_key_file(str(job_dir / "id_ed25519")),
                   allow_agent=False, look_for_keys=False, timeout=CONNECT_TIMEOUT,
                   banner_timeout=CONNECT_TIMEOUT, auth_timeout=CONNECT_TIMEOUT)
    return client


def _pump_stdin(channel) -> None:
    try:
        while True:
            data = os.read(0, 32768)
            if not data:
                break
            channel.sendall(data)
    except OSError:
        pass
    finally:
        try:
            channel.shutdown_write()
        except OSError:
            pass


def relay(channel) -> int:
    """Copy the remote command's output here until it exits; its status."""
    threading.Thread(target=_pump_stdin, args=(channel,), daemon=True).start()
    while True:
        select.select([channel], [], [], 1.0)
        moved = False
        while channel.recv_ready():
            os.write(1, channel.recv(32768))
            moved = True
        while channel.recv_stderr_ready():
            os.write(2, channel.recv_stderr(32768))
            moved = True
        if channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
            return channel.recv_exit_status()
        if channel.closed and not moved:
            return 255


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    host, command, user = split_argv(argv)
    job = os.environ.get(JOB_ENV)
    if not job:
        sys.stderr.write(f"sfmpirun-agent: {JOB_ENV} is not set (only sfmpirun runs this agent)\n")
        return 255
    job_dir = Path(job)
    # The launcher ends us with a signal when the job ends: exit quietly.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: os._exit(255))
    try:
        client = connect(job_dir, host, user)
    except Exception as exc:  # any failure to reach the clone ends the job
        reason = f"cannot connect over SSH: {type(exc).__name__}: {exc}"
        record_failure(job_dir, host, reason)
        sys.stderr.write(f"sfmpirun-agent: {host}: {reason}\n")
        return 255
    record_reached(job_dir, host)
    try:
        channel = client.get_transport().open_session()
        channel.exec_command(plan.remote_command(command))
        status = relay(channel)
    except Exception as exc:
        record_failure(job_dir, host, f"connection lost: {type(exc).__name__}: {exc}")
        return 255
    finally:
        client.close()
    return status


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
