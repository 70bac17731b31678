"""A QMP control socket (QEMU's machine protocol on a unix socket) for a running VM:
``QmpServer`` (``trivmm.qmp.server``) and the wire format (``trivmm.qmp.protocol``).
docs/qmp.md lists the commands and events, and what differs from QEMU."""

from trivmm.qmp.protocol import MAX_MESSAGE, Param, QmpError
from trivmm.qmp.server import (
    FLUSH_TIMEOUT,
    MAX_CLIENTS,
    MIGRATE_PARAMS,
    MIGRATE_SET_PARAMS,
    MIGRATION_UNAVAILABLE,
    MigrationControl,
    QmpServer,
)

__all__ = ["QmpServer", "MigrationControl", "QmpError", "Param", "MAX_MESSAGE", "MAX_CLIENTS", "FLUSH_TIMEOUT",
           "MIGRATE_PARAMS", "MIGRATE_SET_PARAMS", "MIGRATION_UNAVAILABLE"]  # fmt: skip
