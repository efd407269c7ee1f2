"""A tap that lives exactly as long as the descriptor to it.

pyroute2 creates persistent taps (what family members get, on the bridge).
The checkpoint receiver needs a tap only so its virtio-net negotiates the same
offloads as the parent's; a non-persistent one, opened here with the TUNSETIFF
ioctl and handed to QEMU as an fd, disappears when QEMU exits: nothing to leak.
"""
from __future__ import annotations

import fcntl
import os
import struct

from sfmpi.errors import NetworkError

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000


def open_unattached_tap(name_pattern: str = "sfrx%d") -> int:
    """An open tap descriptor (the kernel picks the name from the pattern)."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise NetworkError(f"cannot open /dev/net/tun: {exc.strerror}") from None
    try:
        ifr = struct.pack("16sH22x", name_pattern.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as exc:
        os.close(fd)
        raise NetworkError(f"cannot create a tap device: {exc.strerror}") from None
    return fd


def open_tap(name: str) -> int:
    """An open descriptor of the existing (persistent) tap `name`, in the calling
    thread's namespace: a QEMU outside that namespace can still use it."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise NetworkError(f"cannot open /dev/net/tun: {exc.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
    except OSError as exc:
        os.close(fd)
        raise NetworkError(f"cannot open tap {name}: {exc.strerror}") from None
    return fd
