"""The migration stream: a magic, a format version, then checksummed sections (docs/migration.md).

::

    header   8s magic b"TRIVMMVM" | u32 version | u32 flags (0)
    section  u32 sequence | u8 kind | u8 name length | u16 reserved (0) | u32 payload length
             | name (ASCII) | payload | u32 CRC-32 of everything before it in the section
    ...      (sequence 0, 1, 2, ...; the last section is END, with an empty payload)

All integers are little-endian. The CRC is ``zlib.crc32`` over the section's 12-byte
header, name and payload: it catches corruption, not an attacker (the stream is trusted as
far as its source is; every length is still checked against hard bounds, so a hostile one
costs an error, never memory or time). Memory travels in MEMORY sections, one run of
pages each (``MemoryRun``): a slot, a first page, a page count, and the pages' bytes -- or
no bytes at all for a run of zero pages.

Version 1 carries every page exactly once, in order (a cold migration, a snapshot written
to a stream). Version 2 (hot migration, ``HOT_VERSION``) adds runs flagged RESEND: pages sent
before, sent again because the guest wrote them meanwhile; such a run replaces what its
pages held, and may come in any order once the first, complete pass over a slot has covered
them. Version 3 (``MAPPED_VERSION``) is a snapshot *file* whose memory is not in sections
at all: a MEMORY_MAP section (before END) gives, per slot, where in the file the slot's
image lies -- raw pages at a page-aligned offset after the END section, zero pages left as
holes -- so a restore maps the images copy-on-write and the guest runs at once
(``MemoryMapEntry``). Each entry carries a CRC-32 of the image's non-zero runs, which a
restore that reads the memory anyway (``verify_memory``) checks.

``StreamDecoder`` is the parser without I/O (fed bytes, it hands out sections);
``StreamReader`` and ``StreamWriter`` put it on an anyio byte stream or a file
(``FileSource``/``FileSink``, which do their I/O on worker threads). ``decode_stream`` is the
synchronous helper for a whole stream in memory. Every problem with a stream is a
``MigrationError``; no other exception comes out of the decoder.
"""

from __future__ import annotations

import enum
import mmap
import re
import struct
import zlib
from collections.abc import Iterator
from typing import IO, Protocol

import anyio
import attrs

from trivmm.errors import MigrationError

__all__ = ["MAGIC", "VERSION", "HOT_VERSION", "SUPPORTED_VERSIONS", "PAGE_SIZE", "MAX_RUN_PAGES", "MAX_NAME",
           "PAYLOAD_LIMITS", "SectionKind", "Section", "MemoryRun", "StreamDecoder", "StreamReader",
           "StreamWriter", "ByteSink", "ByteSource", "FileSink", "FileSource", "encode_header",
           "encode_section", "section_parts", "encode_run", "run_parts", "decode_run", "page_runs",
           "decode_stream", "describe_io_error", "DiskRun", "disk_run_parts", "decode_disk_run", "DISK_UNIT",
           "MAX_DISK_RUN_BYTES", "MAX_DISK_ZERO_BYTES", "MAPPED_VERSION", "MemoryMapEntry", "encode_memory_map",
           "decode_memory_map", "image_checksum", "MAX_MAPPED_SLOTS"]  # fmt: skip

MAGIC = b"TRIVMMVM"
VERSION = 1  # what snapshots and cold migrations write: every page once, in order
HOT_VERSION = 2  # hot migration: version 1 plus RESEND runs (pages sent again)
MAPPED_VERSION = 3  # a snapshot file: memory as page-aligned slot images after the sections
SUPPORTED_VERSIONS = frozenset({VERSION, HOT_VERSION, MAPPED_VERSION})
MAX_MAPPED_SLOTS = 64
PAGE_SIZE = 4096
MAX_RUN_PAGES = 512  # pages of data in one MEMORY section (2 MiB); zero runs may be longer
MAX_ZERO_RUN_PAGES = (1 << 32) - 1
MAX_NAME = 64
_HEADER = struct.Struct("<8sII")
_FRAME = struct.Struct("<IBBHI")
_CRC = struct.Struct("<I")
_RUN = struct.Struct("<IIQI")  # slot, flags, first page, page count
_RUN_ZERO = 0x1
_RUN_RESEND = 0x2  # version 2: pages sent before; this run replaces them
_DISK_RUN = struct.Struct("<IIQI")  # disk, flags, offset (bytes), length (bytes)
_MAP_ENTRY = struct.Struct("<IIQQII")  # slot, flags (0), file offset, pages, CRC-32 of the non-zero runs, 0
DISK_UNIT = 512  # a DISK run's offset and length are multiples of this (a sector)
MAX_DISK_RUN_BYTES = 1 << 20  # bytes of data in one DISK section
MAX_DISK_ZERO_BYTES = (1 << 32) - DISK_UNIT  # a zero DISK run's longest extent
_NAME = re.compile(r"[A-Za-z0-9._:/-]*\Z")
_ZERO_PAGE = bytes(PAGE_SIZE)
_SCAN_PAGES = 64  # pages compared at once while looking for zero pages
_ZERO_SCAN = bytes(PAGE_SIZE * _SCAN_PAGES)
_RECEIVE_CHUNK = 1 << 20
_FILE_BUFFER = 1 << 20


class SectionKind(enum.IntEnum):
    CONFIG = 1  # the VM's configuration (JSON), always the first section
    STATE = 2  # one piece of device or CPU state, named by its stable id
    MEMORY = 3  # one run of guest pages (MemoryRun)
    END = 4  # the last section: empty
    DISK = 5  # version 2, with --copy-storage: one extent of a disk image's contents (DiskRun)
    MEMORY_MAP = 6  # version 3 only: where each slot's image lies in the file (MemoryMapEntry)


PAYLOAD_LIMITS: dict[SectionKind, int] = {
    SectionKind.CONFIG: 64 << 10,
    SectionKind.STATE: 1 << 20,
    SectionKind.MEMORY: _RUN.size + MAX_RUN_PAGES * PAGE_SIZE,
    SectionKind.END: 0,
    SectionKind.DISK: _DISK_RUN.size + MAX_DISK_RUN_BYTES,
    SectionKind.MEMORY_MAP: _MAP_ENTRY.size * MAX_MAPPED_SLOTS,
}


@attrs.frozen
class Section:
    """One section as read: its sequence number, kind, name and (checked) payload."""

    sequence: int
    kind: SectionKind
    name: str
    payload: bytes = attrs.field(repr=lambda p: f"<{len(p)} bytes>")


def encode_header(version: int = VERSION) -> bytes:
    return _HEADER.pack(MAGIC, version, 0)


def section_parts(sequence: int, kind: SectionKind, name: str, payload: list[bytes]) -> list[bytes]:
    """One section as a list of byte strings (the payload's parts are not copied);
    ``ValueError`` for what a reader would refuse."""
    raw = name.encode("ascii")
    length = sum(len(part) for part in payload)
    if len(raw) > MAX_NAME or not _NAME.match(name):
        raise ValueError(f"bad section name {name!r}")
    if length > PAYLOAD_LIMITS[kind]:
        raise ValueError(f"a {kind.name} section holds at most {PAYLOAD_LIMITS[kind]} bytes, not {length}")
    head = _FRAME.pack(sequence, kind, len(raw), 0, length) + raw
    crc = zlib.crc32(head)
    for part in payload:
        crc = zlib.crc32(part, crc)
    return [head, *payload, _CRC.pack(crc)]


def encode_section(sequence: int, kind: SectionKind, name: str, payload: bytes) -> bytes:
    """One section's bytes; ``ValueError`` for what a reader would refuse."""
    return b"".join(section_parts(sequence, kind, name, [payload]))


# --- memory runs ----------------------------------------------------------------------------------


@attrs.frozen
class MemoryRun:
    """Pages ``first_page .. first_page + pages - 1`` of memory slot ``slot``: their bytes,
    or None when they are all zero. ``resend`` (stream version 2): the pages were sent
    before and this run replaces them."""

    slot: int
    first_page: int
    pages: int
    data: bytes | None = attrs.field(default=None, repr=lambda d: "zero" if d is None else f"<{len(d)} bytes>")
    resend: bool = False


def run_parts(run: MemoryRun) -> list[bytes]:
    """A MEMORY section's payload as its header and its data (not copied)."""
    resend = _RUN_RESEND if run.resend else 0
    if run.data is None:
        return [_RUN.pack(run.slot, _RUN_ZERO | resend, run.first_page, run.pages)]
    if len(run.data) != run.pages * PAGE_SIZE:
        raise ValueError("a run's data must be its pages")
    return [_RUN.pack(run.slot, resend, run.first_page, run.pages), run.data]


def encode_run(run: MemoryRun) -> bytes:
    return b"".join(run_parts(run))


def decode_run(payload: bytes, version: int = VERSION) -> MemoryRun:
    """A MEMORY section's run in a stream of format ``version``, its lengths checked (not
    yet against a VM's slots)."""
    if len(payload) < _RUN.size:
        raise MigrationError(f"memory section of {len(payload)} bytes is shorter than its {_RUN.size}-byte header")
    slot, flags, first_page, pages = _RUN.unpack_from(payload)
    known = _RUN_ZERO | _RUN_RESEND if version >= HOT_VERSION else _RUN_ZERO
    if flags & ~known:
        raise MigrationError(f"memory section with unknown flags {flags:#x}")
    resend = bool(flags & _RUN_RESEND)
    if pages == 0:
        raise MigrationError("memory section with no pages")
    data_length = len(payload) - _RUN.size
    if flags & _RUN_ZERO:
        if data_length:
            raise MigrationError("a zero-page memory section carries data")
        return MemoryRun(slot, first_page, pages, resend=resend)
    if pages > MAX_RUN_PAGES or data_length != pages * PAGE_SIZE:
        raise MigrationError(f"memory section of {pages} pages carries {data_length} bytes")
    return MemoryRun(slot, first_page, pages, payload[_RUN.size :], resend)


def page_runs(mapping: mmap.mmap | bytes, slot: int, first_page: int = 0,
              pages: int | None = None, *, resend: bool = False) -> Iterator[MemoryRun]:  # fmt: skip
    """The runs that carry pages ``first_page ..`` of ``mapping`` (a slot's memory), in
    order: zero pages merged into zero runs, the others into runs of at most
    ``MAX_RUN_PAGES`` (``resend``: flagged as pages sent again)."""
    total = len(mapping) // PAGE_SIZE if pages is None else pages
    end = first_page + total
    run_start, run_zero = first_page, True
    page = first_page

    def flush(upto: int) -> Iterator[MemoryRun]:
        if upto == run_start:
            return
        if run_zero:
            yield MemoryRun(slot, run_start, upto - run_start, resend=resend)
        else:
            data = mapping[run_start * PAGE_SIZE : upto * PAGE_SIZE]
            yield MemoryRun(slot, run_start, upto - run_start, data, resend)

    while page < end:
        count = min(_SCAN_PAGES, end - page)
        chunk = mapping[page * PAGE_SIZE : (page + count) * PAGE_SIZE]
        if count == _SCAN_PAGES and chunk == _ZERO_SCAN:
            zero_flags = [True] * count
        else:
            zero_flags = [chunk[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] == _ZERO_PAGE for i in range(count)]
        for zero in zero_flags:
            if zero != run_zero or (not zero and page - run_start == MAX_RUN_PAGES) \
                    or (zero and page - run_start == MAX_ZERO_RUN_PAGES):  # fmt: skip
                yield from flush(page)
                run_start, run_zero = page, zero
            page += 1
    yield from flush(page)


# --- mapped memory (version 3 snapshot files) -------------------------------------------------


@attrs.frozen
class MemoryMapEntry:
    """Slot ``slot``'s image in a version 3 snapshot file: ``pages`` pages from byte
    ``file_offset`` (page-aligned), and ``checksum``, the CRC-32 of its non-zero runs
    (``image_checksum``)."""

    slot: int
    file_offset: int
    pages: int
    checksum: int


def encode_memory_map(entries: list[MemoryMapEntry]) -> bytes:
    return b"".join(_MAP_ENTRY.pack(e.slot, 0, e.file_offset, e.pages, e.checksum, 0) for e in entries)


def decode_memory_map(payload: bytes) -> list[MemoryMapEntry]:
    """A MEMORY_MAP section's entries, their fields checked (not yet against a file or VM)."""
    if not payload or len(payload) % _MAP_ENTRY.size:
        raise MigrationError(f"memory map of {len(payload)} bytes is not whole {_MAP_ENTRY.size}-byte entries")
    entries = []
    for offset in range(0, len(payload), _MAP_ENTRY.size):
        slot, flags, file_offset, pages, checksum, reserved = _MAP_ENTRY.unpack_from(payload, offset)
        if flags or reserved:
            raise MigrationError(f"memory map entry for slot {slot} has unknown flags")
        if file_offset % PAGE_SIZE or pages == 0:
            raise MigrationError(f"memory map entry for slot {slot}: {pages} pages at file offset {file_offset} "
                                 "(not page-aligned, or empty)")  # fmt: skip
        entries.append(MemoryMapEntry(slot, file_offset, pages, checksum))
    return entries


def image_checksum(runs: Iterator[MemoryRun], crc: int = 0) -> int:
    """The CRC-32 of a slot image as a MemoryMapEntry carries it: over each non-zero run's
    first page and page count (two u64) and its bytes, in order; zero runs count nothing.
    Feed it the image in windows (the result of one window is the next one's ``crc``)."""
    for run in runs:
        if run.data is not None:
            crc = zlib.crc32(run.data, zlib.crc32(struct.pack("<QQ", run.first_page, run.pages), crc))
    return crc


# --- disk runs (--copy-storage) ----------------------------------------------------------------


@attrs.frozen
class DiskRun:
    """Bytes ``offset .. offset + length - 1`` of the guest-visible contents of disk
    ``disk`` (the VM's disks in configuration order): their data, or None when they are
    all zero. ``resend``: sent before; this run replaces them."""

    disk: int
    offset: int
    length: int
    data: bytes | None = attrs.field(default=None, repr=lambda d: "zero" if d is None else f"<{len(d)} bytes>")
    resend: bool = False


def disk_run_parts(run: DiskRun) -> list[bytes]:
    """A DISK section's payload as its header and its data (not copied)."""
    flags = (_RUN_RESEND if run.resend else 0) | (_RUN_ZERO if run.data is None else 0)
    if run.data is not None and len(run.data) != run.length:
        raise ValueError("a disk run's data must be its length")
    head = _DISK_RUN.pack(run.disk, flags, run.offset, run.length)
    return [head] if run.data is None else [head, run.data]


def decode_disk_run(payload: bytes) -> DiskRun:
    """A DISK section's run, its lengths checked (not yet against a VM's disks)."""
    if len(payload) < _DISK_RUN.size:
        raise MigrationError(f"disk section of {len(payload)} bytes is shorter than its {_DISK_RUN.size}-byte header")
    disk, flags, offset, length = _DISK_RUN.unpack_from(payload)
    if flags & ~(_RUN_ZERO | _RUN_RESEND):
        raise MigrationError(f"disk section with unknown flags {flags:#x}")
    if length == 0 or length % DISK_UNIT or offset % DISK_UNIT:
        raise MigrationError(f"disk section of {length} bytes at offset {offset}: not whole {DISK_UNIT}-byte sectors")
    data_length = len(payload) - _DISK_RUN.size
    resend = bool(flags & _RUN_RESEND)
    if flags & _RUN_ZERO:
        if data_length:
            raise MigrationError("a zero disk section carries data")
        return DiskRun(disk, offset, length, resend=resend)
    if data_length != length:
        raise MigrationError(f"disk section of {length} bytes carries {data_length} bytes")
    return DiskRun(disk, offset, length, payload[_DISK_RUN.size :], resend)


# --- reading ------------------------------------------------------------------------------------


# Kinds a version 3 file and the other versions do not share: memory comes as a map there,
# as runs elsewhere (a mapped snapshot carries no disk contents either).
_MAPPED_KINDS = frozenset({SectionKind.MEMORY_MAP, SectionKind.MEMORY, SectionKind.DISK})


class StreamDecoder:
    """The stream parser, without I/O: ``feed`` it bytes, take sections with
    ``next_section`` (None until one is complete), call ``finish`` at the end of input."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.version: int | None = None
        self.ended = False
        self._sequence = 0
        self.consumed = 0  # bytes of the header and the sections read so far

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.ended and len(data):
            if self.version == MAPPED_VERSION:
                return  # the slot images follow the sections; the restore maps them
            raise MigrationError("data after the stream's end section")
        self._buffer += data

    def next_section(self) -> Section | None:
        buffer = self._buffer
        if self.version is None:
            if len(buffer) < _HEADER.size:
                if buffer and not MAGIC.startswith(bytes(buffer[: len(MAGIC)])):
                    raise MigrationError("not a trivmm snapshot or migration stream (bad magic)")
                return None
            magic, version, flags = _HEADER.unpack_from(buffer)
            if magic != MAGIC:
                raise MigrationError("not a trivmm snapshot or migration stream (bad magic)")
            if version not in SUPPORTED_VERSIONS:
                readable = ", ".join(map(str, sorted(SUPPORTED_VERSIONS)))
                raise MigrationError(f"stream format version {version} is not supported (this trivmm reads {readable})")
            if flags:
                raise MigrationError(f"stream header has unknown flags {flags:#x}")
            self.version = version
            del buffer[: _HEADER.size]
            self.consumed = _HEADER.size
        if self.ended or len(buffer) < _FRAME.size:
            return None
        sequence, kind_value, name_length, reserved, length = _FRAME.unpack_from(buffer)
        where = f"section {self._sequence}"
        try:
            kind = SectionKind(kind_value)
        except ValueError:
            raise MigrationError(f"{where}: unknown section kind {kind_value}") from None
        if reserved:
            raise MigrationError(f"{where}: reserved header bits set")
        if name_length > MAX_NAME:
            raise MigrationError(f"{where}: a {name_length}-byte name is longer than {MAX_NAME}")
        if length > PAYLOAD_LIMITS[kind]:
            raise MigrationError(f"{where}: a {kind.name} section of {length} bytes is over "
                                 f"its limit of {PAYLOAD_LIMITS[kind]}")  # fmt: skip
        total = _FRAME.size + name_length + length + _CRC.size
        if len(buffer) < total:
            return None
        frame = bytes(buffer[:total])
        del buffer[:total]
        self.consumed += total
        (crc,) = _CRC.unpack_from(frame, total - _CRC.size)
        with memoryview(frame) as view:
            if zlib.crc32(view[: total - _CRC.size]) != crc:
                raise MigrationError(f"{where}: bad checksum (the stream is corrupt)")
        name_bytes = frame[_FRAME.size : _FRAME.size + name_length]
        payload = frame[_FRAME.size + name_length : total - _CRC.size]
        if sequence != self._sequence:
            raise MigrationError(f"{where}: sequence number {sequence} out of order (a section was lost)")
        name = name_bytes.decode("ascii", errors="replace")
        if not _NAME.match(name):
            raise MigrationError(f"{where}: bad section name {name!r}")
        if kind is SectionKind.DISK and (self.version or VERSION) < HOT_VERSION:
            raise MigrationError(f"{where}: a DISK section in a version {self.version} stream")
        if (kind is SectionKind.MEMORY_MAP) != (self.version == MAPPED_VERSION) and kind in _MAPPED_KINDS:
            raise MigrationError(f"{where}: a {kind.name} section in a version {self.version} stream")
        self._sequence += 1
        if kind is SectionKind.END:
            self.ended = True
            if self.version == MAPPED_VERSION:
                buffer.clear()  # the slot images
            elif buffer:
                raise MigrationError("data after the stream's end section")
        return Section(sequence, kind, name, payload)

    def finish(self) -> None:
        """The input has ended: an error unless the end section was read."""
        if self.version is None:
            raise MigrationError("the stream ended before its header (truncated)")
        if not self.ended:
            raise MigrationError(f"the stream ended in section {self._sequence}, before its end section (truncated)")


def decode_stream(data: bytes) -> list[Section]:
    """Every section of a complete stream held in memory (the synchronous helper)."""
    decoder = StreamDecoder()
    decoder.feed(data)
    sections = []
    while (section := decoder.next_section()) is not None:
        sections.append(section)
    decoder.finish()
    return sections


def describe_io_error(exc: BaseException) -> str:
    """A few words for a failed read or write: the OS's reason where there is one (anyio's
    BrokenResourceError carries it as its cause)."""
    for error in (exc, exc.__cause__):
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
    if str(exc):
        return str(exc)
    if isinstance(exc, anyio.BrokenResourceError):
        return "the connection broke"
    if isinstance(exc, anyio.ClosedResourceError):
        return "the connection was closed"
    return type(exc).__name__


class ByteSource(Protocol):
    """What ``StreamReader`` reads from: an anyio ``ByteReceiveStream`` is one."""

    async def receive(self, max_bytes: int = 65536) -> bytes: ...


class ByteSink(Protocol):
    """What ``StreamWriter`` writes to: an anyio ``ByteSendStream`` is one."""

    async def send(self, item: bytes) -> None: ...


class StreamReader:
    """Sections from a ``ByteSource``; I/O failures and early ends are ``MigrationError``."""

    def __init__(self, source: ByteSource) -> None:
        self._source = source
        self._decoder = StreamDecoder()
        self.bytes_read = 0

    @property
    def version(self) -> int | None:
        return self._decoder.version

    @property
    def sections_end(self) -> int:
        """Where the sections read so far end in the stream (a version 3 file's images lie after)."""
        return self._decoder.consumed

    async def section(self) -> Section:
        """The next section (after the end section: an error)."""
        if self._decoder.ended:
            raise MigrationError("read past the stream's end section")
        while (section := self._decoder.next_section()) is None:
            data = await self._receive()
            if not data:
                self._decoder.finish()
                raise MigrationError("the stream ended early (truncated)")  # pragma: no cover - finish raised
            self._decoder.feed(data)
        return section

    async def expect_end_of_input(self) -> None:
        """After the end section: nothing more may follow (a file's trailing bytes)."""
        data = await self._receive()
        if data:
            raise MigrationError("data after the stream's end section")

    async def _receive(self) -> bytes:
        try:
            data = await self._source.receive(_RECEIVE_CHUNK)
        except anyio.EndOfStream:
            return b""
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise MigrationError(f"reading the stream failed: {describe_io_error(exc)}") from exc
        self.bytes_read += len(data)
        return data


class StreamWriter:
    """Writes a stream to a ``ByteSink``: ``header()``, sections, ``end()``. I/O failures
    are ``MigrationError``."""

    def __init__(self, sink: ByteSink, *, version: int = VERSION) -> None:
        self._sink = sink
        self._version = version
        self._sequence = 0
        self.bytes_written = 0

    async def header(self) -> None:
        await self._send(encode_header(self._version))

    async def section(self, kind: SectionKind, name: str, payload: bytes) -> None:
        await self._send_parts(section_parts(self._sequence, kind, name, [payload]))

    async def run(self, run: MemoryRun) -> None:
        await self._send_parts(section_parts(self._sequence, SectionKind.MEMORY, "", run_parts(run)))

    async def disk_run(self, run: DiskRun) -> None:
        await self._send_parts(section_parts(self._sequence, SectionKind.DISK, "", disk_run_parts(run)))

    async def _send_parts(self, parts: list[bytes]) -> None:
        self._sequence += 1
        for part in parts:
            await self._send(part)

    async def end(self) -> None:
        await self.section(SectionKind.END, "", b"")

    async def _send(self, data: bytes) -> None:
        try:
            await self._sink.send(data)
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise MigrationError(f"writing the stream failed: {describe_io_error(exc)}") from exc
        self.bytes_written += len(data)


class FileSource:
    """A binary file as a ``ByteSource``; reads happen on worker threads."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file

    async def receive(self, max_bytes: int = 65536) -> bytes:
        data = await anyio.to_thread.run_sync(self._file.read, max_bytes)
        if not data:
            raise anyio.EndOfStream
        return data


class FileSink:
    """A binary file as a ``ByteSink``: buffered, written on worker threads; ``flush()``
    writes the rest (and fsyncs with ``sync=True``)."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self._buffer = bytearray()

    async def send(self, item: bytes) -> None:
        if len(item) >= _FILE_BUFFER // 2:  # a memory run's data: written as it is, not copied
            await self._write()
            await anyio.to_thread.run_sync(self._file.write, item)
            return
        self._buffer += item
        if len(self._buffer) >= _FILE_BUFFER:
            await self._write()

    async def flush(self, *, sync: bool = False) -> None:
        """Write what is buffered (and flush the file object; ``sync``: fsync too)."""
        await self._write()
        await anyio.to_thread.run_sync(self._sync if sync else self._file.flush)

    def _sync(self) -> None:
        import os

        self._file.flush()
        os.fsync(self._file.fileno())

    async def _write(self) -> None:
        if self._buffer:
            data, self._buffer = bytes(self._buffer), bytearray()
            await anyio.to_thread.run_sync(self._file.write, data)
