"""The host service's SQLite store: schema migrations, transactions, state across restarts."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from trivmm.host.consolelog import ConsoleLog
from trivmm.host.model import (
    HostError,
    InvalidDefinition,
    UnknownVm,
    VmDefinition,
    VmState,
    VmStateConflict,
    check_vm_name,
)
from trivmm.host.store import MIGRATIONS, SCHEMA_VERSION, Store


def test_a_new_database_is_made_at_the_current_schema_version(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    try:
        assert store.version == SCHEMA_VERSION == len(MIGRATIONS) >= 2
        assert store.vms() == [] and store.events() == []
    finally:
        store.close()
    assert (tmp_path / "db").stat().st_mode & 0o077 == 0  # not readable by others


def test_an_older_database_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    old = Store(tmp_path / "db", migrations=MIGRATIONS[:1])
    assert old.version == 1
    old.define(VmDefinition("kept", ("--memory", "64M"), autostart=True))
    old.close()
    store = Store(tmp_path / "db")
    try:
        assert store.version == SCHEMA_VERSION
        [vm] = store.vms()
        assert vm.definition == VmDefinition("kept", ("--memory", "64M"), True) and vm.state is VmState.STOPPED
        indexes = [row[0] for row in sqlite3.connect(tmp_path / "db").execute(
            "SELECT name FROM sqlite_master WHERE type = 'index'")]  # fmt: skip
        assert "events_by_vm" in indexes
    finally:
        store.close()


def test_a_failing_migration_leaves_the_database_at_its_version(tmp_path: Path) -> None:
    Store(tmp_path / "db", migrations=MIGRATIONS[:1]).close()

    def broken(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE half (x)")
        raise RuntimeError("migration bug")

    with pytest.raises(RuntimeError, match="migration bug"):
        Store(tmp_path / "db", migrations=(MIGRATIONS[0], broken))
    db = sqlite3.connect(tmp_path / "db")
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    assert db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'half'").fetchone()[0] == 0


def test_a_database_newer_than_this_code_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "db").close()
    db = sqlite3.connect(tmp_path / "db")
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(HostError, match="newer than this trivmm"):
        Store(tmp_path / "db")


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "db").write_bytes(b"not a database" * 100)
    with pytest.raises(HostError, match="cannot be used"):
        Store(tmp_path / "db")


def test_changes_are_transactions_and_survive_a_reopen(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    store.define(VmDefinition("a", ()))
    with pytest.raises(VmStateConflict, match="already defined"):
        store.define(VmDefinition("a", ("--vcpus", "2")))
    with pytest.raises(UnknownVm):
        store.set_state("nobody", VmState.RUNNING)
    store.set_state("a", VmState.RUNNING, "started")
    with pytest.raises(RuntimeError), store.transaction() as db:  # a block that fails leaves nothing behind
        db.execute("UPDATE vms SET state = 'crashed'")
        raise RuntimeError
    events = store.events()
    # no event logged for the refused define or the unknown VM
    assert [(e.vm, e.kind, e.state) for e in events] == [("a", "defined", VmState.STOPPED),
                                                         ("a", "state", VmState.RUNNING)]  # fmt: skip
    store.close()  # as a killed service would leave it: the state says running
    reopened = Store(tmp_path / "db")
    try:
        [vm] = reopened.vms()
        assert vm.definition == VmDefinition("a", ()) and vm.state is VmState.RUNNING
        reopened.set_state("a", VmState.STOPPED, "service restarted", last_exit="service restarted")
        assert reopened.vm("a").last_exit == "service restarted"
        reopened.undefine("a")
        with pytest.raises(UnknownVm):
            reopened.vm("a")
        assert reopened.events("a")[-1].kind == "undefined"
    finally:
        reopened.close()


@pytest.mark.parametrize("name", ["", "-lead", "a b", "x" * 64, "../up", "é"])
def test_bad_vm_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidDefinition, match="bad VM name"):
        check_vm_name(name)


def test_the_console_log_keeps_its_newest_bytes_within_its_bound(tmp_path: Path) -> None:
    log = ConsoleLog(tmp_path / "console.log", limit=1000)
    written = b"".join(b"%05d\n" % i for i in range(2000))
    for start in range(0, len(written), 37):
        log.write(written[start : start + 37])
        assert log.size <= 1000 and (tmp_path / "console.log").stat().st_size <= 1000
    kept = (tmp_path / "console.log").read_bytes()
    assert len(kept) >= 500 and written.endswith(kept)
    assert log.tail(12) == b"01998\n01999\n"
    log.write(b"x" * 5000)  # one chunk larger than the bound
    assert (tmp_path / "console.log").read_bytes() == b"x" * 500
    log.close()
    reopened = ConsoleLog(tmp_path / "console.log", limit=100)  # a smaller bound on reopening
    assert (tmp_path / "console.log").stat().st_size == 50
    reopened.close()


def test_a_commit_that_fails_leaves_no_transaction_open(tmp_path: Path) -> None:
    """A COMMIT that fails (a full disk) used to leave the transaction open, so every later
    change failed with 'cannot start a transaction within a transaction'."""
    store = Store(tmp_path / "db")
    real = store._db

    class CommitFails:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
            if sql == "COMMIT":
                raise sqlite3.OperationalError("database or disk is full")
            return real.execute(sql, *args)

    store._db = CommitFails()  # type: ignore[assignment]
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        store.define(VmDefinition("a", ()))
    store._db = real
    assert not real.in_transaction
    store.define(VmDefinition("b", ()))
    assert [stored.definition.name for stored in store.vms()] == ["b"]
    store.close()
