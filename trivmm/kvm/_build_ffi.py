"""Regenerate ``_kvm_cffi.py`` from ``_cdef.py``: ``python -m trivmm.kvm._build_ffi``."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import cffi

from trivmm.kvm._cdef import CDEF

MODULE = "trivmm.kvm._kvm_cffi"
TARGET = Path(__file__).with_name("_kvm_cffi.py")


def generate() -> str:
    """The text of the out-of-line ABI module for CDEF."""
    builder = cffi.FFI()
    builder.cdef(CDEF)
    builder.set_source(MODULE, None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "_kvm_cffi.py"
        builder.emit_python_code(str(path))
        return path.read_text()


if __name__ == "__main__":
    TARGET.write_text(generate())
    print(f"wrote {TARGET}", file=sys.stderr)
