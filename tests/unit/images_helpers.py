"""Helpers for tests/unit/test_images.py: qemu-img and qemu-io, patching image metadata,
and a VMware-style stream-optimized VMDK writer (qemu-img writes its grain directory up
front; VMware's writer leaves it for the footer, which this one does too)."""

from __future__ import annotations

import random
import struct
import subprocess
import zlib
from pathlib import Path

from trivmm.images.qcow2 import OFFSET_MASK, Qcow2Header, parse_header

SECTOR = 512


def qemu_img(*args: str | Path, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    """Run qemu-img; fail the test, with its output, on an exit status not in ``ok``."""
    proc = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode in ok, f"qemu-img {' '.join(map(str, args))}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
    return proc


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    proc = subprocess.run([*argv, str(path)], capture_output=True, text=True)
    assert proc.returncode == 0 and "error" not in proc.stdout.lower(), f"{argv}: {proc.stdout}{proc.stderr}"


def assert_clean(path: Path) -> None:
    """``qemu-img check``: exit 0, no errors, no leaks."""
    proc = qemu_img("check", path, ok=(0, 1, 2, 3))
    assert proc.returncode == 0 and "No errors were found" in proc.stdout, f"{path}:\n{proc.stdout}{proc.stderr}"


def assert_same(path: Path, model: bytes, fmt: str = "qcow2") -> None:
    """``qemu-img compare`` of the image with ``model`` as a raw file."""
    raw = path.with_name(path.name + ".model")
    raw.write_bytes(model)
    proc = qemu_img("compare", "-f", fmt, "-F", "raw", path, raw, ok=(0, 1))
    assert proc.returncode == 0, f"{path} differs from the model: {proc.stdout}{proc.stderr}"
    raw.unlink()


def as_raw(path: Path, fmt: str | None = None) -> bytes:
    """The disk's bytes as qemu-img reads them."""
    out = path.with_name(path.name + ".raw-out")
    qemu_img("convert", *(("-f", fmt) if fmt else ()), "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def disk_content(rng: random.Random, size: int, *, pieces: int = 24) -> bytes:
    """Random runs, runs of one repeated byte (compressible), holes of zeros."""
    data = bytearray(size)
    for _ in range(pieces):
        offset = rng.randrange(size)
        n = min(rng.randrange(1, max(2, size // 8)), size - offset)
        if rng.random() < 0.5:
            data[offset : offset + n] = rng.randbytes(n)
        else:
            data[offset : offset + n] = bytes([rng.randrange(1, 256)]) * n
    return bytes(data)


# --- qcow2 metadata ----------------------------------------------------------------------------
def header(path: Path) -> Qcow2Header:
    data = path.read_bytes()
    cluster_bits = struct.unpack_from(">I", data, 20)[0]
    return parse_header(str(path), data[: 1 << cluster_bits], len(data))


def patch(path: Path, offset: int, fmt: str, *values: int | bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, *values))


def peek(path: Path, offset: int, fmt: str) -> int:
    with path.open("rb") as f:
        f.seek(offset)
        return int(struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0])


def l1_entry_offset(path: Path, guest: int) -> int:
    """Where in the file the L1 entry for ``guest`` lies."""
    h = header(path)
    return h.l1_offset + 8 * (guest >> (2 * h.cluster_bits - 3))


def l2_entry_offset(path: Path, guest: int) -> int:
    """Where in the file the L2 entry for ``guest`` lies (its L2 table must exist)."""
    h = header(path)
    l2 = peek(path, l1_entry_offset(path, guest), ">Q") & OFFSET_MASK
    assert l2, "no L2 table there"
    return l2 + 8 * ((guest >> h.cluster_bits) & ((1 << (h.cluster_bits - 3)) - 1))


# --- a VMware-style stream-optimized VMDK ------------------------------------------------------
_VMDK_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")


def _vmdk_header(capacity: int, grain: int, gtes: int, gd_offset: int, overhead: int, desc_sectors: int) -> bytes:
    flags = 1 | (1 << 16) | (1 << 17)  # newline check, compressed grains, markers
    raw = _VMDK_HEADER.pack(b"KDMV", 3, flags, capacity, grain, 1, desc_sectors, gtes, 0, gd_offset, overhead,
                            0, b"\n \r\n", 1)  # fmt: skip
    return raw.ljust(SECTOR, b"\0")


def _marker(sectors: int, kind: int) -> bytes:
    return struct.pack("<QII", sectors, 0, kind).ljust(SECTOR, b"\0")


def stream_optimized_vmdk(data: bytes, name: str, *, grain: int = 128, gtes: int = 512) -> bytes:
    """``data`` (a whole number of sectors) as VMware writes a streamOptimized VMDK: the
    header's gdOffset is GD_AT_END, and the footer holds the real one."""
    capacity = len(data) // SECTOR
    descriptor = (f'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="streamOptimized"\n'
                  f'\n# Extent description\nRW {capacity} SPARSE "{name}"\n').encode()  # fmt: skip
    desc_sectors = -(-len(descriptor) // SECTOR)
    overhead = 1 + desc_sectors
    out = bytearray(_vmdk_header(capacity, grain, gtes, 0xFFFF_FFFF_FFFF_FFFF, overhead, desc_sectors))
    out += descriptor.ljust(desc_sectors * SECTOR, b"\0")
    grain_bytes = grain * SECTOR
    grains = -(-capacity // grain)
    entries = [0] * (-(-grains // gtes) * gtes)
    for index in range(grains):
        chunk = data[index * grain_bytes : (index + 1) * grain_bytes]
        if not any(chunk):
            continue
        entries[index] = len(out) // SECTOR
        packed = zlib.compress(chunk.ljust(grain_bytes, b"\0"))
        body = struct.pack("<QI", index * grain, len(packed)) + packed
        out += body.ljust(-(-len(body) // SECTOR) * SECTOR, b"\0")
    directory = []
    gt_sectors = -(-gtes * 4 // SECTOR)
    for t in range(len(entries) // gtes):
        out += _marker(gt_sectors, 1)
        directory.append(len(out) // SECTOR)
        out += struct.pack(f"<{gtes}I", *entries[t * gtes : (t + 1) * gtes]).ljust(gt_sectors * SECTOR, b"\0")
    gd_sectors = -(-len(directory) * 4 // SECTOR)
    out += _marker(gd_sectors, 2)
    gd_offset = len(out) // SECTOR
    out += struct.pack(f"<{len(directory)}I", *directory).ljust(gd_sectors * SECTOR, b"\0")
    out += _marker(1, 3)
    out += _vmdk_header(capacity, grain, gtes, gd_offset, overhead, desc_sectors)
    out += _marker(0, 0)
    return bytes(out)
