"""The host service's values: VM states, definitions, summaries, events, and its errors."""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable

import attrs

from trivmm.errors import TrivmmError

__all__ = ["VmState", "VmDefinition", "VmSummary", "HostEvent", "HostError", "UnknownVm", "VmStateConflict",
           "InvalidDefinition", "check_vm_name", "VM_NAME_PATTERN"]  # fmt: skip

VM_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


class HostError(TrivmmError):
    """The host service refused or failed an operation; ``str()`` is a sentence for the user."""


class UnknownVm(HostError):
    """No VM of that name is defined."""


class VmStateConflict(HostError):
    """The operation does not fit the VM's state: a double start, undefining a running VM, ..."""


class InvalidDefinition(HostError):
    """A VM definition that cannot be used: a bad name, or run options ``run`` would refuse."""


class VmState(enum.Enum):
    """Where a VM of the host is in its life."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    CRASHED = "crashed"  # the VM failed, or the guest kernel panicked

    @property
    def active(self) -> bool:
        """Whether the VM has a running VMM behind it (or is getting one, or losing it)."""
        return self not in (VmState.STOPPED, VmState.CRASHED)


def check_vm_name(name: str) -> str:
    """``name`` if it is a valid VM name, else ``InvalidDefinition``."""
    if not isinstance(name, str) or not VM_NAME_PATTERN.fullmatch(name):
        raise InvalidDefinition(f"bad VM name {name!r}: use 1 to 63 letters, digits, '.', '_' or '-', "
                                "starting with a letter or digit")  # fmt: skip
    return name


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(str(value) for value in values)


@attrs.frozen
class VmDefinition:
    """A VM as the host keeps it: its name, ``python -m trivmm run``'s options, autostart."""

    name: str
    run_args: tuple[str, ...] = attrs.field(converter=_strings)
    autostart: bool = False


@attrs.frozen
class VmSummary:
    """A VM's definition and state at one moment, for listings."""

    name: str
    state: VmState
    vcpus: int
    memory: int  # bytes
    display: tuple[int, int] | None
    autostart: bool
    last_exit: str | None  # "powered off", "guest panicked", "error: ...", None: never ran


@attrs.frozen
class HostEvent:
    """Something that happened on the host: a VM defined, undefined or changing state."""

    time: float
    vm: str | None
    kind: str  # "defined", "undefined", "state", "service"
    state: VmState | None
    detail: str
