"""The exceptions trivmm raises on purpose. Anything else escaping is a bug."""

from __future__ import annotations

__all__ = ["TrivmmError", "ConfigError", "VmError", "VcpuError", "MigrationError"]


class TrivmmError(Exception):
    """Base of trivmm's own errors; ``str()`` is a one-line reason fit for a user."""


class ConfigError(TrivmmError, ValueError):
    """Bad input from the user: a size, a path, a kernel or initrd that cannot be used."""


class VmError(TrivmmError):
    """The VM failed while running (a vCPU, a device or the host KVM gave up)."""


class VcpuError(VmError):
    """One vCPU stopped with an error; the message names the vCPU and the cause."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"vCPU {index}: {message}")
        self.index = index


class MigrationError(TrivmmError):
    """A snapshot or migration stream that cannot be written, read or applied: a bad magic,
    an unknown version, a bad checksum, a truncated stream, a length out of bounds, a
    destination that does not match, or a VM with state that cannot be saved yet."""
