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

    __slots__ = ("id", "lane", "rows", "lo", "hi", "done", "resend", "evicted", "hole", "n")

    def __init__(self, id: int, lane: str, rows: list[tuple], resend: bool = False, evicted: bool = False):
        self.id = id
        self.lane = lane
        self.rows = rows
        self.lo: Key = (rows[0][0], rows[0][1]) if rows else BOTTOM
        self.hi: Key = (rows[-1][0], rows[-1][1]) if rows else BOTTOM
        self.done = False
        self.resend = resend
        self.evicted = evicted  # a range the budget evicted: settled, never delivered
        self.hole = False  # acknowledged ahead of a claim that was handed back: keys below it wait
        self.n = len(rows)

    def __len__(self) -> int:
        return self.n

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

    def __init__(self, cursor: Key = BOTTOM, live: tuple[Key, Key] | None = None, holes: list | None = None):
        cursor = tuple(cursor)
        self.backlog = Lane("backlog", cursor, cursor)
        self.floor: Key | None = tuple(live[0]) if live else None
        self.live: Lane | None = Lane("live", tuple(live[1]), tuple(live[1])) if live else None
        self.next_id = 1
        for name, lo, hi, n in holes or ():  # acknowledged ahead of a claim that a crash lost
            lane = self.live if name == "live" and self.live is not None else self.backlog
            c = self._new_claim(lane.name, [tuple(lo), tuple(hi)])
            c.n, c.done, c.hole = n, True, True
            lane.inflight.append(c)
        self.resend_frontier: Key = BOTTOM
        self.resend_inflight: set[Key] = set()
        self.opened: list[Key] = []  # every floor opened by this process, in order
        self._flags: list = []  # in a copy: the claims' flags when it was taken

    def copy(self) -> "Lanes":
        new = Lanes.__new__(Lanes)
        new.__dict__.update(self.__dict__)
        new.backlog = self.backlog.copy()
        new.live = self.live.copy() if self.live is not None else None
        new.resend_inflight = set(self.resend_inflight)
        new.opened = list(self.opened)
        new._flags = [(c, c.done, c.hole) for lane in (self.backlog, self.live) if lane is not None
                      for c in lane.inflight]
        return new

    def restore(self, saved: "Lanes") -> None:
        """Become ``saved`` again (a copy taken before a transaction that rolled back)."""
        for c, done, hole in saved._flags:
            c.done, c.hole = done, hole
        self.__dict__.update(saved.copy().__dict__)

    # ------------------------------------------------------------------ where keys belong

    def lane_of(self, key: Key) -> Lane:
        return self.live if self.floor is not None and key > self.floor else self.backlog

    def frontier_for(self, key: Key) -> Key:
        return self.lane_of(key).frontier

    @property
    def top_frontier(self) -> Key:
        """The highest key claimed or acknowledged in any lane (holes included)."""
        top = self.live.frontier if self.live is not None else self.backlog.frontier
        for lane in (self.backlog, self.live):
            if lane is not None:
                for c in lane.inflight:
                    if c.hole and c.hi > top:
                        top = c.hi
        return top

    def ceiling(self, lane: Lane) -> Key | None:
        """The highest key ``lane`` may walk to (the floor for the backlog under a live lane)."""
        return self.floor if lane is self.backlog and self.live is not None else None

    def is_late(self, key: Key) -> bool:
        """Whether a new reading at ``key`` falls where its lane has already claimed (below its
        frontier, or inside a hole the lane will step over)."""
        lane = self.lane_of(key)
        if key <= lane.frontier:
            return True
        return any(c.hole and c.lo <= key <= c.hi for c in lane.inflight)

    # ------------------------------------------------------------------ claims

    def _new_claim(self, lane: str, rows: list[tuple], resend: bool = False, evicted: bool = False) -> Claim:
        c = Claim(self.next_id, lane, rows, resend, evicted)
        self.next_id += 1
        return c

    def upper(self, lane: Lane) -> Key | None:
        """The highest key the next claim or eviction of ``lane`` may reach: its ceiling, or just
        below the next hole (readings acknowledged already: never sent or evicted again)."""
        ceiling = self.ceiling(lane)
        hole = self.next_hole(lane)
        if hole is None:
            return ceiling
        below = (hole.lo[0], hole.lo[1] - 1)  # meter ids are integers
        return below if ceiling is None or below < ceiling else ceiling

    def next_hole(self, lane: Lane) -> Claim | None:
        for c in lane.inflight:
            if c.hole:
                return c
        return None

    def pass_hole(self, lane: Lane) -> list[Claim] | None:
        """Everything below the next hole is claimed: step the frontier over it; returns what
        :meth:`advance` returns, or None when there is no hole."""
        hole = self.next_hole(lane)
        if hole is None:
            return None
        hole.hole = False
        if hole.hi > lane.frontier:
            lane.frontier = hole.hi
        return self.advance(lane) or []

    def _insert(self, lane: Lane, c: Claim) -> None:
        """Into ``lane.inflight`` in key order: before the holes above it."""
        i = len(lane.inflight)
        while i > 0 and lane.inflight[i - 1].hole and lane.inflight[i - 1].lo > c.lo:
            i -= 1
        lane.inflight.insert(i, c)

    def take(self, lane: Lane, rows: list[tuple]) -> Claim:
        """Record a claim of ``rows`` (in key order, above ``lane``'s frontier)."""
        c = self._new_claim(lane.name, rows)
        lane.frontier = c.hi
        self._insert(lane, c)
        return c

    def take_resend(self, rows: list[tuple]) -> Claim:
        c = self._new_claim("resend", rows, resend=True)
        self.resend_frontier = c.hi
        self.resend_inflight.update((r[0], r[1]) for r in rows)
        return c

    def settle_range(self, lane: Lane, hi: Key) -> list[Claim] | None:
        """Count everything above ``lane``'s frontier up to ``hi`` as settled (evicted): the cursor
        moves over it as over an acknowledged claim. Returns what :meth:`advance` returns."""
        settled = self._new_claim(lane.name, [(hi[0], hi[1], 0.0)], evicted=True)
        settled.done = True
        lane.frontier = settled.hi
        self._insert(lane, settled)
        return self.advance(lane)

    def lane_for_ack(self, claim: Claim) -> Lane:
        lane = self.live if claim.lane == "live" else self.backlog
        if lane is None or claim not in lane.inflight:
            return self.backlog  # the lanes merged while it was in flight
        return lane

    def advance(self, lane: Lane) -> list[Claim] | None:
        """Move ``lane``'s cursor over the acknowledged claims at its head; the claims it passed, or
        None when it did not move. Only then is a claim delivered for good: one acknowledged ahead
        of an earlier one is handed out again by :meth:`release` if the earlier one fails."""
        passed: list[Claim] = []
        while lane.inflight and lane.inflight[0].done and not lane.inflight[0].hole:
            c = lane.inflight.popleft()
            passed.append(c)
            if c.hi > lane.cursor:
                lane.cursor = c.hi
        return passed or None

    def owns(self, claim: Claim) -> bool:
        """Whether ``claim`` is still in flight (not released since it was handed out)."""
        if claim.resend:  # its keys are in flight together, or were released together
            return bool(claim.rows) and claim.lo in self.resend_inflight
        return any(claim in lane.inflight for lane in (self.backlog, self.live) if lane is not None)

    def release(self) -> None:
        """Forget every claim in flight: they are handed out again from the cursors. A claim
        acknowledged ahead of one handed back stays, as a hole the next claims go around."""
        for lane in (self.backlog, self.live):
            if lane is not None:
                held = [c for c in lane.inflight if c.done]
                for c in held:
                    c.hole = True
                lane.inflight = deque(held)
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
        if self.live is not None or floor <= self.top_frontier:  # holes included: they stay the backlog's
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

    def persisted(self) -> tuple[list, list | None, list]:
        """What the buffer stores: the backlog cursor, [floor, live cursor] or None, and the claims
        acknowledged ahead of the cursors ([lane, lo, hi, readings]), which a restart keeps."""
        live = [list(self.floor), list(self.live.cursor)] if self.live is not None else None
        holes = [[lane.name, list(c.lo), list(c.hi), c.n] for lane in (self.backlog, self.live)
                 if lane is not None for c in lane.inflight if c.done and not c.evicted]
        return list(self.backlog.cursor), live, holes
