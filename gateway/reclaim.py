"""Reclaim: deleting acknowledged readings, in bounded range deletes below the backlog cursor.

Acknowledging does not delete: each lane keeps a cursor, and space is reclaimed by periodic range
deletes below the backlog cursor, once ``reclaim_every`` readings have been passed (acknowledged
or evicted) since the last reclaim. Readings listed in ``resend`` (late ones not yet delivered)
are kept.

Each delete takes at most :data:`RECLAIM_CHUNK` rows, in a transaction of its own, so that it
needs little WAL: on a full disk a delete of a whole backlog could never commit, and nothing else
could either. A full disk stops a reclaim; it is tried again after the next acknowledgement.

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

if TYPE_CHECKING:
    from gateway.buffer import Buffer

#: Acknowledged rows deleted by one reclaim transaction (about 50 pages of WAL).
RECLAIM_CHUNK = 5_000


def reclaim_chunk(buf: Buffer, limit: int = RECLAIM_CHUNK) -> int:
    """Delete up to ``limit`` of the oldest acknowledged rows, below the backlog cursor (one range
    delete, inside the caller's transaction); returns the rows deleted."""
    top = buf.lanes.backlog.cursor
    edge = buf.db.execute(
        f"SELECT ts, meter FROM readings WHERE {upto(top)[0]} ORDER BY ts, meter LIMIT 1 OFFSET ?",
        upto(top)[1] + (limit - 1,)).fetchone()
    done = edge is None  # fewer than limit left: this delete takes them all
    sql, args = upto(top if done else tuple(edge))
    if buf._resend_count:
        sql += " AND NOT EXISTS (SELECT 1 FROM resend s WHERE s.ts = readings.ts AND s.meter = readings.meter)"
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
