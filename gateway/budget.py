"""The buffer's byte budget: the database file and its write-ahead log together.

``budget_bytes`` caps what the buffer may hold on disk. A share of it (an eighth, at most 4 MiB)
is the WAL's: SQLite checkpoints the log when it reaches that size (``wal_autocheckpoint``) and
truncates it back to it afterwards (``journal_size_limit``), so the ``-wal`` file stays within its
share. The rest is for the database's pages in use; pages freed by reclaim and eviction are
reused before the file grows.

A put checks the budget *before* it writes, with the bytes it is about to add, so the budget is
never overshot by a batch. The check reads SQLite's page counts only when an estimate says the
budget may be near.

When the disk itself fills first (SQLITE_FULL), the budget shrinks to what the file holds then,
so ``drop_oldest`` makes room inside the file instead of growing it; it comes back once the disk
has room again.

Policies when the budget is used: ``drop_oldest`` evicts the oldest unsent readings (counted);
``reject_newest`` refuses the incoming batch: a source that can wait is told the buffer is full
(:class:`~gateway.errors.BufferFull`, its position stays), and one that cannot counts what it drops.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

POLICIES = ("drop_oldest", "reject_newest")
ROW_BYTES = 64  # an upper estimate of one stored reading, scores included, B-tree overhead too
WAL_SHARE, WAL_MAX = 8, 4 << 20


class Budget:
    def __init__(self, path: Path, budget_bytes: int, policy: str):
        self.path = path
        self.budget_bytes = budget_bytes
        self.policy = policy
        self.page_size = 4096
        self.wal_bytes = min(budget_bytes // WAL_SHARE, WAL_MAX) if budget_bytes else 0
        self.disk_cap: int | None = None  # set when the disk filled before the budget
        self._last_used, self._unmeasured = 0, 1 << 40  # measure on the first put

    def configure(self, db: sqlite3.Connection) -> None:
        """Keep the WAL within its share (called once the connection is in WAL mode)."""
        self.page_size = db.execute("PRAGMA page_size").fetchone()[0]
        if self.budget_bytes:
            pages = max(self.wal_bytes // self.page_size, 16)
            db.execute(f"PRAGMA wal_autocheckpoint={pages}")
            db.execute(f"PRAGMA journal_size_limit={pages * self.page_size}")

    @property
    def limit(self) -> int:
        """Bytes the database's pages may use now."""
        limit = self.budget_bytes - self.wal_bytes
        return min(limit, self.disk_cap) if self.disk_cap is not None else limit

    def used(self, db: sqlite3.Connection) -> int:
        pages, free, size = db.execute(
            "SELECT * FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()"
        ).fetchone()
        return (pages - free) * size

    def near(self, db: sqlite3.Connection, incoming: int) -> bool:
        """Whether ``incoming`` more readings would pass the limit (reads the pages only when the
        estimate since the last reading of them says they may)."""
        if not self.budget_bytes:
            return False
        if self.disk_cap is not None and self._disk_has_room():
            self.disk_cap = None
        self._unmeasured += incoming
        if self._last_used + ROW_BYTES * self._unmeasured < self.limit:
            return False
        self._last_used, self._unmeasured = self.used(db), incoming
        return self._last_used + ROW_BYTES * incoming >= self.limit

    def over(self, db: sqlite3.Connection, incoming: int) -> bool:
        """Whether ``incoming`` readings do not fit now (after a reclaim)."""
        return self.used(db) + ROW_BYTES * incoming >= self.limit

    def disk_full(self, db: sqlite3.Connection) -> None:
        """The disk filled: hold the database at the size it has."""
        try:
            used = self.used(db)
        except sqlite3.Error:
            used = self._last_used
        self.disk_cap = max(used - 16 * self.page_size, self.page_size)
        self._unmeasured = 1 << 40

    def _disk_has_room(self) -> bool:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize > 2 * self.wal_bytes + (1 << 20)

    def state(self) -> tuple:
        return self.disk_cap, self._last_used, self._unmeasured

    def restore(self, state: tuple) -> None:
        self.disk_cap, self._last_used, self._unmeasured = state
