"""The buffer's lanes: which readings are claimed, which are acknowledged, and what goes next.

Pure bookkeeping over keys ``(ts, meter id)``: no SQLite here, so it is tested on its own and
copied whole before a transaction (the buffer restores the copy when the transaction rolls back,
so the lanes always describe what the database holds).

A lane walks the key space in order:

- ``cursor``: every key at or below it in the lane is acknowledged;
- ``frontier``: every key at or below it is claimed or acknowledged;
- ``inflight``: the claims between, oldest first. The cursor moves over the acknowledged claims
  at the head, so a claim acknowledged early waits for the ones before it.

The *backlog* lane starts at the bottom. A *live* lane is opened above a ``floor`` when an outage
left unsent readings older than the live window: it walks the keys above the floor while the
backlog drains what lies below it, and the two merge once the backlog reaches the floor.

Late readings (keys at or below their lane's frontier when they arrive) are tracked by key in the
buffer's ``resend`` table; here only the keys of those in flight are kept.

Order of claims (:meth:`Buffer.claim`): the live lane first, then late readings, then the backlog
in time order. Without a live lane, live readings at the head of the backlog (a live source that
keeps up) still go ahead of late ones: a backfill beside a live source never delays it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

Key = tuple[int, int]  # (ts, meter id)
BOTTOM: Key = (0, 0)
TOP_METER = 1 << 62  # above every meter id: (ts, TOP_METER) is the last key of ts


class Claim:
    """A batch handed out by the buffer: ``rows`` start with (ts, meter id, value)."""

    __slots__ = ("id", "lane", "rows", "lo", "hi", "done", "resend")

    def __init__(self, id: int, lane: str, rows: list[tuple], resend: bool = False):
        self.id = id
        self.lane = lane
        self.rows = rows
        self.lo: Key = (rows[0][0], rows[0][1]) if rows else BOTTOM
        self.hi: Key = (rows[-1][0], rows[-1][1]) if rows else BOTTOM
        self.done = False
        self.resend = resend

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"Claim(id={self.id}, lane={self.lane!r}, n={len(self.rows)}, lo={self.lo}, hi={self.hi})"


@dataclass
class Lane:
    name: str
    cursor: Key  # everything <= cursor in this lane is acknowledged
    frontier: Key  # everything <= frontier in this lane is claimed or acknowledged
    inflight: deque = field(default_factory=deque)

    def copy(self) -> "Lane":
        return Lane(self.name, self.cursor, self.frontier, deque(self.inflight))


class Lanes:
    """The backlog lane, the live lane (or None) above ``floor``, and the late readings in flight."""

    def __init__(self, cursor: Key = BOTTOM, live: tuple[Key, Key] | None = None):
        cursor = tuple(cursor)
        self.backlog = Lane("backlog", cursor, cursor)
        self.floor: Key | None = tuple(live[0]) if live else None
        self.live: Lane | None = Lane("live", tuple(live[1]), tuple(live[1])) if live else None
        self.next_id = 1
        self.resend_frontier: Key = BOTTOM
        self.resend_inflight: set[Key] = set()
        self.opened: list[Key] = []  # every floor opened by this process, in order

    def copy(self) -> "Lanes":
        new = Lanes.__new__(Lanes)
        new.__dict__.update(self.__dict__)
        new.backlog = self.backlog.copy()
        new.live = self.live.copy() if self.live is not None else None
        new.resend_inflight = set(self.resend_inflight)
        new.opened = list(self.opened)
        return new

    def restore(self, saved: "Lanes") -> None:
        """Become ``saved`` again (a copy taken before a transaction that rolled back)."""
        self.__dict__.update(saved.copy().__dict__)

    # ------------------------------------------------------------------ where keys belong

    def lane_of(self, key: Key) -> Lane:
        return self.live if self.floor is not None and key > self.floor else self.backlog

    def frontier_for(self, key: Key) -> Key:
        return self.lane_of(key).frontier

    @property
    def top_frontier(self) -> Key:
        return self.live.frontier if self.live is not None else self.backlog.frontier

    def ceiling(self, lane: Lane) -> Key | None:
        """The highest key ``lane`` may walk to (the floor for the backlog under a live lane)."""
        return self.floor if lane is self.backlog and self.live is not None else None

    def is_late(self, key: Key) -> bool:
        """Whether a new reading at ``key`` falls where its lane has already claimed."""
        return key <= self.frontier_for(key)

    # ------------------------------------------------------------------ claims

    def _new_claim(self, lane: str, rows: list[tuple], resend: bool = False) -> Claim:
        c = Claim(self.next_id, lane, rows, resend)
        self.next_id += 1
        return c

    def take(self, lane: Lane, rows: list[tuple]) -> Claim:
        """Record a claim of ``rows`` (in key order, above ``lane``'s frontier)."""
        c = self._new_claim(lane.name, rows)
        lane.frontier = c.hi
        lane.inflight.append(c)
        return c

    def take_resend(self, rows: list[tuple]) -> Claim:
        c = self._new_claim("resend", rows, resend=True)
        self.resend_frontier = c.hi
        self.resend_inflight.update((r[0], r[1]) for r in rows)
        return c

    def settle_range(self, lane: Lane, hi: Key) -> int:
        """Count everything above ``lane``'s frontier up to ``hi`` as settled (evicted): the cursor
        moves over it as over an acknowledged claim. Returns the readings the cursor passed."""
        settled = self._new_claim(lane.name, [(hi[0], hi[1], 0.0)])
        settled.done = True
        lane.frontier = settled.hi
        lane.inflight.append(settled)
        return self.advance(lane)

    def lane_for_ack(self, claim: Claim) -> Lane:
        lane = self.live if claim.lane == "live" else self.backlog
        if lane is None or claim not in lane.inflight:
            return self.backlog  # the lanes merged while it was in flight
        return lane

    def advance(self, lane: Lane) -> int:
        """Move ``lane``'s cursor over the acknowledged claims at its head; readings passed, or -1
        when the cursor did not move."""
        passed, moved = 0, False
        while lane.inflight and lane.inflight[0].done:
            c = lane.inflight.popleft()
            passed += len(c.rows)
            if c.hi > lane.cursor:
                lane.cursor = c.hi
            moved = True
        return passed if moved else -1

    def owns(self, claim: Claim) -> bool:
        """Whether ``claim`` is still in flight (not released since it was handed out)."""
        if claim.resend:
            return all((r[0], r[1]) in self.resend_inflight for r in claim.rows[:1])
        return any(claim in lane.inflight for lane in (self.backlog, self.live) if lane is not None)

    def release(self) -> None:
        """Forget every claim in flight: they are handed out again from the cursors."""
        for lane in (self.backlog, self.live):
            if lane is not None:
                lane.inflight.clear()
                lane.frontier = lane.cursor
        self.resend_frontier = BOTTOM
        self.resend_inflight.clear()

    # ------------------------------------------------------------------ opening and merging

    @staticmethod
    def live_floor(now_ms: int, window_ms: int) -> Key:
        """The floor of a live lane opened now: live means recent by the wall clock, so one meter
        whose clock runs ahead cannot move the floor."""
        return (now_ms - window_ms, TOP_METER)

    def open_live(self, floor: Key) -> bool:
        """Open a live lane above ``floor``; False when the backlog has already passed it."""
        if self.live is not None or floor <= self.backlog.frontier:
            return False
        self.floor = floor
        self.live = Lane("live", floor, floor)
        self.opened.append(floor)
        return True

    def merge(self) -> None:
        """Close the live lane: everything up to the floor is acknowledged, and the backlog carries on
        from the live lane's cursor."""
        assert self.live is not None
        self.backlog = Lane("backlog", self.live.cursor, self.live.frontier, self.live.inflight)
        self.live = None
        self.floor = None

    def persisted(self) -> tuple[list, list | None]:
        """What the buffer stores: the backlog cursor, and [floor, live cursor] or None."""
        live = [list(self.floor), list(self.live.cursor)] if self.live is not None else None
        return list(self.backlog.cursor), live
