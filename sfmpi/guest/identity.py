"""Re-identification of a guest: what makes a clone a machine of its own.

Applied by the agent to the parent at boot (without hooks) and to every clone
before its clone call returns: wall clock from the host, kernel RNG reseeded
with the host's entropy, a new machine-id and boot ID, MAC, IP and hostname from
(family, ID), the family's hosts in /etc/hosts, then /etc/sfmpi/clone.d hooks.
QEMU's vmgenid device got a new generation ID on the clone's command line; the
guest kernel reseeds on that too.
"""
from __future__ import annotations

import base64
import ctypes
import errno
import fcntl
import os
import socket
import struct
import subprocess
import time

HOOK_DIR = "/etc/sfmpi/clone.d"
HOOK_TIMEOUT = 60.0
# RNDADDENTROPY = _IOW('R', 0x03, int[2]): add bytes to the pool and credit them.
# RNDRESEEDCRNG = _IO('R', 0x07): make the CRNG use them now. Without it a clone's
# getrandom() goes on from the parent's CRNG state: measured, all clones returned
# the same os.urandom bytes.
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
HOSTS_FILE = "/etc/hosts"
HOSTS_BEGIN = "# sfmpi family begin"
HOSTS_END = "# sfmpi family end"


class IdentityError(Exception):
    pass


def apply(msg: dict, run_hooks: bool) -> dict:
    """Returns how long each step took, in ms (the clone reports it; hostd logs it)."""
    received = time.monotonic()
    steps: dict[str, float] = {}
    mark = [received]

    def done(step: str) -> None:
        now = time.monotonic()
        steps[step] = (now - mark[0]) * 1000.0
        mark[0] = now

    ident = msg["identity"]
    if msg.get("time"):
        # The host's clock at sending, plus what passed since we got it.
        time.clock_settime(time.CLOCK_REALTIME, float(msg["time"]) + (time.monotonic() - received))
        done("clock")
    if msg.get("entropy"):
        reseed(base64.b64decode(msg["entropy"]))
        done("rng")
    if msg.get("machine_id"):
        write_machine_id(msg["machine_id"])
        done("machine_id")
    if msg.get("boot_id"):
        set_boot_id(msg["boot_id"])
        done("boot_id")
    configure_network(ident)
    done("network")
    set_hostname(ident["hostname"])
    done("hostname")
    write_hosts(msg.get("hosts") or [[ident["hostname"], ident["ip"]]])
    done("hosts")
    if run_hooks:
        run_clone_hooks(ident)
        done("hooks")
    return steps


def reseed(data: bytes) -> None:
    req = struct.pack("ii", len(data) * 8, len(data)) + data
    with open("/dev/random", "wb") as f:
        fcntl.ioctl(f, RNDADDENTROPY, req)
        fcntl.ioctl(f, RNDRESEEDCRNG)


def write_machine_id(machine_id: str) -> None:
    _write_atomic("/etc/machine-id", machine_id.strip() + "\n")


# The kernel's boot ID is made once per boot and read-only, so a clone would
# keep its parent's. Programs take it to mean "same machine": UCX (under MPICH
# and Open MPI) then tries shared memory between ranks on different clones and
# MPI_Init fails. A file of our own is bind-mounted over it instead.
BOOT_ID = "/proc/sys/kernel/random/boot_id"
BOOT_ID_FILE = "/run/sfmpi-boot_id"
MS_BIND = 0x1000


def set_boot_id(boot_id: str) -> None:
    # Written in place: a clone of a clone keeps the mount and only changes the text.
    with open(BOOT_ID_FILE, "w") as f:
        f.write(boot_id.strip() + "\n")
    if os.stat(BOOT_ID).st_dev == os.stat(BOOT_ID_FILE).st_dev:
        return  # already our file
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(BOOT_ID_FILE.encode(), BOOT_ID.encode(), None, MS_BIND, None) != 0:
        raise IdentityError(f"bind a new boot ID over {BOOT_ID}: {os.strerror(ctypes.get_errno())}")


def nic_name() -> str:
    """The one Ethernet NIC sfmpi gives every VM."""
    for name in sorted(os.listdir("/sys/class/net")):
        if name == "lo":
            continue
        try:
            with open(f"/sys/class/net/{name}/type") as f:
                if f.read().strip() == "1":  # ARPHRD_ETHER
                    return name
        except OSError:
            continue
    raise IdentityError("no Ethernet interface in this VM")


# Network changes go through ioctls, not `ip`: every process a clone starts costs
# ~100 ms under TCG (a cold translation cache runs ld.so and libc again), and a
# clone call returns only after this. pyroute2 is not in the guest either.
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
SIOCSIFADDR, SIOCSIFNETMASK, SIOCSIFHWADDR = 0x8916, 0x891C, 0x8924
SIOCADDRT = 0x890B
IFF_UP = 0x1
ARPHRD_ETHER = 1
RTF_UP, RTF_GATEWAY = 0x1, 0x2


def _ifreq(dev: str, payload: bytes) -> bytes:
    return struct.pack("16s", dev.encode()) + payload.ljust(24, b"\0")


def _sockaddr_in(address: str) -> bytes:
    return struct.pack("=H2s4s8x", socket.AF_INET, b"\0\0", socket.inet_aton(address))


def _ioctl(sock: socket.socket, request: int, arg: bytes, what: str) -> bytes:
    try:
        return fcntl.ioctl(sock, request, arg)
    except OSError as exc:
        raise IdentityError(f"{what}: {exc.strerror}") from None


def configure_network(ident: dict) -> None:
    dev = nic_name()
    mask = socket.inet_ntoa(struct.pack("!I", (0xFFFFFFFF << (32 - int(ident["prefix"]))) & 0xFFFFFFFF))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # virtio-net changes its MAC live (VIRTIO_NET_F_CTRL_MAC_ADDR): QEMU's
        # receive filter follows, and the tap's nft rules expect the new one.
        mac = bytes(int(b, 16) for b in ident["mac"].split(":"))
        _ioctl(sock, SIOCSIFHWADDR, _ifreq(dev, struct.pack("=H14s", ARPHRD_ETHER, mac)), f"set MAC of {dev}")
        # Setting the address replaces the parent's (the primary one).
        _ioctl(sock, SIOCSIFADDR, _ifreq(dev, _sockaddr_in(ident["ip"])), f"set address of {dev}")
        _ioctl(sock, SIOCSIFNETMASK, _ifreq(dev, _sockaddr_in(mask)), f"set netmask of {dev}")
        flags = struct.unpack_from("=H", _ioctl(sock, SIOCGIFFLAGS, _ifreq(dev, b""), "read flags"), 16)[0]
        _ioctl(sock, SIOCSIFFLAGS, _ifreq(dev, struct.pack("=H", flags | IFF_UP)), f"bring {dev} up")
        add_default_route(sock, dev, ident["gateway"])


def add_default_route(sock: socket.socket, dev: str, gateway: str) -> None:
    # struct rtentry (x86_64, 120 bytes): pad1; dst, gateway, genmask; flags, pad2;
    # pad3; pad4; metric; dev (char *); mtu; window; irtt.
    dev_name = ctypes.create_string_buffer(dev.encode())
    rt = struct.pack("=8x16s16s16sHh4xQQh6xQQQH6x", _sockaddr_in("0.0.0.0"), _sockaddr_in(gateway),
                     _sockaddr_in("0.0.0.0"), RTF_UP | RTF_GATEWAY, 0, 0, 0, 0,
                     ctypes.addressof(dev_name), 0, 0, 0)
    assert len(rt) == 120
    try:
        fcntl.ioctl(sock, SIOCADDRT, rt)
    except OSError as exc:
        if exc.errno != errno.EEXIST:  # the parent's route is still in place: fine
            raise IdentityError(f"add default route via {gateway}: {exc.strerror}") from None


def set_hostname(name: str) -> None:
    socket.sethostname(name)
    _write_atomic("/etc/hostname", name + "\n")


def write_hosts(hosts: list) -> None:
    """Every member of the family resolves by name (MPI launchers need it)."""
    try:
        with open(HOSTS_FILE) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        lines = ["127.0.0.1 localhost"]
    keep, inside = [], False
    for line in lines:
        if line == HOSTS_BEGIN:
            inside = True
        elif line == HOSTS_END:
            inside = False
        elif not inside and not line.startswith("127.0.1.1"):
            keep.append(line)
    block = [HOSTS_BEGIN] + [f"{ip} {name}" for name, ip in hosts] + [HOSTS_END]
    _write_atomic(HOSTS_FILE, "\n".join(keep + block) + "\n")


def run_clone_hooks(ident: dict) -> None:
    try:
        names = sorted(os.listdir(HOOK_DIR))
    except FileNotFoundError:
        return
    env = dict(os.environ, SF_CLONE_ID=str(ident["id"]), SF_FAMILY=str(ident["family"]),
               SF_IP=ident["ip"], SF_HOSTNAME=ident["hostname"])
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    for name in names:
        path = os.path.join(HOOK_DIR, name)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            continue
        try:
            proc = subprocess.run([path], env=env, capture_output=True, text=True, timeout=HOOK_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise IdentityError(f"hook {name} did not finish in {HOOK_TIMEOUT:.0f} s") from None
        except OSError as exc:
            raise IdentityError(f"hook {name} could not run: {exc}") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            raise IdentityError(f"hook {name} failed with exit {proc.returncode}: {tail[0]}")


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".sfmpi-new"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
