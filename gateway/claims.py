"""Claims: which unsent readings go next, in which order, and when the live lane opens and closes.

Order (the lanes' bookkeeping is :mod:`gateway.lanes`)
    The live lane first (readings newer than ``live_window_ms`` by the wall clock, once an
    outage has left older ones unsent), then late readings (``resend``), then the backlog in time
    order. Without a live lane, live readings at the head of the backlog go ahead of late ones: a
    backfill beside a live source never delays it.

A live lane opens only when readings are live by the clock *and* older ones wait unsent (a
backfill of old data alone keeps time order), and merges back into the backlog once the backlog
below its floor is all acknowledged. Claims live in memory only; opening, merging and stepping
over a hole are persisted inside a transaction (the buffer's ``_atomic``), so the lanes always
describe what the file holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.db import mapped
from gateway.keyrange import after, between
from gateway.lanes import BOTTOM, Claim, Lane
from gateway.scores import columns

if TYPE_CHECKING:
    from gateway.buffer import Buffer

SELECT_ROWS = f"SELECT {columns()} FROM readings"


def next_claim(buf: Buffer, limit: int = 1000) -> Claim | None:
    """The next batch of unsent readings, or None when there is nothing to send.

    Order: the live lane, then late readings (``resend``), then the backlog in time order;
    without a live lane, live readings at the head of the backlog go ahead of late ones.
    Rows are (ts, meter id, value, expected, score, flag, model id); the scores are None for
    a reading stored unscored."""
    with buf._lock, mapped(buf.path):
        lanes = buf.lanes
        _maybe_open_live(buf)
        if lanes.live is not None:
            c = _claim_lane(buf, lanes.live, limit)
            if c is not None:
                return c
        if buf._resend_count > len(lanes.resend_inflight):
            if lanes.live is None and _next_is_live(buf):
                c = _claim_lane(buf, lanes.backlog, limit)  # live readings before a backfill's
                if c is not None:
                    return c
            c = _claim_resend(buf, limit)
            if c is not None:
                return c
        c = _claim_lane(buf, lanes.backlog, limit)
        if c is None and lanes.live is not None:
            maybe_merge(buf)
        return c


def _next_is_live(buf: Buffer) -> bool:
    """Whether the backlog's next unsent reading is live by the wall clock."""
    sql, args = after(buf.lanes.backlog.frontier)
    nxt = buf.db.execute(f"SELECT ts FROM readings WHERE {sql} ORDER BY ts, meter LIMIT 1", args).fetchone()
    return nxt is not None and nxt[0] > int(buf.clock() * 1000) - buf.live_window_ms


def _claim_lane(buf: Buffer, lane: Lane, limit: int) -> Claim | None:
    """The next rows of ``lane``, going around the holes (claims acknowledged ahead of one that
    was handed back: their readings are delivered, and are not sent again)."""
    lanes = buf.lanes
    while True:
        sql, args = between(lane.frontier, lanes.upper(lane))
        rows = buf.db.execute(f"{SELECT_ROWS} WHERE {sql} ORDER BY ts, meter LIMIT ?",
                               args + (limit,)).fetchall()
        c = lanes.take(lane, rows) if rows else None
        if len(rows) == limit or lanes.next_hole(lane) is None:
            return c
        with buf._atomic():  # everything below the hole is claimed: step over it
            buf._moved(lane, lanes.pass_hole(lane))
        if c is not None:
            return c


def _claim_resend(buf: Buffer, limit: int) -> Claim | None:
    lanes = buf.lanes
    sql, args = after(lanes.resend_frontier, "s.")
    rows = buf.db.execute(
        f"SELECT {columns('r.')} FROM resend s JOIN readings r USING(ts, meter)"
        f" WHERE {sql} ORDER BY s.ts, s.meter LIMIT ?",
        args + (limit,),
    ).fetchall()
    rows = [r for r in rows if (r[0], r[1]) not in lanes.resend_inflight]
    if not rows:
        if lanes.resend_frontier == BOTTOM:
            return None
        lanes.resend_frontier = BOTTOM  # late readings may have arrived below where it walked
        return _claim_resend(buf, limit)
    return lanes.take_resend(rows)


def _maybe_open_live(buf: Buffer) -> None:
    """Open a live lane when readings are live by the wall clock and older ones wait unsent."""
    lanes = buf.lanes
    if lanes.live is not None:
        return
    floor = lanes.live_floor(int(buf.clock() * 1000), buf.live_window_ms)
    if floor <= lanes.top_frontier:
        return
    nxt = buf.db.execute(
        f"SELECT ts FROM readings WHERE {after(lanes.backlog.frontier)[0]} ORDER BY ts, meter LIMIT 1",
        after(lanes.backlog.frontier)[1],
    ).fetchone()
    if nxt is None or nxt[0] > floor[0]:
        return  # nothing older than the window waits: time order is live order
    if buf.db.execute("SELECT 1 FROM readings WHERE ts > ? LIMIT 1", (floor[0],)).fetchone() is None:
        return  # nothing is live by the clock (a backfill of old data): keep time order
    with buf._atomic():
        lanes.open_live(floor)
        buf._persist_lanes()


def maybe_merge(buf: Buffer) -> None:
    """Close the live lane once the backlog below its floor is all acknowledged."""
    lanes = buf.lanes
    if lanes.live is None or lanes.backlog.inflight:
        return
    sql, args = between(lanes.backlog.frontier, lanes.floor)
    if buf.db.execute(f"SELECT 1 FROM readings WHERE {sql} LIMIT 1", args).fetchone() is not None:
        return
    with buf._atomic():
        lanes.merge()
        buf._persist_lanes()
