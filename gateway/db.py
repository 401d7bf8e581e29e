"""SQLite plumbing shared by the buffer and the scorer: one ``atomic()`` and one error mapping.

:func:`atomic` is the only way the gateway opens a write transaction (``BEGIN IMMEDIATE``;
``COMMIT``, or ``ROLLBACK`` on any exception). :func:`mapped` turns a ``sqlite3`` error into the
most specific :class:`~gateway.errors.BufferError` where it crosses the buffer's seam:

- SQLITE_FULL ("database or disk is full") → :class:`~gateway.errors.DiskFull` (transient: space
  may come back);
- SQLITE_BUSY / SQLITE_LOCKED ("database is locked") → :class:`~gateway.errors.BufferBusy`
  (transient);
- SQLITE_CORRUPT / SQLITE_NOTADB ("malformed", "not a database") →
  :class:`~gateway.errors.BufferCorrupt`, which names the file and ``gateway buffer recover``;
- anything else → :class:`~gateway.errors.BufferError`.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from gateway.errors import BufferBusy, BufferCorrupt, BufferError, DiskFull

_FULL = {"SQLITE_FULL"}
_BUSY = {"SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_BUSY_SNAPSHOT", "SQLITE_BUSY_RECOVERY", "SQLITE_BUSY_TIMEOUT"}
_CORRUPT = {"SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_CORRUPT_INDEX", "SQLITE_CORRUPT_SEQUENCE",
            "SQLITE_CORRUPT_VTAB"}


def map_error(exc: sqlite3.Error, path: str | Path) -> BufferError:
    """The gateway's error for a ``sqlite3`` error on the buffer file ``path``."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if name in _FULL or "database or disk is full" in text:
        return DiskFull(f"{path}: the disk is full ({text}); readings wait in the source until space comes back")
    if name in _BUSY or "database is locked" in text:
        return BufferBusy(f"{path}: {text}")
    if name in _CORRUPT or "malformed" in text or "not a database" in text:
        return BufferCorrupt(
            f"{path}: the buffer file is damaged ({text}); stop the gateway and run "
            f"`gateway buffer recover {path} NEW_FILE` to salvage its readings"
        )
    return BufferError(f"{path}: {text}")


@contextmanager
def mapped(path: str | Path) -> Iterator[None]:
    """Re-raise any ``sqlite3`` error inside the block as the gateway's error (see :func:`map_error`)."""
    try:
        yield
    except sqlite3.Error as exc:
        raise map_error(exc, path) from exc


@contextmanager
def atomic(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: ``BEGIN IMMEDIATE``, then ``COMMIT``, or ``ROLLBACK`` on any exception.

    On a connection already inside a transaction it joins it (the outer block commits)."""
    if db.in_transaction:
        yield db
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite rolled back by itself (e.g. on SQLITE_FULL); the original error matters
        raise
    db.execute("COMMIT")
