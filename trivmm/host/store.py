"""The host service's SQLite database: VM definitions, their last known state, an event log.

The schema is versioned with ``PRAGMA user_version``: ``MIGRATIONS[i]`` takes a database
from version ``i`` to ``i + 1``, each in one transaction with the version bump, so a
database is always at one version or the next (never half-migrated), and a database newer
than this code is refused. Every change is one transaction; WAL journaling with
``synchronous=FULL`` makes a committed change survive the service being killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import attrs

from trivmm.host.model import HostError, HostEvent, UnknownVm, VmDefinition, VmState, VmStateConflict

__all__ = ["Store", "StoredVm", "MIGRATIONS", "SCHEMA_VERSION", "EVENT_LOG_LIMIT"]

EVENT_LOG_LIMIT = 10_000  # events kept; older ones are pruned


def _v1(db: sqlite3.Connection) -> None:
    db.execute("""CREATE TABLE vms (
        name TEXT PRIMARY KEY,
        run_args TEXT NOT NULL,             -- JSON list of run's options
        autostart INTEGER NOT NULL DEFAULT 0,
        state TEXT NOT NULL DEFAULT 'stopped',
        last_exit TEXT,
        created REAL NOT NULL)""")
    db.execute("""CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time REAL NOT NULL,
        vm TEXT,
        kind TEXT NOT NULL,
        state TEXT,
        detail TEXT NOT NULL DEFAULT '')""")


def _v2(db: sqlite3.Connection) -> None:
    db.execute("CREATE INDEX events_by_vm ON events (vm, id)")


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_v1, _v2)
SCHEMA_VERSION = len(MIGRATIONS)


@attrs.frozen
class StoredVm:
    """A VM's row: its definition and the state the service last recorded."""

    definition: VmDefinition
    state: VmState
    last_exit: str | None


class Store:
    """The database at ``path`` (created, then migrated to ``SCHEMA_VERSION``). Used from one
    thread (the service's event loop); each method is one transaction."""

    def __init__(self, path: Path, *, migrations: Sequence[Callable[[sqlite3.Connection], None]] = MIGRATIONS) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)  # not readable by others
        os.close(fd)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._migrate(migrations)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise HostError(f"the state database {path} cannot be used: {exc}") from None
        except BaseException:
            self._db.close()
            raise

    @property
    def version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self, migrations: Sequence[Callable[[sqlite3.Connection], None]]) -> None:
        version = self.version
        if version > len(migrations):
            raise HostError(f"the state database {self.path} is at schema version {version}, newer than this "
                            f"trivmm's {len(migrations)}: use a newer trivmm")  # fmt: skip
        for index in range(version, len(migrations)):
            with self.transaction() as db:
                migrations[index](db)
                db.execute(f"PRAGMA user_version = {index + 1}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction (BEGIN IMMEDIATE ... COMMIT; ROLLBACK if the block raises)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except BaseException:  # a full disk, an I/O error: end the transaction, or none starts again
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()

    # --- VMs -------------------------------------------------------------------------------
    def vms(self) -> list[StoredVm]:
        rows = self._db.execute("SELECT name, run_args, autostart, state, last_exit FROM vms ORDER BY name")
        return [self._stored(row) for row in rows]

    def vm(self, name: str) -> StoredVm:
        row = self._db.execute("SELECT name, run_args, autostart, state, last_exit FROM vms WHERE name = ?",
                               (name,)).fetchone()  # fmt: skip
        if row is None:
            raise UnknownVm(f"no VM named {name!r} is defined")
        return self._stored(row)

    @staticmethod
    def _stored(row: tuple[str, str, int, str, str | None]) -> StoredVm:
        name, run_args, autostart, state, last_exit = row
        return StoredVm(VmDefinition(name, tuple(json.loads(run_args)), bool(autostart)), VmState(state), last_exit)

    def define(self, definition: VmDefinition, *, now: float | None = None) -> HostEvent:
        now = time.time() if now is None else now
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM vms WHERE name = ?", (definition.name,)).fetchone():
                raise VmStateConflict(f"a VM named {definition.name!r} is already defined")
            db.execute("INSERT INTO vms (name, run_args, autostart, created) VALUES (?, ?, ?, ?)",
                       (definition.name, json.dumps(list(definition.run_args)), int(definition.autostart), now))
            return self._log(db, HostEvent(now, definition.name, "defined", VmState.STOPPED,
                                           " ".join(definition.run_args)))  # fmt: skip

    def undefine(self, name: str, *, now: float | None = None) -> HostEvent:
        now = time.time() if now is None else now
        with self.transaction() as db:
            if db.execute("DELETE FROM vms WHERE name = ?", (name,)).rowcount == 0:
                raise UnknownVm(f"no VM named {name!r} is defined")
            return self._log(db, HostEvent(now, name, "undefined", None, ""))

    def set_state(self, name: str, state: VmState, detail: str = "", *, last_exit: str | None = None,
                  now: float | None = None) -> HostEvent:  # fmt: skip
        """Record ``state`` (and ``last_exit`` when given) and log it, in one transaction."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            if last_exit is None:
                changed = db.execute("UPDATE vms SET state = ? WHERE name = ?", (state.value, name)).rowcount
            else:
                changed = db.execute("UPDATE vms SET state = ?, last_exit = ? WHERE name = ?",
                                     (state.value, last_exit, name)).rowcount  # fmt: skip
            if changed == 0:
                raise UnknownVm(f"no VM named {name!r} is defined")
            return self._log(db, HostEvent(now, name, "state", state, detail))

    # --- the event log ----------------------------------------------------------------------
    def log(self, event: HostEvent) -> HostEvent:
        with self.transaction() as db:
            return self._log(db, event)

    def _log(self, db: sqlite3.Connection, event: HostEvent) -> HostEvent:
        cursor = db.execute("INSERT INTO events (time, vm, kind, state, detail) VALUES (?, ?, ?, ?, ?)",
                            (event.time, event.vm, event.kind, event.state.value if event.state else None,
                             event.detail))  # fmt: skip
        if cursor.lastrowid is not None and cursor.lastrowid % 1000 == 0:
            db.execute("DELETE FROM events WHERE id <= ?", (cursor.lastrowid - EVENT_LOG_LIMIT,))
        return event

    def events(self, vm: str | None = None, *, limit: int = 100) -> list[HostEvent]:
        """The newest ``limit`` events (of ``vm``, when given), oldest first."""
        if vm is None:
            rows = self._db.execute("SELECT time, vm, kind, state, detail FROM events ORDER BY id DESC LIMIT ?",
                                    (limit,))  # fmt: skip
        else:
            rows = self._db.execute("SELECT time, vm, kind, state, detail FROM events WHERE vm = ? "
                                    "ORDER BY id DESC LIMIT ?", (vm, limit))  # fmt: skip
        events = [HostEvent(t, v, k, VmState(s) if s else None, d) for t, v, k, s, d in rows]
        events.reverse()
        return events
