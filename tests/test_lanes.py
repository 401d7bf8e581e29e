"""The lanes on their own: cursors, frontiers, claims, live lane, merge, copy and restore."""

from __future__ import annotations

from gateway.lanes import BOTTOM, TOP_METER, Lanes


def rows(*keys):
    return [(ts, m, 1.0) for ts, m in keys]


def test_the_cursor_moves_only_over_acknowledged_claims_at_the_head():
    lanes = Lanes()
    a = lanes.take(lanes.backlog, rows((1, 1), (2, 1)))
    b = lanes.take(lanes.backlog, rows((3, 1), (4, 1)))
    assert lanes.backlog.frontier == (4, 1) and lanes.backlog.cursor == BOTTOM
    b.done = True
    assert lanes.advance(lanes.backlog) is None  # b waits for a
    a.done = True
    assert lanes.advance(lanes.backlog) == [a, b] and lanes.backlog.cursor == (4, 1)


def test_release_hands_everything_out_again_and_forgets_the_claims():
    lanes = Lanes()
    c = lanes.take(lanes.backlog, rows((1, 1)))
    r = lanes.take_resend(rows((0, 2)))
    lanes.release()
    assert lanes.backlog.frontier == BOTTOM and not lanes.owns(c) and not lanes.owns(r)


def test_live_is_judged_by_the_wall_clock():
    assert Lanes.live_floor(now_ms=1_000_000, window_ms=300_000) == (700_000, TOP_METER)


def test_a_live_lane_opens_above_its_floor_and_merges_into_the_backlog():
    lanes = Lanes()
    assert lanes.open_live((100, TOP_METER))
    assert lanes.lane_of((101, 1)) is lanes.live and lanes.lane_of((100, 5)) is lanes.backlog
    assert lanes.ceiling(lanes.backlog) == (100, TOP_METER) and lanes.ceiling(lanes.live) is None
    live = lanes.take(lanes.live, rows((150, 1)))
    live.done = True
    lanes.advance(lanes.live)
    assert lanes.persisted() == ([0, 0], [[100, TOP_METER], [150, 1]], [])
    lanes.merge()
    assert lanes.live is None and lanes.backlog.cursor == (150, 1)
    assert not lanes.open_live((120, TOP_METER))  # the backlog has passed it


def test_a_late_key_is_at_or_below_its_lanes_frontier():
    lanes = Lanes()
    lanes.take(lanes.backlog, rows((10, 1)))
    assert lanes.is_late((5, 1)) and lanes.is_late((10, 1)) and not lanes.is_late((11, 1))


def test_restore_undoes_an_eviction_and_a_claim():
    lanes = Lanes()
    lanes.take(lanes.backlog, rows((1, 1)))
    saved = lanes.copy()
    lanes.settle_range(lanes.backlog, (50, 3))
    lanes.open_live((60, TOP_METER))
    lanes.restore(saved)
    assert lanes.backlog.frontier == (1, 1) and lanes.backlog.cursor == BOTTOM
    assert len(lanes.backlog.inflight) == 1 and lanes.live is None and lanes.opened == []
    assert lanes.next_id == saved.next_id
