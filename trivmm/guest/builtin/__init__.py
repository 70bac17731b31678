"""The built-in guest: a tiny PVH kernel shipped in the package (source: builtin/hello.S)."""

from __future__ import annotations

import functools
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

__all__ = ["builtin_guest", "assemble_builtin_guest", "BUILTIN_GREETING"]

BUILTIN_GREETING = b"Hello from the trivmm built-in guest!"
_PACKAGE = "trivmm.guest.builtin"


@functools.cache
def builtin_guest() -> bytes:
    """The shipped ELF image (read once per process: it is part of the installed package)."""
    return resources.files(_PACKAGE).joinpath("hello.elf").read_bytes()


def assemble_builtin_guest(output: Path | None = None) -> bytes:
    """Assemble and link hello.S with GNU as/ld (binutils); write it to ``output`` if given."""
    source = resources.files(_PACKAGE)
    with tempfile.TemporaryDirectory() as tmp, resources.as_file(source) as src:
        obj = Path(tmp) / "hello.o"
        elf = Path(tmp) / "hello.elf"
        subprocess.run(["as", "--64", "-o", str(obj), str(src / "hello.S")], check=True)
        subprocess.run(["ld", "-m", "elf_x86_64", "-T", str(src / "hello.ld"), "-n", "--build-id=none",
                        "-s", "-o", str(elf), str(obj)], check=True)  # fmt: skip
        data = elf.read_bytes()
    if output is not None:
        output.write_bytes(data)
    return data
