"""SSH trust for one sfmpirun job, set up in the parent *before* it forks.

The clones inherit everything in memory and on disk at the fork, so a key pair
made now, its public half in authorized_keys and the host key the parent's
sshd presents are already in every clone: nothing is copied afterwards, and
the agent accepts only that host key (pinned), never an unknown one.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sfmpi.errors import LaunchError

HOST_KEY = Path("/etc/ssh/ssh_host_ed25519_key.pub")
SSH_PORT = 22
KEY_OPTIONS = "no-agent-forwarding,no-X11-forwarding,no-port-forwarding"


@dataclass(frozen=True)
class JobTrust:
    key: Path              # private key (OpenSSH ed25519) the agent logs in with
    host_key: str          # "ssh-ed25519 AAAA..." the clones' sshd must present
    marker: str            # comment on the authorized_keys line, to remove it later
    authorized_keys: Path

    @property
    def host_key_file(self) -> Path:
        return self.key.with_name("host_key.pub")


def authorized_line(public_key: str, marker: str) -> str:
    kind, blob = public_key.split()[:2]
    return f"{KEY_OPTIONS} {kind} {blob} {marker}\n"


def without_marker(text: str, marker: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not line.rstrip().endswith(" " + marker))


@contextlib.contextmanager
def _locked(path: Path):
    # Several jobs may edit one authorized_keys at once.
    lock = path.with_name(path.name + ".sfmpirun.lock")
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def create(job_dir: Path, job_id: str, home: Path | None = None) -> JobTrust:
    home = home or Path(os.path.expanduser("~"))
    if not HOST_KEY.exists():
        raise LaunchError(f"no SSH host key {HOST_KEY}: is openssh-server installed in this image?")
    key = job_dir / "id_ed25519"
    p = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"sfmpirun-{job_id}", "-f", str(key)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise LaunchError(f"ssh-keygen failed: {p.stderr.strip()}")
    marker = f"sfmpirun-{job_id}"
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    auth = ssh_dir / "authorized_keys"
    with _locked(auth):
        old = auth.read_text() if auth.exists() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        auth.write_text(old + authorized_line(key.with_suffix(".pub").read_text(), marker))
        auth.chmod(0o600)
    trust = JobTrust(key=key, host_key=HOST_KEY.read_text().strip(), marker=marker, authorized_keys=auth)
    trust.host_key_file.write_text(trust.host_key + "\n")
    return trust


def remove(trust: JobTrust) -> None:
    """Take the job's key out of authorized_keys (in the parent; clones are gone)."""
    remove_marker(trust.authorized_keys, trust.marker)


def remove_marker(authorized_keys: Path, marker: str) -> None:
    with contextlib.suppress(FileNotFoundError), _locked(authorized_keys):
        text = authorized_keys.read_text()
        authorized_keys.write_text(without_marker(text, marker))


def ensure_sshd(timeout: float = 30.0) -> None:
    """sshd must run in the parent when it forks: the clones inherit it running."""
    if _listening("127.0.0.1", SSH_PORT):
        return
    subprocess.run(["systemctl", "start", "ssh"], capture_output=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _listening("127.0.0.1", SSH_PORT):
            return
        time.sleep(0.2)
    raise LaunchError(f"sshd is not listening on port {SSH_PORT} in this VM and `systemctl start ssh` did not start it")


def _listening(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
        return True
    return False
