"""SSH for one sfmpirun job: its own sshd and keys, set up in the parent *before* it forks.

The clones inherit everything in memory and on disk at the fork: the job's key
pair, its host key and its sshd, already running and listening. Nothing is
copied afterwards, and the hub accepts only that host key (pinned).

Why an sshd of the job's own and not the VM's: a login to the VM's sshd costs a
fresh clone seconds of its vCPU under TCG (sshd re-executes itself for every
connection, then PAM runs its session modules: motd scripts, environment, limits).
Measured, 7 clones of a 512 MiB parent logging in at once: 3.2-6.3 s through the
VM's sshd, 1.5-2.2 s through this one (`-r`: no re-exec; `UsePAM no`). It
listens on a port of its own, takes only the job's key and nothing from the
user's home, and ends with sfmpirun (parent-death signal) even when sfmpirun is
killed outright.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sfmpi.errors import LaunchError

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = "/run/sshd"
KEY_OPTIONS = "no-agent-forwarding,no-X11-forwarding,no-port-forwarding"
START_TIMEOUT = 30.0
PR_SET_PDEATHSIG = 1


@dataclass
class JobTrust:
    key: Path              # private key (OpenSSH ed25519) the hub logs in with
    host_key: str          # "ssh-ed25519 AAAA..." the job's sshd presents: the only one accepted
    port: int              # the job's sshd, in the parent and in every clone
    sshd: subprocess.Popen | None = None


def sshd_config(job_dir: Path, port: int, user: str, use_pam: bool) -> str:
    """The job's sshd: the job's keys only, no PAM unless the account needs it,
    nothing forwarded, quiet."""
    return "\n".join([
        f"Port {port}",
        "ListenAddress 0.0.0.0",   # not the parent's address: a clone's differs
        f"HostKey {job_dir / 'host_key'}",
        f"AuthorizedKeysFile {job_dir / 'authorized_keys'}",
        f"AllowUsers {user}",
        "AuthenticationMethods publickey",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        f"UsePAM {'yes' if use_pam else 'no'}",
        "PidFile none",
        "PrintMotd no",
        "PrintLastLog no",
        "UseDNS no",
        "X11Forwarding no",
        "AllowTcpForwarding no",
        "AllowAgentForwarding no",
        "PermitTunnel no",
        "MaxStartups 256",         # every clone's rank hosts log in at once
        "MaxSessions 256",
        "LogLevel ERROR",
        "",
    ])


def account_locked(shadow_text: str, user: str) -> bool:
    """sshd without PAM refuses an account whose password field starts with '!'
    (`passwd -l`), even for key logins; with PAM it does not look."""
    for line in shadow_text.splitlines():
        fields = line.split(":")
        if len(fields) > 1 and fields[0] == user:
            return fields[1].startswith("!")
    return False


def needs_pam(user: str) -> bool:
    if os.geteuid() != 0:
        return False  # an sshd run by the user cannot read the shadow file and does not check
    try:
        with open("/etc/shadow") as f:
            return account_locked(f.read(), user)
    except OSError:
        return False


def create(job_dir: Path, job_id: str) -> JobTrust:
    """Keys, config and a running sshd, all in `job_dir` (removed with the job)."""
    if not os.access(SSHD, os.X_OK):
        raise LaunchError(f"{SSHD} is not installed in this VM (openssh-server comes with the guest image)")
    user = pwd.getpwuid(os.geteuid()).pw_name
    key, host = job_dir / "id_ed25519", job_dir / "host_key"
    public = write_keypair(key, f"sfmpirun-{job_id}")
    host_public = write_keypair(host, f"sfmpirun-{job_id}-host")
    (job_dir / "authorized_keys").write_text(f"{KEY_OPTIONS} {public} sfmpirun-{job_id}\n")
    if os.geteuid() == 0:
        # sshd's privilege separation directory; the VM's ssh.service makes it
        # and removes it when stopped, and sshd run as root refuses to start without.
        os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
    port = _free_port()
    config = job_dir / "sshd_config"
    config.write_text(sshd_config(job_dir, port, user, needs_pam(user)))
    trust = JobTrust(key=key, host_key=host_public, port=port)
    trust.sshd = subprocess.Popen([SSHD, "-D", "-r", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  preexec_fn=die_with_parent)
    _wait_listening(trust)
    return trust


def write_keypair(path: Path, comment: str) -> str:
    """An OpenSSH ed25519 key pair at `path` and `path`.pub; returns "ssh-ed25519 AAAA...".
    Made in this process with cryptography (paramiko's own, imported before the
    fork anyway) rather than by ssh-keygen: every process started costs a TCG
    guest's one vCPU, and this runs on the way to the fork."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(private)
    path.with_suffix(".pub").write_text(f"{public} {comment}\n")
    return public


def stop(trust: JobTrust) -> None:
    if trust.sshd is not None and trust.sshd.poll() is None:
        trust.sshd.terminate()
        try:
            trust.sshd.wait(5.0)
        except subprocess.TimeoutExpired:
            trust.sshd.kill()
            trust.sshd.wait()
    if trust.sshd is not None and trust.sshd.stderr is not None:
        trust.sshd.stderr.close()


def _free_port() -> int:
    # The kernel picks a free port; sshd binds it a moment later.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _wait_listening(trust: JobTrust) -> None:
    assert trust.sshd is not None
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if trust.sshd.poll() is not None:
            err = (trust.sshd.stderr.read() if trust.sshd.stderr else "").strip().splitlines()[-1:] or ["no message"]
            raise LaunchError(f"the job's sshd exited with {trust.sshd.returncode}: {err[0]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", trust.port), timeout=1.0):
            return
        time.sleep(0.05)
    stop(trust)
    raise LaunchError(f"the job's sshd did not listen on port {trust.port} within {START_TIMEOUT:.0f} s")


def die_with_parent() -> None:
    """In a child of sfmpirun (mpiexec, the job's sshd), before exec: SIGTERM
    when sfmpirun dies, even by SIGKILL."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
