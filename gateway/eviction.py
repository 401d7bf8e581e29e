"""Eviction: what the budget policies do when a put finds the buffer's byte budget used up.

Inside put's transaction, before its rows are inserted (:func:`make_room`), once the put has
reclaimed acknowledged rows in transactions of their own (:mod:`gateway.reclaim`): if the budget is
still over, the policy decides (see :mod:`gateway.budget`):

- ``drop_oldest`` evicts as many unsent, unclaimed readings as are coming in, oldest first: the
  backlog below the live floor, then the live lane. Claims in flight finish. Eviction goes around
  the lanes' holes (claims acknowledged ahead of the cursor are delivered, never counted evicted),
  and late readings in an evicted range leave ``resend`` with it. Evictions are counted.
- ``reject_newest`` refuses the batch: a source that can wait gets
  :class:`~gateway.errors.BufferFull` (nothing stored, its position stays); one that cannot has
  the batch refused and counted. A batch more than the budget can ever hold is a configuration
  error, named as one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.errors import BufferError, BufferFull
from gateway.keyrange import between, upto
from gateway.lanes import Key, Lane

if TYPE_CHECKING:
    from gateway.buffer import Buffer


def make_room(buf: Buffer, rows: list[tuple], can_wait: bool) -> tuple[int, int, list[tuple]]:
    """Apply the budget policy, inside put's transaction, when the budget is used up.

    Returns (evicted, refused, rows to insert)."""
    budget = buf.budget
    if not budget.over(buf.db, len(rows)):
        return 0, 0, rows
    if budget.policy == "reject_newest":
        if budget.room(len(rows)) < budget.row_bytes * len(rows):  # not even in an empty buffer
            raise BufferError(
                f"{buf.path}: a batch of {len(rows)} readings is more than a budget of {budget.budget_bytes} "
                f"bytes can ever hold; lower the source's batch_size or raise buffer.budget_mb"
            )
        if can_wait:
            raise BufferFull(
                f"{buf.path}: the buffer's budget of {budget.budget_bytes} bytes is used "
                f"(policy reject_newest): the source waits until the forwarder has made room"
            )
        return 0, len(rows), []
    # drop_oldest: evict as many unsent, unclaimed readings as are coming in, oldest first:
    # the backlog below the live floor, then the live lane. Claims in flight finish.
    lanes = buf.lanes
    evicted = evict(buf, lanes.backlog, len(rows))
    if evicted < len(rows) and lanes.live is not None:
        evicted += evict(buf, lanes.live, len(rows) - evicted)
    return evicted, 0, rows


def evict(buf: Buffer, lane: Lane, n: int) -> int:
    """Evict up to ``n`` of ``lane``'s oldest unclaimed readings, going around the holes
    (readings acknowledged already are never counted evicted)."""
    gone = 0
    while gone < n:
        got = evict_range(buf, lane, buf.lanes.upper(lane), n - gone)
        gone += got
        if gone < n and buf.lanes.next_hole(lane) is not None:
            buf._moved(lane, buf.lanes.pass_hole(lane))  # nothing is left below the hole
            continue
        return gone
    return gone


def evict_range(buf: Buffer, lane: Lane, ceiling: Key | None, n: int) -> int:
    """Evict up to ``n`` of the oldest readings between ``lane``'s frontier and ``ceiling``."""
    db = buf.db
    sql, args = between(lane.frontier, ceiling)
    last = db.execute(
        f"SELECT ts, meter FROM readings WHERE {sql} ORDER BY ts, meter LIMIT 1 OFFSET ?", args + (n - 1,)
    ).fetchone()
    if last is None:  # fewer than n: take what there is
        last = db.execute(
            f"SELECT ts, meter FROM readings WHERE {sql} ORDER BY ts DESC, meter DESC LIMIT 1", args
        ).fetchone()
        if last is None:
            return 0
    usql, uargs = upto(tuple(last))
    before = db.total_changes
    db.execute(f"DELETE FROM readings WHERE {sql} AND {usql}", args + uargs)
    gone = db.total_changes - before
    if buf._resend_count:  # late readings in the range go with it: nothing is left to send
        before = db.total_changes
        db.execute(f"DELETE FROM resend WHERE {sql} AND {usql}", args + uargs)
        buf._resend_count -= db.total_changes - before
    buf._moved(lane, buf.lanes.settle_range(lane, tuple(last)))
    return gone
