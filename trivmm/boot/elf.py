"""ELF64 kernel images (``vmlinux``): loadable segments and the PVH entry note.

The file is untrusted: the header, the program-header table, each segment and each note
must lie inside the file, segment sizes must be sane (``filesz <= memsz``), and the
loadable segments together, like the note segments together, may not cover more bytes
than the file has (overlapping copies would multiply the work a small file causes);
anything else is a ``KernelImageError``. Placement in guest memory is the loader's check.
"""

from __future__ import annotations

import struct

import attrs

from trivmm.boot.bzimage import KernelImageError

__all__ = ["ElfImage", "ElfSegment", "XEN_ELFNOTE_PHYS32_ENTRY"]

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_NHDR = struct.Struct("<III")
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
_EM_X86_64 = 62
_ET_EXEC = 2
_PT_LOAD = 1
_PT_NOTE = 4
XEN_ELFNOTE_PHYS32_ENTRY = 18
# Small images (the built-in guest, test guests: parsed twice per VM, by check_kernel and
# the loader) are remembered by identity: a ``bytes`` object cannot change, and the cache
# holds it, so its identity cannot be reused. Large ones (Linux) are not kept alive.
_REMEMBER_MAX_SIZE = 1 << 20
_REMEMBERED_LIMIT = 8
_remembered: dict[int, tuple[bytes, ElfImage]] = {}


@attrs.frozen
class ElfSegment:
    paddr: int
    data: bytes  # the file bytes (filesz); the rest up to memsz is zero
    memsz: int


@attrs.frozen
class ElfImage:
    entry: int
    segments: tuple[ElfSegment, ...]
    pvh_entry: int | None
    linux: bool = False  # it has an ELF note owned by "Linux": a Linux vmlinux

    @property
    def end(self) -> int:
        return max(s.paddr + s.memsz for s in self.segments)

    @classmethod
    def parse(cls, image: bytes) -> ElfImage:
        if type(image) is not bytes or len(image) > _REMEMBER_MAX_SIZE:
            return cls._parse(image)
        hit = _remembered.get(id(image))
        if hit is not None and hit[0] is image:
            return hit[1]
        parsed = cls._parse(image)
        if len(_remembered) >= _REMEMBERED_LIMIT:
            _remembered.clear()
        _remembered[id(image)] = (image, parsed)
        return parsed

    @classmethod
    def _parse(cls, image: bytes) -> ElfImage:
        if len(image) < _EHDR.size or image[:4] != b"\x7fELF":
            raise KernelImageError("not an ELF file")
        ident, e_type, machine, _, entry, phoff, _, _, _, phentsize, phnum, *_ = _EHDR.unpack_from(image)
        if ident[4] != _ELFCLASS64 or ident[5] != _ELFDATA2LSB or machine != _EM_X86_64:
            raise KernelImageError("not a little-endian x86-64 ELF64 kernel")
        if e_type != _ET_EXEC:
            raise KernelImageError(f"ELF type {e_type} is not an executable (ET_EXEC)")
        if phentsize != _PHDR.size or phnum == 0 or phoff + phnum * phentsize > len(image):
            raise KernelImageError("ELF program header table is missing or runs past the file")
        segments: list[ElfSegment] = []
        pvh_entry = None
        linux = False
        load_bytes = note_bytes = 0
        for i in range(phnum):
            p_type, _, offset, _, paddr, filesz, memsz, _ = _PHDR.unpack_from(image, phoff + i * phentsize)
            if offset + filesz > len(image):
                raise KernelImageError(f"ELF segment {i} runs past the end of the file (truncated?)")
            if p_type == _PT_LOAD and memsz:
                if filesz > memsz:
                    raise KernelImageError(f"ELF segment {i} has filesz > memsz")
                load_bytes += filesz
                if load_bytes > len(image):
                    raise KernelImageError(f"ELF loadable segments overlap in the file (segment {i})")
                segments.append(ElfSegment(paddr, image[offset : offset + filesz], memsz))
            elif p_type == _PT_NOTE:
                note_bytes += filesz
                if note_bytes > len(image):
                    raise KernelImageError(f"ELF note segments overlap in the file (segment {i})")
                notes = image[offset : offset + filesz]
                pvh_entry = _find_pvh_note(notes) or pvh_entry
                linux = linux or _has_owner(notes, b"Linux")
        if not segments:
            raise KernelImageError("ELF file has no loadable segment")
        return cls(entry, tuple(segments), pvh_entry, linux)


def _find_pvh_note(notes: bytes) -> int | None:
    pos = 0
    while pos + _NHDR.size <= len(notes):
        namesz, descsz, n_type = _NHDR.unpack_from(notes, pos)
        name_start = pos + _NHDR.size
        desc_start = name_start + (namesz + 3) // 4 * 4
        desc_end = desc_start + descsz
        if desc_end > len(notes):
            raise KernelImageError("ELF note runs past its segment")
        if notes[name_start : name_start + namesz].rstrip(b"\0") == b"Xen" and n_type == XEN_ELFNOTE_PHYS32_ENTRY:
            if descsz not in (4, 8):
                raise KernelImageError(f"PVH entry note has a {descsz}-byte address")
            return int.from_bytes(notes[desc_start:desc_end], "little")
        pos = desc_start + (descsz + 3) // 4 * 4
    return None


def _has_owner(notes: bytes, owner: bytes) -> bool:
    """Whether a note in ``notes`` (checked by ``_find_pvh_note`` already) is ``owner``'s."""
    pos = 0
    while pos + _NHDR.size <= len(notes):
        namesz, descsz, _ = _NHDR.unpack_from(notes, pos)
        name_start = pos + _NHDR.size
        if notes[name_start : name_start + namesz].rstrip(b"\0") == owner:
            return True
        pos = name_start + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False
