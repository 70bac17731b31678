"""``Tap``: a Linux tap device (/dev/net/tun) that carries a guest's Ethernet frames.

The tap is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and a vnet header size of 12
(TUNSETVNETHDRSZ): each read or write is one Ethernet frame behind the 12-byte
``virtio_net_hdr_v1`` of a VERSION_1 virtio-net device, so headers pass between the guest's
rings and the host kernel unchanged -- the host kernel does whatever checksum or
segmentation work a header asks for. Two facts of the kernel's side matter to a device:

* the kernel fills only the first 10 bytes of the header on a read (``struct
  virtio_net_hdr``) and skips the last two (``num_buffers``): the device writes those;
* what the kernel may hand us (partial checksums, TSO super-frames) is what
  ``set_offload`` (TUNSETOFFLOAD) allows. With none allowed -- the state after ``open`` --
  frames come fully checksummed and segmented.

The fd is non-blocking: ``read_into``/``write_frame`` never wait, and a backend awaits the fd
through its event loop (``wait_readable``/``wait_writable``: epoll on trio and asyncio).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Sequence

import anyio

from trivmm.errors import ConfigError
from trivmm.eventfd import close_watched_fd

__all__ = [
    "Tap", "VNET_HDR_SIZE", "TUN_F_CSUM", "TUN_F_TSO4", "TUN_F_TSO6", "TUN_F_TSO_ECN", "TUN_F_UFO",
    "IFNAMSIZ",
]  # fmt: skip

TUN_DEVICE = "/dev/net/tun"
IFNAMSIZ = 16  # interface names: at most 15 bytes and a NUL
VNET_HDR_SIZE = 12  # struct virtio_net_hdr_v1 (with num_buffers): what VERSION_1 devices use

# <linux/if_tun.h>
_TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
_TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int): the flags by value
_TUNGETFEATURES = 0x800454CF  # _IOR('T', 207, unsigned int)
_TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int): a pointer to the size
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01  # the kernel may hand us frames with a partial checksum (NEEDS_CSUM)
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: ifr_name, then ifr_flags in the union (40 bytes)
_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR


class Tap:
    """An open tap queue: one fd, frames behind a ``VNET_HDR_SIZE``-byte vnet header.

    ``Tap.open(name)`` makes one; the constructor wraps an fd that already behaves like
    one (tests pass one end of a SOCK_SEQPACKET socket pair: one datagram per frame).
    """

    def __init__(self, fd: int, name: str) -> None:
        self._fd = fd
        self.name = name
        self.offload = 0  # the TUN_F_* flags last set

    @classmethod
    def open(cls, name: str | None = None) -> Tap:
        """Create a tap (named ``trivmm%d`` by the kernel when ``name`` is None) or attach to
        the existing tap ``name``. Without TUNSETPERSIST a tap created here goes away when
        closed; an existing (persistent) one stays. Raises ``ConfigError`` naming the tap."""
        what = f"tap {name}" if name else "a new tap"
        if name is not None:
            raw = name.encode()
            if not raw or len(raw) >= IFNAMSIZ or any(c in raw for c in b"/:\0") or name.split() != [name] \
                    or name in (".", ".."):  # fmt: skip
                raise ConfigError(f"bad tap name {name!r}: 1 to {IFNAMSIZ - 1} bytes, without / : or blanks")
        else:
            raw = b"trivmm%d"
        try:
            fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"cannot open {what}: {TUN_DEVICE}: {exc.strerror}") from None
        try:
            try:
                features = struct.unpack("I", fcntl.ioctl(fd, _TUNGETFEATURES, bytes(4)))[0]
            except OSError as exc:
                raise ConfigError(f"cannot open {what}: {TUN_DEVICE} is not a tun device "
                                  f"(TUNGETFEATURES: {exc.strerror})") from None  # fmt: skip
            if features & _FLAGS != _FLAGS:
                raise ConfigError(f"cannot open {what}: the host's tun driver lacks IFF_TAP, IFF_NO_PI "
                                  f"or IFF_VNET_HDR (features {features:#x})")  # fmt: skip
            try:
                reply = fcntl.ioctl(fd, _TUNSETIFF, _IFREQ.pack(raw, _FLAGS))
            except OSError as exc:
                raise ConfigError(f"cannot open {what}: {_setiff_reason(exc)}") from None
            actual = _IFREQ.unpack(reply)[0].rstrip(b"\0").decode(errors="replace")
            try:
                fcntl.ioctl(fd, _TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
                fcntl.ioctl(fd, _TUNSETOFFLOAD, 0)
            except OSError as exc:
                raise ConfigError(f"cannot set up tap {actual}: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, actual)

    # --- the fd ----------------------------------------------------------------------------
    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise anyio.ClosedResourceError
        return self._fd

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def set_offload(self, flags: int) -> None:
        """What the kernel may hand us (TUNSETOFFLOAD: ``TUN_F_*``): exactly the offloads the
        guest accepted. Raises OSError when the kernel refuses."""
        fcntl.ioctl(self.fd, _TUNSETOFFLOAD, flags)
        self.offload = flags

    # --- frames ----------------------------------------------------------------------------
    def read_into(self, buffer: bytearray | memoryview) -> int | None:
        """Read one frame (vnet header first) into ``buffer``; its length, or None when none
        is waiting. A frame longer than ``buffer`` is cut short, and the length returned may
        then exceed ``len(buffer)`` (the kernel reports the whole frame) or equal it (a
        socket): a caller treats ``>= len(buffer)`` as too long."""
        try:
            return os.readv(self.fd, [buffer])
        except BlockingIOError:
            return None

    def read_frame(self, limit: int = 65536 + VNET_HDR_SIZE) -> bytes | None:
        """One frame, vnet header first, as bytes (None when none is waiting)."""
        buffer = bytearray(limit)
        length = self.read_into(buffer)
        return None if length is None else bytes(buffer[: min(length, limit)])

    def write_frame(self, parts: Sequence[bytes | bytearray | memoryview]) -> bool:
        """Write one frame gathered from ``parts`` (vnet header first): True when the kernel
        took it, False when it would block (EAGAIN). Other errors are OSError (EIO: the tap
        is down; EINVAL: the kernel refused the header or the frame)."""
        try:
            os.writev(self.fd, parts)
        except BlockingIOError:
            return False
        return True

    async def wait_readable(self) -> None:
        await anyio.wait_readable(self.fd)

    async def wait_writable(self) -> None:
        await anyio.wait_writable(self.fd)

    def close(self) -> None:
        """Close the fd (a tap created by ``open`` disappears); a task waiting on it gets
        ``anyio.ClosedResourceError``. On the event loop's thread, or with no task waiting."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            close_watched_fd(fd)

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"<Tap {self.name} fd={self._fd}>"


def _setiff_reason(exc: OSError) -> str:
    """TUNSETIFF's errors, in words."""
    if exc.errno == errno.EPERM:
        return "permission denied (creating a tap, or attaching to one owned by another user, needs CAP_NET_ADMIN)"
    if exc.errno == errno.EBUSY:
        return "it is in use (another process has it open)"
    if exc.errno == errno.EINVAL:
        return "an interface of that name exists and is not a tap (or its flags conflict)"
    return exc.strerror or str(exc)
