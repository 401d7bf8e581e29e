"""The buffer's status: its counters, its depth, its rates and the hours of autonomy left.

What ``gateway status`` and the runner's status show of the buffer. The counters
(:data:`STAT_KEYS`) are saved in the same transaction as the rows they count (put, ack,
quarantine), so a stop on a full disk or a crash loses none. The rates (ingest and delivery per
hour) cover the last ten minutes (:mod:`gateway.rates`); with nothing stored for that long there is
no current rate to project. Autonomy is how long the budget's free bytes last at the ingest rate,
at the bytes a stored reading takes now.

``pending`` counts what is stored and not yet acknowledged: above the backlog cursor (less what a
live lane has acknowledged above its floor, and the claims acknowledged ahead of the cursors),
plus the late readings waiting in ``resend``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.db import mapped
from gateway.keyrange import after, between

if TYPE_CHECKING:
    from gateway.buffer import Buffer

# Counters, saved in the same transaction as the rows they count (put, ack, quarantine).
STAT_KEYS = (
    "received",          # readings offered to put()
    "stored",            # new readings written
    "duplicates",        # same (meter, ts) and same value: already stored, ignored
    "quarantined",       # readings quarantined (invalid, conflicting duplicate)
    "evicted_oldest",    # unsent readings dropped by the drop_oldest policy
    "rejected_newest",   # incoming readings dropped by the reject_newest policy (a source that cannot wait)
    "delivered",         # readings acknowledged by the cloud
    "undeliverable",     # messages quarantined by the forwarder
    "unscored",          # readings stored without scores (no metadata, scoring failed)
    "requeued",          # readings re-queued from the quarantine
    "quarantine_dropped",  # oldest quarantine entries dropped to keep the quarantine in its share
)


def pending(buf: Buffer) -> int:
    """Readings stored and not yet acknowledged."""
    with buf._lock, mapped(buf.path):
        lanes = buf.lanes
        sql, args = after(lanes.backlog.cursor)
        if buf._resend_count:
            sql += " AND NOT EXISTS (SELECT 1 FROM resend s WHERE s.ts = readings.ts AND s.meter = readings.meter)"
        n = buf.db.execute(f"SELECT count(*) FROM readings WHERE {sql}", args).fetchone()[0]
        if lanes.live is not None:
            lsql, largs = between(lanes.floor, lanes.live.cursor)
            if buf._resend_count:
                lsql += (" AND NOT EXISTS (SELECT 1 FROM resend s WHERE s.ts = readings.ts"
                         " AND s.meter = readings.meter)")
            n -= buf.db.execute(f"SELECT count(*) FROM readings WHERE {lsql}", largs).fetchone()[0]
        for lane in (lanes.backlog, lanes.live):  # acknowledged ahead of the cursors
            n -= sum(len(c) for c in lane.inflight if c.done and not c.evicted) if lane is not None else 0
        return n + buf._resend_count


def oldest_pending_ts(buf: Buffer) -> int | None:
    with buf._lock, mapped(buf.path):
        sql, args = after(buf.lanes.backlog.cursor)
        row = buf.db.execute(
            f"SELECT ts FROM readings WHERE {sql} ORDER BY ts, meter LIMIT 1", args
        ).fetchone()
        if buf._resend_count:
            r2 = buf.db.execute("SELECT min(ts) FROM resend").fetchone()
            if r2 and r2[0] is not None and (row is None or r2[0] < row[0]):
                return r2[0]
        return row[0] if row else None


def status(buf: Buffer) -> dict:
    """Depth, oldest unsent age, rates, evictions and hours of autonomy left."""
    with buf._lock, mapped(buf.path):
        used = buf.budget.used(buf.db)
        n_pending = buf.pending()
        oldest = buf.oldest_pending_ts()
        now_ms = int(buf.clock() * 1000)
        stats = buf.stats
        rate_h = stats.get("ingest_per_h") or 0.0
        if now_ms - (stats.get("stored_at") or 0) > buf._rate.window_ms:
            rate_h = 0.0  # nothing stored for a while: no current rate to project
        stored_rows = buf.db.execute("SELECT count(*) FROM readings").fetchone()[0]
        bytes_per_reading = used / stored_rows if stored_rows else 40.0
        free = max(buf.budget.limit - used, 0)
        autonomy = (free / (rate_h * bytes_per_reading)) if rate_h > 0 else None
        return {
            "path": str(buf.path),
            "pending": n_pending,
            "oldest_pending_ts": oldest,
            "oldest_pending_age_s": (now_ms - oldest) / 1000 if oldest else None,
            "used_bytes": used,
            "budget_bytes": buf.budget_bytes,
            "limit_bytes": buf.budget.limit,  # the budget less the WAL's share and the reserve
            "policy": buf.policy,
            "disk_full": buf.budget.disk_cap is not None,
            "bytes_per_reading": round(bytes_per_reading, 1),
            "ingest_per_h": rate_h,
            "delivered_per_h": stats.get("delivered_per_h") or 0.0,
            "autonomy_hours": autonomy,
            "live_lane": buf.lanes.live is not None,
            "resend": buf._resend_count,
            "quarantine": buf.db.execute("SELECT count(*) FROM quarantine").fetchone()[0],
            "health": buf._state("health"),
            **{k: stats.get(k, 0) for k in STAT_KEYS},
        }
