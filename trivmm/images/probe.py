"""Which format a disk image is in, and ``open_image``.

Probing looks at the first sector only: the qcow2 magic ``QFI\\xfb``, the VMDK sparse magic
``KDMV`` or a VMDK text descriptor (``# Disk DescriptorFile``), and raw otherwise.

A guest owns every byte of a raw disk, first sector included. If a guest writes a qcow2
header there and the host later probes the file, the host opens a qcow2 image whose backing
file the guest named -- any file the VMM can read (QEMU's CVE-2008-2004). Two rules keep a
probed raw image raw, as QEMU's raw driver does:

- at open, a file probed as raw that starts like a format trivmm does not read (QED, VDI,
  VHD, VHDX, LUKS, ...) is refused unless ``format="raw"`` says to use its bytes as a disk;
- while open, a write to a *probed* raw image that would make its first sector probe as
  anything but raw is refused (``RawImage``). With ``format="raw"`` the guest may write
  anything: the user said what the file is, and must say it again next time.

Backing files follow the same rules: the format named in the qcow2 header extension, or
else probed, never with a foreign magic accepted as raw.
"""

from __future__ import annotations

import os
import struct

from trivmm.images._base import DiskImage, ImageError

__all__ = ["FORMATS", "probe_format", "foreign_format", "open_image", "MAX_BACKING_DEPTH"]

FORMATS = ("raw", "qcow2", "vmdk")
PROBE_BYTES = 512
MAX_BACKING_DEPTH = 16  # backing files below the image a user opened
_VMDK_DESCRIPTOR = b"# Disk DescriptorFile"
# Formats trivmm does not read, by what their first sector holds: (name, offset, magic).
_FOREIGN = (
    ("QED", 0, b"QED\x00"),
    ("VDI", 0x40, struct.pack("<I", 0xBEDA107F)),
    ("VHD", 0, b"conectix"),
    ("VHDX", 0, b"vhdxfile"),
    ("LUKS", 0, b"LUKS\xba\xbe"),
    ("VMDK version 3 (COWD)", 0, b"COWD"),
    ("Parallels", 0, b"WithoutFreeSpace"),
    ("Parallels", 0, b"WithouFreSpacExt"),
    ("Bochs", 0, b"Bochs Virtual HD Image"),
    ("cloop", 0, b"#!/bin/sh\n#V2.0 Format"),
)


def probe_format(head: bytes) -> str:
    """``"qcow2"``, ``"vmdk"`` or ``"raw"`` for a file whose first bytes are ``head``."""
    if head.startswith(b"QFI\xfb"):
        return "qcow2"
    if head.startswith(b"KDMV") or head.startswith(_VMDK_DESCRIPTOR):
        return "vmdk"
    return "raw"


def foreign_format(head: bytes) -> str | None:
    """The name of a format trivmm does not read that ``head`` starts like, or None."""
    for name, offset, magic in _FOREIGN:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


def probe_problem(head: bytes) -> str | None:
    """Why ``head`` may not be the first sector of a probed raw image, or None."""
    probed = probe_format(head)
    if probed != "raw":
        return f"a {probed} image"
    foreign = foreign_format(head)
    return None if foreign is None else f"a {foreign} image"


def open_image(path: str | os.PathLike[str], *, format: str | None = None, readonly: bool = False) -> DiskImage:
    """Open the disk image at ``path``: ``format`` ``"raw"``, ``"qcow2"``, ``"vmdk"``, or None
    to probe. Raises ``ImageError`` (a ``ConfigError``) with one line naming the file."""
    return open_chained(os.fspath(path), format, readonly=readonly, chain=())


def open_chained(path: str, format: str | None, *, readonly: bool, chain: tuple[str, ...]) -> DiskImage:
    """``open_image`` for an image ``chain`` (the real paths of the images above it) uses as backing."""
    if format is not None and format not in FORMATS:
        raise ImageError(f"{path}: unsupported image format {format!r} (trivmm reads {', '.join(FORMATS)})")
    real = os.path.realpath(path)
    if real in chain:
        raise ImageError(f"{path}: backing file loop (the file is its own backing file, directly or not)")
    if len(chain) > MAX_BACKING_DEPTH:
        raise ImageError(f"{path}: backing chain deeper than {MAX_BACKING_DEPTH} files")
    try:
        with open(path, "rb") as f:
            head = f.read(PROBE_BYTES)
    except OSError as exc:
        raise ImageError(f"{path}: cannot open: {exc.strerror or exc}") from exc
    probed = format is None
    if format is None:
        format = probe_format(head)
        if format == "raw":
            foreign = foreign_format(head)
            if foreign is not None:
                raise ImageError(f"{path}: looks like a {foreign} image, which trivmm does not read; "
                                 "pass format='raw' to use its bytes as a raw disk")  # fmt: skip
    if format == "raw":
        from trivmm.images.raw import RawImage

        return RawImage.open(path, readonly=readonly, probed=probed)
    if format == "qcow2":
        from trivmm.images.qcow2 import Qcow2Image

        return Qcow2Image.open(path, readonly=readonly, chain=(*chain, real))
    from trivmm.images.vmdk import VmdkImage

    return VmdkImage.open(path, readonly=readonly)
