"""Assemble the tiny test guests in guests/ with GNU as and ld (cached per session)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import require

GUESTS = Path(__file__).parent / "guests"


def assemble(name: str, out_dir: Path, *, symbols: dict[str, int] | None = None) -> Path:
    """Build guests/<name>.S into an ELF in ``out_dir``; ``symbols`` are patched afterwards
    (value written as a 32-bit word at each named symbol's file offset). Without GNU binutils
    the calling test skips, or fails in strict mode (tests/conftest.py)."""
    require("binutils")
    obj = out_dir / f"{name}.o"
    elf = out_dir / f"{name}.elf"
    subprocess.run(["as", "--64", "-I", str(GUESTS), "-o", str(obj), str(GUESTS / f"{name}.S")], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-T", str(GUESTS / "guest.ld"), "-n", "--build-id=none",
                    "--no-warn-rwx-segments", "-o", str(elf), str(obj)], check=True)  # fmt: skip
    if symbols:
        data = bytearray(elf.read_bytes())
        for symbol, value in symbols.items():
            offset = _file_offset(elf, symbol)
            data[offset : offset + 4] = value.to_bytes(4, "little")
        elf.write_bytes(bytes(data))
    return elf


def _file_offset(elf: Path, symbol: str) -> int:
    table = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    address = next(int(line.split()[0], 16) for line in table.splitlines() if line.split()[-1] == symbol)
    headers = subprocess.run(["readelf", "-lW", str(elf)], capture_output=True, text=True, check=True).stdout
    for line in headers.splitlines():
        parts = line.split()
        if parts and parts[0] == "LOAD":
            offset, vaddr, filesz = int(parts[1], 16), int(parts[2], 16), int(parts[4], 16)
            if vaddr <= address < vaddr + filesz:
                return offset + address - vaddr
    raise LookupError(symbol)
