"""qcow2 images, versions 2 and 3, read and write (docs/interop/qcow2.txt in QEMU's tree).

What is read: L1/L2 translation; unallocated clusters from the backing file (or zeros); zero
clusters (v3's flag, with or without a preallocated host cluster); compressed clusters
(zlib's raw deflate, as QEMU writes them); internal snapshots are left alone and shared
clusters copied before a write. Refcounts of 1 to 64 bits (every ``refcount_order``); cluster
sizes 512 B to 2 MiB. Refused with an "unsupported" error: version 1, encryption, an
external data file, extended L2 entries, zstd compression, unknown incompatible features.

Writes keep the image valid for ``qemu-img check`` after every request: no errors, no
leaks. There are no lazy refcounts and no write-back metadata cache: each request updates
the refcounts, then writes the data, then the L2 entry, then drops the old cluster's
reference -- in that order, so a crash of this process in between can only leak clusters,
never let two owners share one. (Against power loss the order holds once ``flush()`` is
done: nothing is fsynced between the steps, as with QEMU's ``cache=writeback``.) The dirty
bit is therefore never set; an image found dirty (another program's lazy refcounts) or
flagged corrupt opens read-only only. So does one with persistent dirty bitmaps (autoclear
bit 0): the spec would have a program that does not maintain them clear that bit, after
which QEMU ignores the bitmaps and ``qemu-img check`` counts their clusters as leaks, and a
backup tool that trusted them would miss the guest's writes. Unknown autoclear bits are
cleared on a read-write open, as the spec asks.

Allocation takes the lowest clusters whose refcount is 0 (like QEMU), never a cluster that
is metadata. A refcount block is placed where the allocator says; if that cluster lies in
the range the new block itself covers, the block counts itself. When the refcount table is
full, a larger one (twice what is needed) is built in memory, its clusters allocated through
the larger table (so the blocks that describe them can be created), written, switched to in
the header with one write, and the old table freed.

Hostile images: the header's fields, the L1 table, the refcount table and the snapshot table
are bounded and checked against the file at open; L2 tables, data clusters and compressed
clusters when a request reaches them (``ImageError`` then: a cluster that starts past the end
of the file, or is not aligned; where the file ends inside a cluster, the rest reads as
zeros, as in QEMU). On a read-write open every metadata cluster
(header, L1 and snapshot L1 tables, refcount table and blocks, every L2 table, the snapshot
table) is recorded, and overlapping metadata refuses the open; a write is never done in a
cluster that is metadata, nor in one whose refcount is not 1, whatever the L2 entry says.
After a request that failed half-way, the image refuses further writes (reads still work).

Caches: L2 tables and refcount blocks, bounded LRU (write-through: every change goes to
the file at once, so eviction costs nothing); the last decompressed cluster. A read costs
one ``pread`` per run of host-contiguous clusters.
"""

from __future__ import annotations

import os
import struct
import sys
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable

import attrs

from trivmm.images._base import DiskImage, ImageError, pread_exact, pwrite_all

__all__ = ["Qcow2Image", "Qcow2Header", "parse_header", "MAX_L1_BYTES", "MAX_REFTABLE_BYTES"]

MAGIC = b"QFI\xfb"
_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # the 72-byte version 2 header
_V3 = struct.Struct(">QQQII")  # what version 3 adds: features, refcount_order, header_length
V3_HEADER_LENGTH = 104
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21  # 512 B .. 2 MiB
MAX_L1_BYTES = 32 << 20  # QEMU's QCOW_MAX_L1_SIZE
MAX_REFTABLE_BYTES = 8 << 20  # QEMU's QCOW_MAX_REFTABLE_SIZE
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024
MAX_SNAPSHOT_L1_BYTES = 32 << 20  # all snapshots' L1 tables together, read at a read-write open
MAX_BACKING_NAME = 1023
MAX_HOST_OFFSET = 1 << 56  # L1/L2 entries hold bits 9..55 of a host offset
_L2_CACHE_BYTES = 8 << 20
_REFBLOCK_CACHE_BYTES = 8 << 20
_MIN_CACHED = 4

# Incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
AUTOCLEAR_BITMAPS = 1 << 0
_INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
# Header extensions
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
# Table entries
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # L1 and standard L2 entries: bits 9..55
REFT_OFFSET_MASK = 0xFFFF_FFFF_FFFF_FE00
_SECTOR = 512
_COMPRESSED_WBITS = -12  # raw deflate with a 4 KiB window, as QEMU's qcow2 writes it
_BIG_ENDIAN = sys.byteorder == "big"

# Kinds of L2 entry
_UNALLOCATED, _ZERO, _DATA, _COMPRESSED = range(4)


def _table(data: bytes) -> array[int]:
    """Big-endian u64s as an array of native ints."""
    values = array("Q", data)
    if not _BIG_ENDIAN:
        values.byteswap()
    return values


def _table_bytes(values: array[int] | list[int]) -> bytes:
    return struct.pack(f">{len(values)}Q", *values)


def _align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


@attrs.frozen
class Qcow2Header:
    """The fields of a validated qcow2 header."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_offset: int
    reftable_offset: int
    reftable_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int
    compatible: int
    autoclear: int
    refcount_order: int
    header_length: int
    backing_file: str | None
    backing_format: str | None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def parse_header(path: str, data: bytes, file_size: int) -> Qcow2Header:
    """Validate the header cluster ``data`` (the file's first cluster, or all of a shorter
    file) of a file of ``file_size`` bytes; ``ImageError`` says what is wrong."""

    def fail(message: str) -> ImageError:
        return ImageError(f"{path}: {message}")

    if len(data) < _V2.size:
        raise fail(f"file too short for a qcow2 header ({len(data)} bytes)")
    (magic, version, backing_offset, backing_size, cluster_bits, size, crypt_method, l1_size, l1_offset,
     reftable_offset, reftable_clusters, nb_snapshots, snapshots_offset) = _V2.unpack_from(data)  # fmt: skip
    if magic != MAGIC:
        raise fail("not a qcow2 image (no QFI\\xfb magic)")
    if version == 1:
        raise fail("qcow version 1 images are unsupported (convert with qemu-img convert -O qcow2)")
    if version not in (2, 3):
        raise fail(f"unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise fail(f"cluster_bits {cluster_bits} out of range ({MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}: "
                   "512 B to 2 MiB clusters)")  # fmt: skip
    cluster_size = 1 << cluster_bits
    incompatible = compatible = autoclear = 0
    refcount_order, header_length = 4, _V2.size
    compression_type = 0
    if version == 3:
        if len(data) < V3_HEADER_LENGTH:
            raise fail(f"file too short for a qcow2 version 3 header ({len(data)} bytes)")
        incompatible, compatible, autoclear, refcount_order, header_length = _V3.unpack_from(data, _V2.size)
        if not V3_HEADER_LENGTH <= header_length <= min(cluster_size, len(data)):
            raise fail(f"header_length {header_length} out of range ({V3_HEADER_LENGTH}..{cluster_size})")
        if header_length > V3_HEADER_LENGTH:
            compression_type = data[V3_HEADER_LENGTH]
    unknown = incompatible & ~_INCOMPAT_KNOWN
    if unknown:
        raise fail(f"unsupported incompatible features 0x{unknown:x}")
    if incompatible & INCOMPAT_DATA_FILE:
        raise fail("unsupported feature: external data file")
    if incompatible & INCOMPAT_EXTL2:
        raise fail("unsupported feature: extended L2 entries (subclusters)")
    if compression_type == 1:
        raise fail("unsupported compression type zstd (only zlib)")
    if compression_type != 0:
        raise fail(f"unknown compression type {compression_type}")
    if crypt_method != 0:
        raise fail(f"unsupported feature: encryption (method {crypt_method})")
    if refcount_order > 6:
        raise fail(f"refcount_order {refcount_order} out of range (0..6)")
    # The virtual size, and the L1 table that maps it
    l2_entries = cluster_size // 8
    l1_needed = -(-size // (cluster_size * l2_entries))
    if l1_needed > MAX_L1_BYTES // 8 or size >= 1 << 63:
        raise fail(f"virtual size {size} too large for {cluster_size}-byte clusters")
    if l1_size < l1_needed:
        raise fail(f"L1 table of {l1_size} entries too small for the virtual size {size}")
    if l1_size > MAX_L1_BYTES // 8:
        raise fail(f"L1 table of {l1_size} entries is larger than {MAX_L1_BYTES >> 20} MiB")
    if l1_size:
        _check_region(fail, "L1 table", l1_offset, l1_size * 8, cluster_size, file_size)
    if reftable_clusters == 0:
        raise fail("no refcount table (refcount_table_clusters is 0)")
    if reftable_clusters > MAX_REFTABLE_BYTES >> cluster_bits:
        raise fail(f"refcount table of {reftable_clusters} clusters is larger than {MAX_REFTABLE_BYTES >> 20} MiB")
    _check_region(fail, "refcount table", reftable_offset, reftable_clusters << cluster_bits, cluster_size, file_size)
    if nb_snapshots > MAX_SNAPSHOTS:
        raise fail(f"{nb_snapshots} snapshots (at most {MAX_SNAPSHOTS})")
    if nb_snapshots:
        _check_region(fail, "snapshot table", snapshots_offset, 1, cluster_size, file_size)
    # The backing file's name, at the end of the header cluster
    backing_file = None
    extensions_end = min(cluster_size, len(data))
    if backing_offset:
        if backing_size > MAX_BACKING_NAME:
            raise fail(f"backing file name too long ({backing_size} bytes, at most {MAX_BACKING_NAME})")
        if backing_offset + backing_size > min(cluster_size, len(data)) or backing_offset < header_length:
            raise fail("backing file name outside the header cluster")
        try:
            backing_file = data[backing_offset : backing_offset + backing_size].decode()
        except UnicodeDecodeError:
            raise fail("backing file name is not UTF-8") from None
        if not backing_file:
            backing_file = None
        extensions_end = backing_offset
    # Header extensions: type, length, data padded to 8 bytes; type 0 ends them
    backing_format = None
    pos = header_length
    while pos + 8 <= extensions_end:
        ext_type, ext_length = struct.unpack_from(">II", data, pos)
        if ext_type == EXT_END:
            break
        if pos + 8 + ext_length > extensions_end:
            raise fail(f"header extension 0x{ext_type:08x} runs past the header")
        body = data[pos + 8 : pos + 8 + ext_length]
        if ext_type == EXT_BACKING_FORMAT:
            backing_format = body.decode("ascii", "replace")
        elif ext_type == EXT_CRYPTO:
            raise fail("unsupported feature: encryption (a crypto header extension)")
        elif ext_type == EXT_DATA_FILE:
            raise fail("unsupported feature: external data file")
        pos += 8 + _align_up(ext_length, 8)
    return Qcow2Header(version=version, cluster_bits=cluster_bits, size=size, l1_size=l1_size,
                       l1_offset=l1_offset, reftable_offset=reftable_offset, reftable_clusters=reftable_clusters,
                       nb_snapshots=nb_snapshots, snapshots_offset=snapshots_offset, incompatible=incompatible,
                       compatible=compatible, autoclear=autoclear, refcount_order=refcount_order,
                       header_length=header_length, backing_file=backing_file,
                       backing_format=backing_format)  # fmt: skip


def _check_region(fail: Callable[[str], ImageError], what: str, offset: int, length: int, cluster_size: int,
                  file_size: int) -> None:  # fmt: skip
    """A table must start on a cluster boundary past the header, and lie inside the file."""
    if offset % cluster_size or offset == 0:
        raise fail(f"{what} offset 0x{offset:x} is not a cluster boundary past the header")
    if offset + length > file_size:
        raise fail(f"{what} at 0x{offset:x} ({length} bytes) lies past the end of the file ({file_size} bytes)")


class Qcow2Image(DiskImage):
    """A qcow2 image (see the module's docstring for what is supported and how writes go)."""

    format = "qcow2"

    def __init__(self, path: str, fd: int, header: Qcow2Header, *, file_size: int, readonly: bool,
                 backing: DiskImage | None) -> None:  # fmt: skip
        super().__init__(path, size=header.size, readonly=readonly)
        self.header = header
        self.backing = backing
        self._fd = fd
        self._file_size = file_size
        self._cb = header.cluster_bits
        self._cs = 1 << header.cluster_bits
        self.discard_granularity = self._cs
        self._l2_bits = header.cluster_bits - 3
        self._l2_mask = (1 << self._l2_bits) - 1
        self._v3 = header.version >= 3
        # compressed L2 entries: host offset in bits 0..x-1, extra sectors in x..61
        self._csize_shift = 62 - (header.cluster_bits - 8)
        self._csize_mask = (1 << (header.cluster_bits - 8)) - 1
        self._coffset_mask = (1 << self._csize_shift) - 1
        # refcounts
        self._rc_bits = 1 << header.refcount_order
        self._rc_max = (1 << self._rc_bits) - 1
        self._rb_bits = header.cluster_bits + 3 - header.refcount_order  # log2(entries per block)
        self._rt: list[int] = []
        self._rt_offset = header.reftable_offset
        self._rt_on_disk = 0  # entries the on-disk table holds
        self._growing = False
        self._free_hint = 0
        self._meta: dict[int, str] = {}  # cluster index -> what metadata lives there (read-write only)
        self._failed: str | None = None
        self._l1 = array("Q")
        self._l2_cache: OrderedDict[int, array[int]] = OrderedDict()
        self._l2_cache_max = max(_MIN_CACHED, _L2_CACHE_BYTES >> header.cluster_bits)
        self._rb_cache: OrderedDict[int, bytearray] = OrderedDict()
        self._rb_cache_max = max(_MIN_CACHED, _REFBLOCK_CACHE_BYTES >> header.cluster_bits)
        self._inflated: tuple[int, bytes] | None = None  # (L2 entry, cluster) last decompressed

    # --- open ------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str, *, readonly: bool, chain: tuple[str, ...]) -> Qcow2Image:
        """Open ``path``; ``chain``: the real paths of this image and those it backs."""
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise ImageError(f"{path}: cannot open: {exc.strerror or exc}") from exc
        image: Qcow2Image | None = None
        try:
            file_size = os.fstat(fd).st_size
            head = pread_exact(fd, min(file_size, V3_HEADER_LENGTH), 0)
            bits = struct.unpack_from(">I", head, 20)[0] if len(head) >= 24 else MIN_CLUSTER_BITS
            cluster = 1 << min(max(bits, MIN_CLUSTER_BITS), MAX_CLUSTER_BITS)
            header = parse_header(path, pread_exact(fd, min(file_size, cluster), 0), file_size)
            if not readonly and header.incompatible & INCOMPAT_CORRUPT:
                raise ImageError(f"{path}: image is flagged corrupt; open it read-only, or repair it "
                                 "with qemu-img check -r all")  # fmt: skip
            if not readonly and header.incompatible & INCOMPAT_DIRTY:
                raise ImageError(f"{path}: image is dirty (lazy refcounts not written back); open it "
                                 "read-only, or repair it with qemu-img check -r all")  # fmt: skip
            if not readonly and header.autoclear & AUTOCLEAR_BITMAPS:
                raise ImageError(f"{path}: image has persistent dirty bitmaps, which trivmm does not maintain; "
                                 "open it read-only, or remove them (qemu-img bitmap --remove)")  # fmt: skip
            backing = cls._open_backing(path, header, chain)
            image = cls(path, fd, header, file_size=file_size, readonly=readonly, backing=backing)
            image._load()
            return image
        except BaseException:
            if image is not None and image.backing is not None:
                image.backing.close()
            os.close(fd)
            raise

    @staticmethod
    def _open_backing(path: str, header: Qcow2Header, chain: tuple[str, ...]) -> DiskImage | None:
        name = header.backing_file
        if name is None:
            return None
        if name.startswith("json:") or "://" in name:
            raise ImageError(f"{path}: unsupported backing file {name!r} (only a file name)")
        fmt = header.backing_format
        if fmt is not None and fmt not in ("raw", "qcow2", "vmdk"):
            raise ImageError(f"{path}: unsupported backing file format {fmt!r}")
        backing_path = os.path.join(os.path.dirname(path), name)
        from trivmm.images.probe import open_chained

        return open_chained(backing_path, fmt, readonly=True, chain=chain)

    def _load(self) -> None:
        h = self.header
        self._l1 = _table(pread_exact(self._fd, h.l1_size * 8, h.l1_offset)) if h.l1_size else array("Q")
        if self.readonly:
            return
        cs, cb = self._cs, self._cb
        raw_rt = _table(pread_exact(self._fd, h.reftable_clusters << cb, h.reftable_offset))
        self._rt = [entry & REFT_OFFSET_MASK for entry in raw_rt]
        self._rt_on_disk = len(self._rt)
        self._mark(0, cs, "header")
        self._mark(h.l1_offset, h.l1_size * 8, "L1 table")
        self._mark(h.reftable_offset, h.reftable_clusters << cb, "refcount table")
        for offset in self._rt:
            if offset:
                self._check_cluster("refcount block", offset)
                self._mark(offset, cs, "refcount block")
        self._mark_l2_tables(self._l1)
        if h.nb_snapshots:
            self._load_snapshots()
        if h.autoclear:
            pwrite_all(self._fd, struct.pack(">Q", 0), 88)  # bits we do not know: not maintained

    def _load_snapshots(self) -> None:
        h = self.header
        pos = h.snapshots_offset
        l1_bytes = 0
        for i in range(h.nb_snapshots):
            pos = _align_up(pos, 8)  # each entry starts 8-aligned; the last one is not padded
            if pos + 40 > self._file_size:
                raise self.error(f"snapshot table entry {i} lies past the end of the file")
            entry = pread_exact(self._fd, 40, pos)
            l1_offset, l1_size, id_size, name_size = struct.unpack_from(">QIHH", entry)
            (extra_size,) = struct.unpack_from(">I", entry, 36)
            if extra_size > MAX_SNAPSHOT_EXTRA:
                raise self.error(f"snapshot {i}: extra data of {extra_size} bytes (at most {MAX_SNAPSHOT_EXTRA})")
            if l1_size > MAX_L1_BYTES // 8:
                raise self.error(f"snapshot {i}: L1 table of {l1_size} entries is larger than "
                                 f"{MAX_L1_BYTES >> 20} MiB")  # fmt: skip
            l1_bytes += l1_size * 8
            if l1_bytes > MAX_SNAPSHOT_L1_BYTES:
                raise self.error(f"unsupported: snapshot L1 tables larger than {MAX_SNAPSHOT_L1_BYTES >> 20} MiB "
                                 "in all (open read-only)")  # fmt: skip
            if l1_size:
                _check_region(self.error, f"snapshot {i} L1 table", l1_offset, l1_size * 8, self._cs,
                              self._file_size)  # fmt: skip
                self._mark(l1_offset, l1_size * 8, "snapshot L1 table")
                self._mark_l2_tables(_table(pread_exact(self._fd, l1_size * 8, l1_offset)))
            pos += 40 + extra_size + id_size + name_size
        if pos > self._file_size:
            raise self.error("snapshot table lies past the end of the file")
        self._mark(h.snapshots_offset, pos - h.snapshots_offset, "snapshot table")

    def _mark_l2_tables(self, l1: array[int]) -> None:
        for entry in l1:
            offset = entry & OFFSET_MASK
            if offset:
                self._check_cluster("L2 table", offset)
                self._mark(offset, self._cs, "L2 table")

    def _mark(self, offset: int, length: int, kind: str) -> None:
        """Record the clusters of [offset, offset+length) as metadata of ``kind``."""
        for cluster in range(offset >> self._cb, (offset + length + self._cs - 1) >> self._cb):
            known = self._meta.setdefault(cluster, kind)
            if known != kind:
                raise self.error(f"corrupt metadata: the {kind} at 0x{cluster << self._cb:x} overlaps the {known}")

    def _check_cluster(self, what: str, offset: int) -> None:
        if offset & (self._cs - 1):
            raise self.error(f"corrupt metadata: {what} offset 0x{offset:x} is not cluster-aligned")
        if offset + self._cs > self._file_size:
            raise self.error(f"corrupt metadata: {what} at 0x{offset:x} lies past the end of the file")

    # --- translation -----------------------------------------------------------------------
    def _load_l2(self, offset: int) -> array[int]:
        table = self._l2_cache.get(offset)
        if table is not None:
            self._l2_cache.move_to_end(offset)
            return table
        self._check_cluster("L2 table", offset)
        table = _table(pread_exact(self._fd, self._cs, offset))
        self._cache_l2(offset, table)
        return table

    def _cache_l2(self, offset: int, table: array[int]) -> None:
        self._l2_cache[offset] = table
        self._l2_cache.move_to_end(offset)
        while len(self._l2_cache) > self._l2_cache_max:
            self._l2_cache.popitem(last=False)

    def _entry(self, cluster: int) -> int:
        """The L2 entry of guest cluster ``cluster`` (0 where there is no L2 table)."""
        l2_offset = self._l1[cluster >> self._l2_bits] & OFFSET_MASK
        if not l2_offset:
            return 0
        return self._load_l2(l2_offset)[cluster & self._l2_mask]

    def _kind(self, entry: int) -> int:
        if entry & OFLAG_COMPRESSED:
            return _COMPRESSED
        if entry & OFLAG_ZERO:
            if not self._v3:
                raise self.error(f"corrupt metadata: zero-cluster flag in a version 2 image (L2 entry 0x{entry:x})")
            return _ZERO
        return _DATA if entry & OFFSET_MASK else _UNALLOCATED

    def _data_cluster(self, entry: int) -> int:
        """The host offset of a data (or preallocated zero) cluster, checked."""
        host = entry & OFFSET_MASK
        if host & (self._cs - 1):
            raise self.error(f"corrupt metadata: data cluster offset 0x{host:x} is not cluster-aligned")
        if host >= self._file_size:
            raise self.error(f"corrupt metadata: data cluster at 0x{host:x} lies past the end of the file")
        return host

    def _compressed_extent(self, entry: int) -> tuple[int, int]:
        """(host offset, byte length) of a compressed cluster's data."""
        offset = entry & self._coffset_mask
        if offset >= self._file_size:
            raise self.error(f"corrupt metadata: compressed cluster at 0x{offset:x} lies past the end of the file")
        sectors = ((entry >> self._csize_shift) & self._csize_mask) + 1
        return offset, sectors * _SECTOR - (offset & (_SECTOR - 1))

    # --- read ------------------------------------------------------------------------------
    def _entries(self, first: int, count: int) -> list[int]:
        """The L2 entries of ``count`` guest clusters from ``first`` (one lookup per L2 table)."""
        entries: list[int] = []
        cluster, stop = first, first + count
        while cluster < stop:
            l1_index = cluster >> self._l2_bits
            table_stop = min(stop, (l1_index + 1) << self._l2_bits)
            l2_offset = self._l1[l1_index] & OFFSET_MASK
            if l2_offset:
                index = cluster & self._l2_mask
                entries.extend(self._load_l2(l2_offset)[index : index + table_stop - cluster])
            else:
                entries.extend([0] * (table_stop - cluster))
            cluster = table_stop
        return entries

    def _read(self, offset: int, length: int) -> bytes:
        parts: list[bytes] = []
        cb, cs = self._cb, self._cs
        end = offset + length
        first = offset >> cb
        entries = self._entries(first, ((end - 1) >> cb) - first + 1)
        pos, i = offset, 0
        while pos < end:
            entry = entries[i]
            kind = self._kind(entry)
            within = pos & (cs - 1)
            i += 1
            if kind == _DATA:
                host = self._data_cluster(entry)
                expect = host + cs
                while i < len(entries) and entries[i] & ~OFLAG_COPIED == expect:  # host-contiguous: one pread
                    self._data_cluster(expect)
                    expect += cs
                    i += 1
                run_end = min(end, (first + i) << cb)
                parts.append(pread_exact(self._fd, run_end - pos, host + within))
            elif kind == _COMPRESSED:
                run_end = min(end, (first + i) << cb)
                parts.append(self._inflate(entry)[within : within + run_end - pos])
            else:
                from_backing = kind == _UNALLOCATED and self.backing is not None
                while i < len(entries):  # extend over clusters that read the same way
                    following = self._kind(entries[i])
                    if following == _DATA or following == _COMPRESSED or (
                            following == _UNALLOCATED and self.backing is not None) != from_backing:  # fmt: skip
                        break
                    i += 1
                run_end = min(end, (first + i) << cb)
                parts.append(self._backing_read(pos, run_end - pos) if from_backing else bytes(run_end - pos))
            pos = run_end
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _backing_read(self, offset: int, length: int) -> bytes:
        assert self.backing is not None
        have = max(0, min(length, self.backing.size - offset))
        data = self.backing.read(offset, have) if have else b""
        return data if have == length else data + bytes(length - have)

    def _inflate(self, entry: int) -> bytes:
        if self._inflated is not None and self._inflated[0] == entry:
            return self._inflated[1]
        offset, length = self._compressed_extent(entry)
        packed = pread_exact(self._fd, length, offset)
        try:
            cluster = zlib.decompressobj(_COMPRESSED_WBITS).decompress(packed, self._cs)
        except zlib.error as exc:
            raise self.error(f"compressed cluster at 0x{offset:x} is corrupt ({exc})") from None
        if len(cluster) != self._cs:
            raise self.error(f"compressed cluster at 0x{offset:x} is corrupt (unpacks to {len(cluster)} bytes)")
        self._inflated = (entry, cluster)
        return cluster

    def _cluster_content(self, cluster: int, entry: int) -> bytes:
        """What guest cluster ``cluster`` (whose L2 entry is ``entry``) reads as, all of it."""
        kind = self._kind(entry)
        if kind == _DATA:
            return pread_exact(self._fd, self._cs, self._data_cluster(entry))
        if kind == _COMPRESSED:
            return self._inflate(entry)
        if kind == _UNALLOCATED and self.backing is not None:
            return self._backing_read(cluster << self._cb, self._cs)
        return bytes(self._cs)

    # --- write -----------------------------------------------------------------------------
    def _mutating(self) -> None:
        if self._failed is not None:
            raise self.error(f"writes refused after an earlier failure ({self._failed})")

    def _write(self, offset: int, data: memoryview) -> None:
        self._mutating()
        try:
            self._write_runs(offset, data)
        except (ImageError, OSError) as exc:
            self._failed = str(exc)
            raise

    def _write_runs(self, offset: int, data: memoryview) -> None:
        pos, length = 0, len(data)
        table_bits = self._cb + self._l2_bits
        while pos < length:
            guest = offset + pos
            table_end = ((guest >> table_bits) + 1) << table_bits
            n = min(length - pos, table_end - guest)
            self._write_in_table(guest, data[pos : pos + n])
            pos += n

    def _write_in_table(self, guest: int, data: memoryview) -> None:
        """Write ``data`` (within the range of one L2 table) at ``guest``."""
        cb, cs = self._cb, self._cs
        l2_offset, table = self._writable_l2(guest >> (cb + self._l2_bits))
        # Each cluster: (index in the table, offset within the cluster, position in data, length,
        # old entry, host offset where it can be written in place or -1)
        items: list[tuple[int, int, int, int, int, int]] = []
        pos = 0
        while pos < len(data):
            g = guest + pos
            within = g & (cs - 1)
            n = min(cs - within, len(data) - pos)
            index = (g >> cb) & self._l2_mask
            entry = table[index]
            items.append((index, within, pos, n, entry, self._in_place(entry)))
            pos += n
        start = 0
        while start < len(items):
            stop = start + 1
            in_place = items[start][5] >= 0
            while stop < len(items) and (items[stop][5] >= 0) == in_place and (
                    not in_place or items[stop][5] == items[stop - 1][5] + cs):  # fmt: skip
                stop += 1
            run = items[start:stop]
            first, last = run[0], run[-1]
            if in_place:
                # Checked again: an earlier run of this request may have freed a cluster that a
                # hostile image maps twice, and the allocator may have put metadata there.
                if any(self._in_place(item[4]) != item[5] for item in run):
                    raise self.error("corrupt metadata: L2 entries share a host cluster; write refused")
                pwrite_all(self._fd, data[first[2] : last[2] + last[3]], first[5] + first[1])
            else:
                self._allocate_run(l2_offset, table, guest & ~((1 << (cb + self._l2_bits)) - 1), run, data)
            start = stop

    def _in_place(self, entry: int) -> int:
        """The host offset where a write to this entry's cluster may go, or -1 to allocate."""
        kind = self._kind(entry)
        if kind == _ZERO and entry & OFFSET_MASK:
            self._check_freeable(entry)
            return -1
        if kind != _DATA:
            return -1
        host = self._data_cluster(entry)
        if (host >> self._cb) in self._meta:
            raise self.error(f"corrupt metadata: an L2 entry points at the {self._meta[host >> self._cb]} "
                             f"(0x{host:x}); write refused")  # fmt: skip
        refcount = self._refcount(host >> self._cb)
        if refcount == 0:
            raise self.error(f"corrupt metadata: data cluster at 0x{host:x} has refcount 0")
        return host if refcount == 1 and entry & OFLAG_COPIED else -1

    def _allocate_run(self, l2_offset: int, table: array[int], table_base: int,
                      run: list[tuple[int, int, int, int, int, int]], data: memoryview) -> None:  # fmt: skip
        """New clusters for ``run`` (consecutive guest clusters), copy-on-write."""
        cb, cs = self._cb, self._cs
        pieces: list[bytes | bytearray | memoryview] = []
        for index, within, pos, n, entry, _ in run:
            self._check_freeable(entry)
            piece = data[pos : pos + n]
            if n == cs:
                pieces.append(piece)
            else:  # copy-on-write: the rest of the cluster as it reads now
                cluster = bytearray(self._cluster_content((table_base >> cb) + index, entry))
                cluster[within : within + n] = piece
                pieces.append(cluster)
        first = self._alloc_clusters(len(run)) << cb
        pwrite_all(self._fd, b"".join(pieces), first)
        self._grew(first + len(run) * cs)
        start_index = run[0][0]
        new_entries = [(first + i * cs) | OFLAG_COPIED for i in range(len(run))]
        for i, value in enumerate(new_entries):
            table[start_index + i] = value
        pwrite_all(self._fd, _table_bytes(new_entries), l2_offset + start_index * 8)
        for item in run:
            self._free_entry(item[4])

    def _writable_l2(self, l1_index: int) -> tuple[int, array[int]]:
        """The L2 table of ``l1_index``, allocated or copied so that this image owns it alone."""
        l1_entry = self._l1[l1_index]
        old = l1_entry & OFFSET_MASK
        if old:
            self._check_cluster("L2 table", old)
            if self._meta.get(old >> self._cb) != "L2 table":
                raise self.error(f"corrupt metadata: L1 entry {l1_index} points at the "
                                 f"{self._meta.get(old >> self._cb, 'free space')} (0x{old:x})")  # fmt: skip
            refcount = self._refcount(old >> self._cb)
            if refcount == 0:
                raise self.error(f"corrupt metadata: L2 table at 0x{old:x} has refcount 0")
            if refcount == 1 and l1_entry & OFLAG_COPIED:
                return old, self._load_l2(old)
            table = array("Q", self._load_l2(old))
        else:
            table = array("Q", bytes(self._cs))
        new = self._alloc_clusters(1) << self._cb
        pwrite_all(self._fd, _table_bytes(table), new)
        self._grew(new + self._cs)
        self._meta[new >> self._cb] = "L2 table"
        self._cache_l2(new, table)
        self._set_l1(l1_index, new | OFLAG_COPIED)
        if old:
            self._unref_metadata(old)
        return new, table

    def _set_l1(self, index: int, value: int) -> None:
        self._l1[index] = value
        pwrite_all(self._fd, struct.pack(">Q", value), self.header.l1_offset + index * 8)

    def _grew(self, end: int) -> None:
        self._file_size = max(self._file_size, end)

    # --- freeing ---------------------------------------------------------------------------
    def _host_clusters(self, entry: int) -> range:
        """The host clusters whose refcount ``entry`` holds a reference to."""
        kind = self._kind(entry)
        if kind == _COMPRESSED:
            offset, length = self._compressed_extent(entry)
            start = offset & ~(_SECTOR - 1)
            return range(start >> self._cb, ((offset + length - 1) >> self._cb) + 1)
        host = entry & OFFSET_MASK
        if kind in (_DATA, _ZERO) and host:
            return range(host >> self._cb, (host >> self._cb) + 1)
        return range(0)

    def _check_freeable(self, entry: int) -> None:
        """Refuse to drop a reference that is not there: metadata, or a refcount of 0."""
        if self._kind(entry) != _COMPRESSED and entry & OFFSET_MASK:
            self._data_cluster(entry)
        for cluster in self._host_clusters(entry):
            if cluster in self._meta:
                raise self.error(f"corrupt metadata: an L2 entry points at the {self._meta[cluster]} "
                                 f"(0x{cluster << self._cb:x}); write refused")  # fmt: skip
            if self._refcount(cluster) == 0:
                raise self.error(f"corrupt metadata: cluster at 0x{cluster << self._cb:x} is in use "
                                 "but its refcount is 0")  # fmt: skip

    def _free_entry(self, entry: int) -> None:
        for cluster in self._host_clusters(entry):
            self._change_refcount(cluster, 1, -1)

    def _unref_metadata(self, offset: int) -> None:
        cluster = offset >> self._cb
        self._change_refcount(cluster, 1, -1)
        if self._refcount(cluster) == 0:
            del self._meta[cluster]
            self._l2_cache.pop(offset, None)
            self._rb_cache.pop(offset, None)

    # --- discard, write zeroes -------------------------------------------------------------
    def _discard(self, offset: int, length: int) -> None:
        """Whole clusters in the range are deallocated (v3 with a backing file: zero clusters,
        so they do not show the backing file; v2: they show it, as in QEMU); partial clusters
        are left as they are. Without a backing file a discarded cluster reads as zeros."""
        self._mutating()
        try:
            self._clear(offset, length, discard=True)
        except (ImageError, OSError) as exc:
            self._failed = str(exc)
            raise

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Whole clusters become unallocated (no backing file) or zero clusters (v3), their host
        clusters freed whatever ``unmap`` says; a v2 image with a backing file gets zeros
        written. Partial clusters get zeros written, unless they already read as zeros."""
        self._mutating()
        try:
            self._clear(offset, length, discard=False)
        except (ImageError, OSError) as exc:
            self._failed = str(exc)
            raise

    def _clear(self, offset: int, length: int, *, discard: bool) -> None:
        cb = self._cb
        end = offset + length
        first = -(-offset >> cb)  # the first whole cluster
        stop = end >> cb if end < self.size else -(-self.size >> cb)  # the disk's last cluster counts as whole
        if first >= stop:  # no whole cluster
            if not discard:
                self._zero_partial(offset, length)
            return
        if not discard:
            self._zero_partial(offset, min(end, first << cb) - offset)
            self._zero_partial(stop << cb, max(0, end - (stop << cb)))
        if self.backing is None:
            target = 0
        elif self._v3:
            target = OFLAG_ZERO
        elif discard:
            target = 0
        else:  # v2 over a backing file: only written zeros read as zeros
            self._write_zero_data(first << cb, (stop << cb) - (first << cb))
            return
        table_clusters = 1 << self._l2_bits
        cluster = first
        while cluster < stop:
            l1_index = cluster >> self._l2_bits
            table_stop = min(stop, (l1_index + 1) * table_clusters)
            self._clear_in_table(l1_index, cluster, table_stop, target)
            cluster = table_stop

    def _clear_in_table(self, l1_index: int, first: int, stop: int, target: int) -> None:
        l2_offset = self._l1[l1_index] & OFFSET_MASK
        if not l2_offset and target == 0:
            return  # no table: already unallocated
        current = self._load_l2(l2_offset) if l2_offset else None
        base = l1_index << self._l2_bits
        changing = [c - base for c in range(first, stop) if current is None or current[c - base] != target]
        if not changing:
            return
        l2_offset, table = self._writable_l2(l1_index)
        old = [table[i] for i in changing]
        for entry in old:
            self._check_freeable(entry)
        for i in changing:
            table[i] = target
        lo, hi = changing[0], changing[-1] + 1
        pwrite_all(self._fd, _table_bytes(table[lo:hi]), l2_offset + lo * 8)
        for entry in old:
            self._free_entry(entry)

    def _zero_partial(self, offset: int, length: int) -> None:
        """Zeros for parts of clusters, except in clusters that read as zeros already."""
        end = offset + length
        while offset < end:
            n = min(end, ((offset >> self._cb) + 1) << self._cb) - offset
            kind = self._kind(self._entry(offset >> self._cb))
            if kind != _ZERO and (kind != _UNALLOCATED or self.backing is not None):
                self._write_runs(offset, memoryview(bytes(n)))
            offset += n

    def _write_zero_data(self, offset: int, length: int) -> None:
        chunk = max(self._cs, 1 << 20)
        zeros = memoryview(bytes(min(chunk, length)))
        done = 0
        while done < length:
            n = min(len(zeros), length - done, self.size - offset - done)
            if n <= 0:
                break
            self._write_runs(offset + done, zeros[:n])
            done += n

    # --- refcounts -------------------------------------------------------------------------
    def _block(self, table_index: int) -> bytearray | None:
        """The refcount block for ``table_index``, or None where there is none."""
        if table_index >= len(self._rt):
            return None
        offset = self._rt[table_index]
        if not offset:
            return None
        block = self._rb_cache.get(offset)
        if block is not None:
            self._rb_cache.move_to_end(offset)
            return block
        block = bytearray(pread_exact(self._fd, self._cs, offset))
        self._cache_block(offset, block)
        return block

    def _cache_block(self, offset: int, block: bytearray) -> None:
        self._rb_cache[offset] = block
        self._rb_cache.move_to_end(offset)
        while len(self._rb_cache) > self._rb_cache_max:
            self._rb_cache.popitem(last=False)

    def _get(self, block: bytearray, index: int) -> int:
        bits = self._rc_bits
        if bits >= 8:
            width = bits >> 3
            return int.from_bytes(block[index * width : (index + 1) * width], "big")
        per_byte = 8 // bits
        return (block[index // per_byte] >> ((index % per_byte) * bits)) & self._rc_max

    def _set(self, block: bytearray, index: int, value: int) -> None:
        bits = self._rc_bits
        if bits >= 8:
            width = bits >> 3
            block[index * width : (index + 1) * width] = value.to_bytes(width, "big")
            return
        per_byte = 8 // bits
        shift = (index % per_byte) * bits
        byte = index // per_byte
        block[byte] = (block[byte] & ~(self._rc_max << shift) & 0xFF) | (value << shift)

    def _refcount(self, cluster: int) -> int:
        block = self._block(cluster >> self._rb_bits)
        return 0 if block is None else self._get(block, cluster & ((1 << self._rb_bits) - 1))

    def _change_refcount(self, cluster: int, count: int, delta: int) -> None:
        """Add ``delta`` to the refcounts of ``count`` clusters from ``cluster``, and write them."""
        per_block = 1 << self._rb_bits
        end = cluster + count
        while cluster < end:
            table_index = cluster >> self._rb_bits
            stop = min(end, (table_index + 1) * per_block)
            if delta > 0:
                self._ensure_block(table_index)
            block = self._block(table_index)
            if block is None:
                raise self.error(f"corrupt metadata: refcount underflow at cluster 0x{cluster << self._cb:x}")
            first = cluster - table_index * per_block
            last = stop - table_index * per_block
            values = [self._get(block, i) + delta for i in range(first, last)]
            for i, value in enumerate(values):
                if not 0 <= value <= self._rc_max:
                    what = "overflow" if value > 0 else "underflow"
                    raise self.error(f"corrupt metadata: refcount {what} at cluster 0x{(cluster + i) << self._cb:x}")
            for i, value in enumerate(values):
                self._set(block, first + i, value)
                if value == 0:
                    self._free_hint = min(self._free_hint, cluster + i)
            lo = first * self._rc_bits // 8
            hi = -(-last * self._rc_bits // 8)
            pwrite_all(self._fd, block[lo:hi], self._rt[table_index] + lo)
            cluster = stop

    def _next_free(self, cluster: int) -> int:
        """The first cluster from ``cluster`` whose refcount is 0 and that is not metadata."""
        per_block = 1 << self._rb_bits
        while True:
            table_index = cluster >> self._rb_bits
            block = self._block(table_index)
            if block is None:
                candidate = cluster
            else:
                found = self._zero_in_block(block, cluster & (per_block - 1))
                if found < 0:
                    cluster = (table_index + 1) * per_block
                    continue
                candidate = table_index * per_block + found
            if candidate not in self._meta:
                return candidate
            cluster = candidate + 1

    def _zero_in_block(self, block: bytearray, start: int) -> int:
        """The first entry from ``start`` in ``block`` that is 0, or -1."""
        entries = 1 << self._rb_bits
        bits = self._rc_bits
        if bits < 8:
            for i in range(start, entries):
                if self._get(block, i) == 0:
                    return i
            return -1
        width = bits >> 3
        zero = bytes(width)
        pos = start * width
        while True:
            found = block.find(zero, pos)
            if found < 0:
                return -1
            if found % width == 0:
                return found // width
            pos = found + width - found % width

    def _find_free(self, count: int) -> int:
        cluster = self._free_hint
        while True:
            cluster = self._next_free(cluster)
            for i in range(1, count):
                if self._refcount(cluster + i) or cluster + i in self._meta:
                    cluster += i + 1
                    break
            else:
                return cluster

    def _alloc_clusters(self, count: int) -> int:
        """``count`` contiguous clusters, their refcounts now 1; returns the first's index."""
        while True:
            start = self._find_free(count)
            if (start + count) << self._cb > MAX_HOST_OFFSET:
                raise self.error("image file would grow past the largest offset qcow2 can address")
            missing = [t for t in range(start >> self._rb_bits, ((start + count - 1) >> self._rb_bits) + 1)
                       if t >= len(self._rt) or not self._rt[t]]  # fmt: skip
            if missing:
                for table_index in missing:  # the new blocks may take clusters of the run: look again
                    self._ensure_block(table_index)
                continue
            self._change_refcount(start, count, +1)
            self._free_hint = start + count
            return start

    def _ensure_block(self, table_index: int) -> None:
        """Create the refcount block for ``table_index`` if there is none."""
        while True:
            if table_index >= len(self._rt):
                self._grow_reftable(table_index + 1)
            if self._rt[table_index]:
                return
            free = self._next_free(self._free_hint)
            owner = free >> self._rb_bits
            if owner >= len(self._rt):
                self._grow_reftable(owner + 1)
            block = bytearray(self._cs)
            if owner == table_index:  # the new block describes itself
                self._set(block, free & ((1 << self._rb_bits) - 1), 1)
            elif not self._rt[owner]:
                self._ensure_block(owner)  # then look again: that block may sit at ``free``
                continue
            else:
                self._change_refcount(free, 1, +1)
            offset = free << self._cb
            pwrite_all(self._fd, block, offset)
            self._grew(offset + self._cs)
            self._meta[free] = "refcount block"
            self._cache_block(offset, block)
            self._set_reftable(table_index, offset)

    def _set_reftable(self, index: int, offset: int) -> None:
        self._rt[index] = offset
        if index < self._rt_on_disk:
            pwrite_all(self._fd, struct.pack(">Q", offset), self._rt_offset + index * 8)

    def _grow_reftable(self, needed: int) -> None:
        """Replace the refcount table with one of at least ``needed`` entries (see the module)."""
        if self._growing:
            raise self.error("internal error: the refcount table grew while growing")
        per_cluster = self._cs // 8
        file_clusters = (self._file_size >> self._cb) + 1
        covering = (file_clusters + (1 << self._rb_bits) - 1) >> self._rb_bits  # blocks to cover the file
        entries = _align_up(2 * max(needed, len(self._rt), covering) + 1, per_cluster)
        entries = min(entries, MAX_REFTABLE_BYTES // 8)
        if entries < needed:
            raise self.error(f"image too large: the refcount table would exceed {MAX_REFTABLE_BYTES >> 20} MiB")
        old_offset, old_entries = self._rt_offset, self._rt_on_disk
        self._rt.extend([0] * (entries - len(self._rt)))  # in memory until the header points at it
        self._growing = True
        try:
            clusters = entries // per_cluster
            new = self._alloc_clusters(clusters) << self._cb
        finally:
            self._growing = False
        pwrite_all(self._fd, _table_bytes(self._rt), new)
        self._grew(new + clusters * self._cs)
        for i in range(clusters):
            self._meta[(new >> self._cb) + i] = "refcount table"
        pwrite_all(self._fd, struct.pack(">QI", new, clusters), 48)
        self._rt_offset, self._rt_on_disk = new, entries
        for i in range(old_entries * 8 >> self._cb):
            self._unref_metadata(old_offset + (i << self._cb))

    # --- the rest --------------------------------------------------------------------------
    def _flush(self) -> None:
        os.fdatasync(self._fd)

    def _close(self) -> None:
        try:
            os.close(self._fd)
        finally:
            if self.backing is not None:
                self.backing.close()
