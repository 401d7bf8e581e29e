"""The buffer's byte budget: the database file and its write-ahead log together.

``budget_bytes`` caps what the buffer may hold on disk. A share of it (an eighth, at most 4 MiB,
and at most a sixteenth of the disk) is the WAL's: SQLite checkpoints the log when it reaches that size (``wal_autocheckpoint``) and
truncates it back to it afterwards (``journal_size_limit``), so the ``-wal`` file stays within its
share. The rest is for the database's pages in use; pages freed by reclaim and eviction are
reused before the file grows.

A put checks the budget *before* it writes, with the bytes it is about to add, so the budget is
never overshot by a batch. The check reads SQLite's page counts only when an estimate says the
budget may be near.

A reserve file of the WAL's size (``<buffer>.reserve``, counted in the budget) stands beside the
buffer. When the disk itself fills first (SQLITE_FULL), the reserve goes, so that the WAL can be
checkpointed into the database (which may have to grow for it) and kept to a few pages, and the budget shrinks to what the file holds then, so ``drop_oldest``
makes room inside the file instead of growing it; both come back once the disk has room again.

Policies when the budget is used: ``drop_oldest`` evicts the oldest unsent readings (counted);
``reject_newest`` refuses the incoming batch: a source that can wait is told the buffer is full
(:class:`~gateway.errors.BufferFull`, its position stays), and one that cannot counts what it drops.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

POLICIES = ("drop_oldest", "reject_newest")
ROW_BYTES = 64  # an upper bound of one stored reading, scores included, B-tree overhead too
WAL_SHARE, WAL_MAX = 8, 4 << 20


class Budget:
    def __init__(self, path: Path, budget_bytes: int, policy: str):
        self.path = path
        self.budget_bytes = budget_bytes
        self.policy = policy
        self.page_size = 4096
        # The WAL's share: an eighth of the budget, at most 4 MiB, and at most a sixteenth of the
        # disk (a WAL larger than the free disk could never be checkpointed once the disk is full).
        disk = self._disk_size()
        self.wal_bytes = min(budget_bytes // WAL_SHARE if budget_bytes else WAL_MAX, WAL_MAX,
                             disk // 16 if disk else WAL_MAX)
        # The reserve: a file of the WAL's size beside the buffer, given back to the disk when it
        # fills, so that the WAL can always be checkpointed into the database (which may have to
        # grow for that) and nothing stays stuck once the disk is full.
        self.reserve_path = Path(f"{path}.reserve")
        self.reserve_bytes = self.wal_bytes
        self.wal_file_bytes = self.wal_bytes  # what the -wal file is kept to (configure sets it)
        self.disk_cap: int | None = None  # set when the disk filled before the budget
        self._last_used, self._unmeasured = 0, 1 << 40  # measure on the first put
        self.row_bytes = 40.0  # what a stored reading costs, learned from the pages as they fill

    def keep_reserve(self) -> bool:
        """Have the reserve file (when the disk has room for it and more); whether it is there."""
        try:
            if self.reserve_path.stat().st_size >= self.reserve_bytes:
                return True
        except FileNotFoundError:
            pass
        if self._disk_free() < 2 * self.reserve_bytes:
            return False
        try:
            fd = os.open(self.reserve_path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.reserve_bytes)
            finally:
                os.close(fd)
            return True
        except OSError:
            self.reserve_path.unlink(missing_ok=True)
            return False

    def configure(self, db: sqlite3.Connection, wal_bytes: int | None = None) -> None:
        """Keep the WAL within its share (called once the connection is in WAL mode)."""
        self.page_size = db.execute("PRAGMA page_size").fetchone()[0]
        wal = self.wal_bytes if wal_bytes is None else wal_bytes
        if wal:
            pages = max(wal // self.page_size, 16)
            db.execute(f"PRAGMA wal_autocheckpoint={pages}")
            db.execute(f"PRAGMA journal_size_limit={pages * self.page_size}")
            self.wal_file_bytes = pages * self.page_size

    @property
    def limit(self) -> int:
        """Bytes the database's pages may use now."""
        limit = self.budget_bytes - self.wal_bytes - self.reserve_bytes
        return min(limit, self.disk_cap) if self.disk_cap is not None else limit

    def used(self, db: sqlite3.Connection) -> int:
        """The database's pages in use, plus what the WAL holds beyond its share (a reader that
        keeps an old snapshot holds back the checkpoint, and the log grows past it)."""
        pages, free, size = db.execute(
            "SELECT * FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()"
        ).fetchone()
        try:
            wal = os.stat(f"{self.path}-wal").st_size
        except OSError:
            wal = 0
        return (pages - free) * size + max(wal - self.wal_bytes, 0)

    def hold_wal(self, db: sqlite3.Connection) -> None:
        """After a commit: when the WAL file is past its share (a reader held back the
        checkpoints, or the commit that triggered one left the file long until the next write),
        checkpoint it in full and truncate it, waiting a moment for a reader to finish. So the next
        transaction starts on at most a share of log, which :meth:`room` counts on."""
        if not self.wal_bytes:
            return
        try:
            wal = os.stat(f"{self.path}-wal").st_size
        except OSError:
            return
        if wal <= self.wal_file_bytes:
            return
        (timeout,) = db.execute("PRAGMA busy_timeout").fetchone()
        db.execute("PRAGMA busy_timeout=250")
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass  # still held: the next commit tries again, and the excess counts as used meanwhile
        finally:
            db.execute(f"PRAGMA busy_timeout={timeout}")

    def near(self, db: sqlite3.Connection, incoming: int) -> bool:
        """Whether ``incoming`` more readings would pass the limit (reads the pages only when the
        estimate since the last reading of them says they may)."""
        if self.disk_cap is not None:
            free = self._disk_free()
            if free > (1 << 20) + 2 * self.reserve_bytes:  # space came back: the reserve, the budget
                self.keep_reserve()
                self.disk_cap = None
                self.configure(db, wal_bytes=min(self.wal_bytes, free // 4))
        if not self.budget_bytes:
            return False
        self._unmeasured += incoming
        if self._last_used + ROW_BYTES * self._unmeasured < self.room(incoming, ROW_BYTES):
            return False
        used, since = self.used(db), self._unmeasured - incoming
        if since >= 1000 and since < (1 << 39) and used > self._last_used:  # learn what a row costs
            self.row_bytes = min(max((used - self._last_used) / since, 16.0), float(ROW_BYTES))
        self._last_used, self._unmeasured = used, incoming
        return used + self.row_bytes * incoming >= self.room(incoming)

    def over(self, db: sqlite3.Connection, incoming: int) -> bool:
        """Whether ``incoming`` readings do not fit now (after a reclaim)."""
        return self.used(db) + self.row_bytes * incoming >= self.room(incoming)

    def room(self, incoming: int, row_bytes: float | None = None) -> float:
        """What the database's pages may use with a put of ``incoming`` readings: the limit, less
        what the put's own transaction writes (its new pages, and as many again for what an
        eviction rewrites), which the file and the WAL both hold until the checkpoint; the WAL's
        share stays for what a reader holds back."""
        return self.limit - 2 * (row_bytes or self.row_bytes) * incoming

    def disk_full(self, db: sqlite3.Connection) -> None:
        """The disk filled: move the WAL into the database and keep it small (its frames are what
        needs new disk space), and hold the database at the size it has."""
        self.reserve_path.unlink(missing_ok=True)  # room for the checkpoint, which may grow the file
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.configure(db, wal_bytes=16 * self.page_size)
            used = self.used(db)
        except sqlite3.Error:
            used = self._last_used
        self.disk_cap = max(used - 16 * self.page_size, self.page_size)
        self._unmeasured = 1 << 40

    def _disk_size(self) -> int:
        try:
            st = os.statvfs(self.path.parent if self.path.parent.exists() else ".")
        except OSError:
            return 0
        return st.f_blocks * st.f_frsize

    def _disk_free(self) -> int:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return 0
        return st.f_bavail * st.f_frsize

    def state(self) -> tuple:
        return self.disk_cap, self._last_used, self._unmeasured, self.row_bytes

    def restore(self, state: tuple) -> None:
        self.disk_cap, self._last_used, self._unmeasured, self.row_bytes = state
