"""The host service: every VM of a host in one process (``python -m trivmm serve``), kept in
SQLite under a state directory, driven by ``python -m trivmm vm ...`` over a unix socket
(docs/host.md). ``HostManager`` is the API the control socket and the web console use."""

from trivmm.host.manager import ConsoleAttachment, HostManager, default_state_dir
from trivmm.host.model import (
           HostError,
           HostEvent,
           InvalidDefinition,
           UnknownVm,
           VmDefinition,
           VmState,
           VmStateConflict,
           VmSummary,
)
from trivmm.host.service import serve

__all__ = ["HostManager", "VmDefinition", "VmState", "VmSummary", "HostEvent", "HostError", "UnknownVm",
           "VmStateConflict", "InvalidDefinition", "ConsoleAttachment", "default_state_dir", "serve"]  # fmt: skip
