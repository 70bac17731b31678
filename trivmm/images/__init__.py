"""Disk images for virtio-blk: raw, qcow2 (read and write) and VMDK (read-only), used as
the user already has them.

``open_image(path, format=None, readonly=False)`` returns a ``DiskImage``: ``size``,
``readonly``, and synchronous requests -- ``read``, ``write``, ``discard``,
``write_zeroes``, ``flush``, ``close`` -- that the device calls from worker threads (each
image serializes its requests with its own lock), and ``discard_granularity`` (the unit a
discard frees: 512, or a qcow2 cluster). Whatever goes wrong is an ``ImageError`` (a
``ConfigError``): one line naming the file. probe.py says how a format is recognised and
why a probed raw image that looks like something else is refused; raw.py, qcow2.py and
vmdk.py say what each format supports. Not done: QEMU's image locking (OFD locks on bytes
100-299), so nothing stops trivmm and a running QEMU from writing the same image at once.

Why not libqcow/libvmdk (PyPI's ``libqcow-python`` 20260703 and ``libvmdk-python``
20260714, checked on 2026-11-27): both install as manylinux wheels for CPython 3.11 here and read qemu-img's
images correctly, but both are read-only -- no write path at all, and qcow2 must be
written -- and both are C parsers of untrusted files running inside the VMM's process,
versioned by date, with binary wheels per CPython release. trivmm would still need its own
qcow2 writer with its own metadata checks, and reading through a second, unaudited
implementation of the same format would not make that smaller. So both formats are
implemented here, in Python, with the bounds documented in their modules.
"""

from trivmm.images._base import DiskImage, ImageError
from trivmm.images.probe import FORMATS, foreign_format, open_image, probe_format

__all__ = ["DiskImage", "ImageError", "FORMATS", "open_image", "probe_format", "foreign_format"]
