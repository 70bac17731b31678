"""Snapshots and migration: the versioned stream (``stream``), CPU and platform state
(``state``), the device registry (``devices``), and snapshot/restore (``snapshot``).
The format is described in docs/migration.md. It talks to devices only through their
state API (``save()``/``restore()`` beside each device, or ``StateProvider``)."""

from trivmm.errors import MigrationError
from trivmm.migration.devices import AttrsState, DeviceSet, StateProvider, vm_devices
from trivmm.migration.snapshot import SnapshotInfo, SnapshotSource, SnapshotTarget, restore_vm, snapshot_vm
from trivmm.migration.stream import VERSION, StreamReader, StreamWriter

__all__ = ["MigrationError", "snapshot_vm", "restore_vm", "SnapshotInfo", "SnapshotSource", "SnapshotTarget",
           "StateProvider", "AttrsState", "DeviceSet", "vm_devices", "StreamReader", "StreamWriter",
           "VERSION"]  # fmt: skip
