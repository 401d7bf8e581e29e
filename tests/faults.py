"""Faults the tests inject where no real one can be had on cue."""

from __future__ import annotations

import sqlite3


class _Intercepted:
    """A sqlite3 connection whose statements pass :meth:`_check` first; everything else is the
    connection's own."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def _check(self, sql: str) -> None:
        raise NotImplementedError

    def execute(self, sql, *args):
        self._check(sql)
        return self._db.execute(sql, *args)

    def executemany(self, sql, *args):
        self._check(sql)
        return self._db.executemany(sql, *args)

    def __enter__(self):
        return self._db.__enter__()

    def __exit__(self, *exc):
        return self._db.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._db, name)


class FailingConnection(_Intercepted):
    """The buffer's sqlite3 connection, except that the insert of readings raises
    ``database or disk is full`` while ``armed`` (after whatever ran before it in the put:
    reclaim, eviction, new meters). ``deleted`` tells whether rows were deleted from readings
    in the transaction that failed (an eviction or a reclaim ran first)."""

    def __init__(self, db: sqlite3.Connection, tally: dict[str, int]):
        super().__init__(db)
        self.armed = False
        self.tally = tally  # failed, failed_after_delete: across the buffers of one run
        self._deleted = False

    def _check(self, sql: str) -> None:
        text = " ".join(sql.split()).upper()
        if text.startswith("BEGIN"):
            self._deleted = False
        elif text.startswith("DELETE FROM READINGS"):
            self._deleted = True
        elif self.armed and text.startswith("INSERT INTO READINGS"):
            self.armed = False
            self.tally["failed"] += 1
            self.tally["failed_after_delete"] += self._deleted
            raise sqlite3.OperationalError("database or disk is full")


class DiskFullOn(_Intercepted):
    """A sqlite3 connection, except that a statement starting with ``statement`` finds the disk
    full while ``armed``: SQLite has rolled the transaction back by itself (as it may on
    SQLITE_FULL) and the statement raises "database or disk is full". ``once``: disarm after it."""

    def __init__(self, db: sqlite3.Connection, statement: str, *, armed: bool = True, once: bool = False):
        super().__init__(db)
        self.statement, self.armed, self.once = statement, armed, once

    def _check(self, sql: str) -> None:
        if self.armed and sql.startswith(self.statement):
            self.armed = not self.once
            self._db.execute("ROLLBACK")
            raise sqlite3.OperationalError("database or disk is full")
