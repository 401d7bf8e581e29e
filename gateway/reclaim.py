"""Reclaim: deleting acknowledged readings, in bounded range deletes below the backlog cursor.

Acknowledging does not delete: each lane keeps a cursor, and space is reclaimed by periodic range
deletes below the backlog cursor, once ``reclaim_every`` readings have been passed (acknowledged
or evicted) since the last reclaim. Readings listed in ``resend`` (late ones not yet delivered)
are kept.

Each delete takes at most :func:`chunk_rows` rows (:data:`RECLAIM_CHUNK`, fewer under a small
budget), in a transaction of its own, so that it needs little WAL: on a full disk a delete of a
whole backlog could never commit, and nothing else could either; and under a budget, one delete's
log must fit in the WAL's share beside what the log already holds. So reclaim never runs inside a
put's transaction: a put near the budget reclaims first, in these transactions of its own, and its
own transaction then writes only what :meth:`gateway.budget.Budget.room` holds back for it. A full
disk stops a reclaim; it is tried again after the next acknowledgement.

A key whose row was reclaimed
    After a reading is acknowledged and reclaimed, the buffer no longer knows its key: the same
    (meter, ts) arriving again is stored as a late reading and sent again, with its new value.
    Within the reclaim horizon it is quarantined as a conflicting duplicate. The cloud keys
    readings by (meter, ts), so it sees both and keeps the first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.errors import DiskFull
from gateway.keyrange import upto

from gateway.budget import ROW_BYTES

if TYPE_CHECKING:
    from gateway.buffer import Buffer

#: Acknowledged rows deleted by one reclaim transaction at most (about 50 pages of WAL).
RECLAIM_CHUNK = 5_000


def chunk_rows(buf: Buffer) -> int:
    """Rows one reclaim transaction deletes: :data:`RECLAIM_CHUNK`, or fewer when the WAL's share
    is small, so that a delete logs at most a quarter of that share (a range delete rewrites the
    leaf pages of the rows it takes, and the interior pages above them)."""
    share = buf.budget.wal_bytes
    return min(RECLAIM_CHUNK, max(256, share // (4 * ROW_BYTES))) if share else RECLAIM_CHUNK


def reclaim_chunk(buf: Buffer) -> int:
    """Delete up to :func:`chunk_rows` of the oldest acknowledged rows, below the backlog cursor
    (one range delete, inside the caller's transaction); returns the rows deleted."""
    limit = chunk_rows(buf)
    top = buf.lanes.backlog.cursor
    # late readings not yet delivered stay; the edge is chosen among the others, so a delete always
    # takes ``limit`` rows (more than ``limit`` such readings at the bottom must not stall it)
    keep = (" AND NOT EXISTS (SELECT 1 FROM resend s WHERE s.ts = readings.ts AND s.meter = readings.meter)"
            if buf._resend_count else "")
    below, below_args = upto(top)
    edge = buf.db.execute(f"SELECT ts, meter FROM readings WHERE {below}{keep} ORDER BY ts, meter LIMIT 1 OFFSET ?",
                          below_args + (limit - 1,)).fetchone()
    done = edge is None  # fewer than limit left: this delete takes them all
    sql, args = upto(top if done else tuple(edge))
    sql += keep
    before = buf.db.total_changes
    buf.db.execute(f"DELETE FROM readings WHERE {sql}", args)
    if done:
        buf._since_reclaim = 0
        buf._reclaim_due = False
    return buf.db.total_changes - before


def reclaim_in_chunks(buf: Buffer, chunks: int = 1 << 30) -> int:
    """Reclaim in bounded transactions of their own, up to ``chunks`` of them; a full disk stops
    it (reclaim is tried again after the next acknowledgement)."""
    n = 0
    for _ in range(chunks):
        try:
            with buf._atomic():
                got = reclaim_chunk(buf)
        except DiskFull:
            return n
        n += got
        if not buf._reclaim_due:
            break
    return n
