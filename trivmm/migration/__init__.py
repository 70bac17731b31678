"""Snapshots and migration: the versioned stream (``stream``), CPU and platform state
(``state``), the device registry (``devices``), snapshot/restore (``snapshot``), dirty-page
tracking (``dirty``), URIs and the hand-over (``transport``), the source's migration engine
(``migrate``) and the destination (``incoming``). The format and the protocol are described
in docs/migration.md. It talks to devices only through their state API (``save()``/
``restore()`` beside each device, or ``StateProvider``)."""

from trivmm.errors import MigrationError
from trivmm.migration.devices import AttrsState, DeviceSet, StateProvider, vm_devices
from trivmm.migration.incoming import IncomingListener, listen, receive_vm
from trivmm.migration.migrate import Migration, MigrationInfo, MigrationParameters
from trivmm.migration.snapshot import SnapshotInfo, SnapshotSource, SnapshotTarget, restore_vm, snapshot_vm
from trivmm.migration.stream import HOT_VERSION, VERSION, StreamReader, StreamWriter
from trivmm.migration.transport import MigrationUri, parse_uri

__all__ = ["MigrationError", "snapshot_vm", "restore_vm", "SnapshotInfo", "SnapshotSource", "SnapshotTarget",
           "StateProvider", "AttrsState", "DeviceSet", "vm_devices", "StreamReader", "StreamWriter",
           "VERSION", "HOT_VERSION", "Migration", "MigrationInfo", "MigrationParameters", "IncomingListener",
           "listen", "receive_vm", "MigrationUri", "parse_uri"]  # fmt: skip
