"""VMDK images, read-only: hosted sparse extents and text descriptors with flat extents.

A VMDK is a list of extents, each a run of the disk's sectors. trivmm reads:

- a *hosted sparse extent* file (magic ``KDMV``, versions 1-3): a grain directory whose
  entries point at grain tables, whose entries point at grains (``grainSize`` sectors,
  at most 2 MiB). With ``compressAlgorithm`` 1 (deflate) every grain is a zlib stream;
  with the markers flag (streamOptimized) each grain starts with its LBA (u64) and the
  stream's size (u32). When the header's ``gdOffset`` is ``GD_AT_END`` (as VMware's
  streamOptimized writer leaves it), the footer -- a copy of the header 1024 bytes before
  the end, between a footer marker and the end-of-stream marker -- holds the real one.
  Such a file is a disk by itself (monolithicSparse, streamOptimized); the descriptor
  embedded in it is checked for a createType that says so and for no parent;
- a *text descriptor* (``# Disk DescriptorFile``) naming FLAT, SPARSE and ZERO extents
  (monolithicFlat, twoGbMaxExtentFlat, twoGbMaxExtentSparse, ...). Extent file names must
  be relative and stay in the descriptor's directory (VMware writes bare names; a
  downloaded descriptor must not name /etc/shadow).

Unallocated grains (and zeroed grains, GTE 1 with the zeroed-grain flag) read as zeros.
Refused as unsupported: delta disks (a parent), VMFS extent types, seSparse, other
compression algorithms. Every table and grain is bounded and checked against its file when
a request reaches it; the grain directory at open.
"""

from __future__ import annotations

import os
import re
import struct
import sys
import zlib
from array import array
from bisect import bisect_right
from collections import OrderedDict
from typing import Any

from trivmm.images._base import DiskImage, ImageError, pread_exact

__all__ = ["VmdkImage", "MAX_GRAIN_SECTORS", "MAX_EXTENTS"]

SECTOR = 512
MAGIC = b"KDMV"
DESCRIPTOR_MAGIC = b"# Disk DescriptorFile"
_HEADER = struct.Struct("<4sIIQQQQIQQQB4sH")  # SparseExtentHeader up to compressAlgorithm
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF
FLAG_NL_DETECT = 1 << 0
FLAG_ZEROED_GTE = 1 << 2
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
COMPRESSION_NONE, COMPRESSION_DEFLATE = 0, 1
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
MAX_GRAIN_SECTORS = 4096  # 2 MiB grains
MAX_GTES = 512
MAX_GD_BYTES = 32 << 20
MAX_DESCRIPTOR = 1 << 20
MAX_EXTENTS = 1024
_GT_CACHE = 4096  # grain tables kept (2 KiB each with 512 entries)
_NO_PARENT = "ffffffff"
_SPARSE_TYPES = ("monolithicSparse", "streamOptimized")
_EXTENT_LINE = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$')
_UNSUPPORTED_EXTENTS = ("VMFS", "VMFSSPARSE", "VMFSRDM", "VMFSRAW", "SESPARSE")
_BIG_ENDIAN = sys.byteorder == "big"


def _u32_table(data: bytes) -> array[int]:
    values = array("I", data)
    if _BIG_ENDIAN:
        values.byteswap()
    return values


class _Extent:
    """``sectors`` sectors of the disk; ``read`` takes an offset within the extent."""

    def __init__(self, sectors: int) -> None:
        self.length = sectors * SECTOR

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)

    def close(self) -> None:
        pass


class _FlatExtent(_Extent):
    def __init__(self, sectors: int, fd: int, start: int) -> None:
        super().__init__(sectors)
        self._fd = fd
        self._start = start

    def read(self, offset: int, length: int) -> bytes:
        return pread_exact(self._fd, length, self._start + offset)

    def close(self) -> None:
        os.close(self._fd)


class _SparseExtent(_Extent):
    """A hosted sparse extent file (see the module's docstring)."""

    def __init__(self, path: str, fd: int, sectors: int | None = None) -> None:
        self.path = path
        self._fd = fd
        self._file_size = os.fstat(fd).st_size
        head = pread_exact(fd, min(self._file_size, SECTOR), 0)
        if len(head) < _HEADER.size or head[:4] != MAGIC:
            raise self._error("not a VMDK sparse extent (no KDMV magic)")
        fields = _HEADER.unpack_from(head)
        if fields[9] == GD_AT_END:
            fields = self._footer()
        (_, version, flags, capacity, grain, desc_offset, desc_size, gtes, _rgd, gd_offset, _overhead,
         _unclean, newlines, algorithm) = fields  # fmt: skip
        if not 1 <= version <= 3:
            raise self._error(f"unsupported VMDK sparse extent version {version}")
        if flags & FLAG_NL_DETECT and newlines != b"\n \r\n":
            raise self._error("corrupt header: its newline check fails (a file copied as text?)")
        if algorithm not in (COMPRESSION_NONE, COMPRESSION_DEFLATE):
            raise self._error(f"unsupported compression algorithm {algorithm}")
        if not 1 <= grain <= MAX_GRAIN_SECTORS:
            raise self._error(f"grain size of {grain} sectors out of range (1..{MAX_GRAIN_SECTORS})")
        if not 1 <= gtes <= MAX_GTES:
            raise self._error(f"{gtes} entries per grain table out of range (1..{MAX_GTES})")
        if capacity >= 1 << 54:
            raise self._error(f"capacity of {capacity} sectors too large")
        if sectors is not None and sectors > capacity:
            raise self._error(f"extent of {sectors} sectors is larger than the file's capacity ({capacity})")
        super().__init__(capacity if sectors is None else sectors)
        self.capacity = capacity
        self.descriptor_location = (desc_offset, desc_size)
        self._grain = grain * SECTOR
        self._gtes = gtes
        self._compressed = algorithm == COMPRESSION_DEFLATE
        self._markers = bool(flags & FLAG_MARKERS)
        self._zeroed_gte = bool(flags & FLAG_ZEROED_GTE)
        gd_entries = -(-capacity // (grain * gtes))
        if gd_entries * 4 > MAX_GD_BYTES:
            raise self._error(f"grain directory of {gd_entries} entries is larger than {MAX_GD_BYTES >> 20} MiB")
        if gd_offset * SECTOR + gd_entries * 4 > self._file_size or (gd_entries and gd_offset == 0):
            raise self._error(f"grain directory at sector {gd_offset} lies outside the file")
        self._gd = _u32_table(pread_exact(fd, gd_entries * 4, gd_offset * SECTOR))
        self._gt_cache: OrderedDict[int, array[int]] = OrderedDict()
        self._inflated: tuple[int, bytes] | None = None

    def _error(self, message: str) -> ImageError:
        return ImageError(f"{self.path}: {message}")

    def _footer(self) -> tuple[Any, ...]:
        """The header in the footer of a stream-optimized file whose header says GD_AT_END."""
        end = self._file_size // SECTOR * SECTOR
        if end < 3 * SECTOR + SECTOR:
            raise self._error("grain directory at the end, but the file is too short for a footer")
        tail = pread_exact(self._fd, 3 * SECTOR, end - 3 * SECTOR)
        marker = struct.unpack_from("<QII", tail, 0)
        eos = struct.unpack_from("<QII", tail, 2 * SECTOR)
        if marker[1:] != (0, MARKER_FOOTER) or eos != (0, 0, MARKER_EOS) or tail[SECTOR : SECTOR + 4] != MAGIC:
            raise self._error("grain directory at the end, but no valid footer before the end-of-stream marker")
        fields = _HEADER.unpack_from(tail, SECTOR)
        if fields[9] == GD_AT_END:
            raise self._error("the footer's grain directory offset is GD_AT_END too")
        return fields

    def _grain_table(self, index: int) -> array[int] | None:
        gt_sector = self._gd[index]
        if gt_sector == 0:
            return None
        table = self._gt_cache.get(gt_sector)
        if table is not None:
            self._gt_cache.move_to_end(gt_sector)
            return table
        if gt_sector * SECTOR + self._gtes * 4 > self._file_size:
            raise self._error(f"grain table at sector {gt_sector} lies past the end of the file")
        table = _u32_table(pread_exact(self._fd, self._gtes * 4, gt_sector * SECTOR))
        self._gt_cache[gt_sector] = table
        while len(self._gt_cache) > _GT_CACHE:
            self._gt_cache.popitem(last=False)
        return table

    def _grain_entry(self, grain: int) -> int:
        table = self._grain_table(grain // self._gtes)
        return 0 if table is None else table[grain % self._gtes]

    def _is_zero(self, entry: int) -> bool:
        return entry == 0 or (entry == 1 and self._zeroed_gte)

    def read(self, offset: int, length: int) -> bytes:
        parts: list[bytes] = []
        end = offset + length
        size = self._grain
        while offset < end:
            grain = offset // size
            within = offset - grain * size
            run_end = min(end, (grain + 1) * size)
            entry = self._grain_entry(grain)
            if self._is_zero(entry):
                while run_end < end and self._is_zero(self._grain_entry(grain + 1)):
                    grain += 1
                    run_end = min(end, (grain + 1) * size)
                parts.append(bytes(run_end - offset))
            elif self._compressed:
                parts.append(self._inflate(entry)[within : within + run_end - offset])
            else:
                host = self._grain_offset(entry)
                expect = entry + size // SECTOR
                while run_end < end:  # one pread for grains that follow each other in the file too
                    following = self._grain_entry(grain + 1)
                    if following != expect:
                        break
                    self._grain_offset(following)
                    grain += 1
                    expect += size // SECTOR
                    run_end = min(end, (grain + 1) * size)
                parts.append(pread_exact(self._fd, run_end - offset, host + within))
            offset = run_end
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _grain_offset(self, entry: int) -> int:
        host = entry * SECTOR
        if host >= self._file_size:
            raise self._error(f"grain at sector {entry} lies past the end of the file")
        return host

    def _inflate(self, entry: int) -> bytes:
        if self._inflated is not None and self._inflated[0] == entry:
            return self._inflated[1]
        host = self._grain_offset(entry)
        bound = 2 * self._grain + SECTOR  # what zlib may take for a grain, and more
        if self._markers:
            _lba, size = struct.unpack("<QI", pread_exact(self._fd, 12, host))
            if not 0 < size <= bound or host + 12 + size > self._file_size:
                raise self._error(f"compressed grain at sector {entry}: bad size {size}")
            packed = pread_exact(self._fd, size, host + 12)
        else:
            packed = pread_exact(self._fd, min(bound, self._file_size - host), host)
        try:
            grain = zlib.decompressobj().decompress(packed, self._grain)
        except zlib.error as exc:
            raise self._error(f"compressed grain at sector {entry} is corrupt ({exc})") from None
        if len(grain) < self._grain:
            grain += bytes(self._grain - len(grain))  # a last, short grain
        self._inflated = (entry, grain)
        return grain

    def descriptor(self) -> str | None:
        """The embedded descriptor's text, or None."""
        offset, size = self.descriptor_location
        if not offset or not size:
            return None
        if size * SECTOR > MAX_DESCRIPTOR or (offset + size) * SECTOR > self._file_size:
            raise self._error("embedded descriptor too large or outside the file")
        return pread_exact(self._fd, size * SECTOR, offset * SECTOR).split(b"\0", 1)[0].decode("utf-8", "replace")

    def close(self) -> None:
        os.close(self._fd)


def _parse_descriptor(path: str, text: str) -> tuple[dict[str, str], list[tuple[str, int, str, str | None, int]]]:
    """Its ``key=value`` settings and extents (access, sectors, type, file name, offset)."""
    settings: dict[str, str] = {}
    extents: list[tuple[str, int, str, str | None, int]] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _EXTENT_LINE.match(line)
        if match:
            access, sectors, kind, name, offset = match.groups()
            extents.append((access, int(sectors), kind.upper(), name, int(offset or 0)))
        elif "=" in line:
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip().strip('"')
        elif line.split()[0] in ("RW", "RDONLY", "NOACCESS"):
            raise ImageError(f"{path}: line {number}: malformed extent description")
    return settings, extents


def _check_parent(path: str, settings: dict[str, str]) -> None:
    parent = settings.get("parentCID", _NO_PARENT).lower()
    if parent != _NO_PARENT or "parentFileNameHint" in settings:
        raise ImageError(f"{path}: unsupported VMDK with a parent (a delta disk)")


class VmdkImage(DiskImage):
    """A read-only VMDK: its extents, in order."""

    format = "vmdk"

    def __init__(self, path: str, extents: list[_Extent]) -> None:
        super().__init__(path, size=sum(e.length for e in extents), readonly=True)
        self._extents = extents
        self._starts: list[int] = []
        start = 0
        for extent in extents:
            self._starts.append(start)
            start += extent.length

    @classmethod
    def open(cls, path: str, *, readonly: bool) -> VmdkImage:
        if not readonly:
            raise ImageError(f"{path}: VMDK images are read-only in trivmm; open with readonly=True")
        extents: list[_Extent] = []
        try:
            fd = _open(path)
            try:
                head = pread_exact(fd, SECTOR, 0)
                if head.startswith(MAGIC):
                    sparse = _SparseExtent(path, fd)
                    extents.append(sparse)
                    text = sparse.descriptor()
                    if text is not None:
                        settings, _ = _parse_descriptor(path, text)
                        _check_parent(path, settings)
                        kind = settings.get("createType", "monolithicSparse")
                        if kind not in _SPARSE_TYPES:
                            raise ImageError(f"{path}: a sparse extent of a {kind} disk, not a disk by itself; "
                                             "open its descriptor file")  # fmt: skip
                    return cls(path, extents)
                size = os.fstat(fd).st_size
            finally:
                if not extents:
                    os.close(fd)
            if not head.startswith(DESCRIPTOR_MAGIC):
                raise ImageError(f"{path}: not a VMDK image (no KDMV magic or descriptor)")
            if size > MAX_DESCRIPTOR:
                raise ImageError(f"{path}: descriptor file of {size} bytes is too large")
            with open(path, "rb") as f:
                text = f.read(MAX_DESCRIPTOR).split(b"\0", 1)[0].decode("utf-8", "replace")
            cls._open_extents(path, text, extents)
            if not extents:
                raise ImageError(f"{path}: descriptor names no extents")
            return cls(path, extents)
        except OSError as exc:
            for extent in extents:
                extent.close()
            raise ImageError(f"{path}: {exc.strerror or exc}") from exc
        except BaseException:
            for extent in extents:
                extent.close()
            raise

    @staticmethod
    def _open_extents(path: str, text: str, extents: list[_Extent]) -> None:
        settings, described = _parse_descriptor(path, text)
        _check_parent(path, settings)
        if len(described) > MAX_EXTENTS:
            raise ImageError(f"{path}: {len(described)} extents (at most {MAX_EXTENTS})")
        total = 0
        directory = os.path.dirname(path)
        for access, sectors, kind, name, offset in described:
            total += sectors
            if total >= 1 << 54:
                raise ImageError(f"{path}: extents add up to more sectors than a disk can have")
            if access == "NOACCESS" or kind in _UNSUPPORTED_EXTENTS:
                raise ImageError(f"{path}: unsupported extent type {access} {kind}")
            if kind == "ZERO":
                extents.append(_Extent(sectors))
                continue
            if kind not in ("FLAT", "SPARSE") or not name:
                raise ImageError(f"{path}: unsupported extent type {kind}")
            parts = name.replace("\\", "/").split("/")
            if name.startswith(("/", "\\")) or ".." in parts:
                raise ImageError(f"{path}: extent file {name!r} lies outside the descriptor's directory")
            extent_path = os.path.join(directory, *parts)
            fd = _open(extent_path)
            try:
                if kind == "FLAT":
                    end = (offset + sectors) * SECTOR
                    have = os.fstat(fd).st_size
                    if end > have:
                        raise ImageError(f"{extent_path}: flat extent needs {end} bytes, the file has {have}")
                    extents.append(_FlatExtent(sectors, fd, offset * SECTOR))
                else:
                    if offset:
                        raise ImageError(f"{path}: sparse extent {name!r} with an offset")
                    extents.append(_SparseExtent(extent_path, fd, sectors))
            except BaseException:
                os.close(fd)
                raise

    def _read(self, offset: int, length: int) -> bytes:
        parts: list[bytes] = []
        end = offset + length
        index = bisect_right(self._starts, offset) - 1
        while offset < end:
            extent, start = self._extents[index], self._starts[index]
            n = min(end, start + extent.length) - offset
            if n > 0:
                parts.append(extent.read(offset - start, n))
                offset += n
            index += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _flush(self) -> None:
        pass

    def _close(self) -> None:
        for extent in self._extents:
            extent.close()


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"{path}: cannot open: {exc.strerror or exc}") from exc
