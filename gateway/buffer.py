"""The durable buffer: every reading lives in SQLite until the cloud has acknowledged it.

Contract: :meth:`Buffer.put` / :meth:`Buffer.claim` a batch / :meth:`Buffer.ack`.

- ``put`` validates, stores, quarantines the bad ones, and commits the source's position in
  the same transaction. When it returns, the readings are on disk (``synchronous=FULL`` by
  default): nothing sits only in RAM after a source has been told "stored".
- ``claim`` hands out the next batch of unacknowledged readings. Claims live in memory only;
  after a crash everything unacknowledged is simply claimed again (duplicates are limited to
  what was in flight, and every reading carries its (meter, ts) key for the cloud to dedupe).
- ``ack`` marks a claim delivered. Nothing is removed before it is acknowledged.

Storage
    ``readings(ts, meter, value, source) PRIMARY KEY(ts, meter) WITHOUT ROWID``: a time-first
    key, so inserts append to the right edge of one B-tree (a meter-first key scatters them and
    was measured at ~4.5 KB written per reading). The same key rejects a (meter, ts) that
    arrives twice with a different value.

Sending by cursor
    Acknowledging does not delete. Each lane keeps a cursor: every reading at or below it is
    acknowledged. Space is reclaimed by periodic range deletes below the cursor
    (:meth:`Buffer.reclaim`), one statement for thousands of readings.

Live first
    A reading is live when it is less than ``live_window_ms`` older than the clock. When the
    newest reading is live and the oldest unsent one is more than ``live_window_ms`` behind it
    (an outage left a backlog), the buffer opens a *live lane* above a floor key: readings
    inside the window are claimed there first, and the *backlog lane* drains what lies below
    the floor in time order. When the backlog reaches the floor the lanes merge. A backfill of
    old data has nothing live, so it goes in time order.

Late readings
    A reading whose key falls below a lane's claim frontier (another source's older data, a
    meter's late report) is stored and also listed in ``resend``; it is claimed ahead of the
    backlog and exempt from reclaim until acknowledged.

Budget
    ``budget_bytes`` caps the database's used pages. When full, acknowledged rows are reclaimed
    first; then the policy applies: ``drop_oldest`` evicts the oldest unsent readings,
    ``reject_newest`` refuses the incoming ones. Both are counted in ``stats``.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

from gateway.errors import BufferCorrupt, BufferError, SchemaError
from gateway.lock import BufferLock
from gateway.readings import MAX_FUTURE_MS, MIN_TS_MS, Reading, Rejected, check

Key = tuple[int, int]  # (ts, meter id)
_KEY, _TS, _VALUE, _SOURCE = itemgetter(0, 1, 2), itemgetter(3), itemgetter(4), itemgetter(5)
_INT, _NUMBER = {int}, {int, float}
BOTTOM: Key = (0, 0)

POLICIES = ("drop_oldest", "reject_newest")

# Recorded, ordered migrations. Append only; never edit one that has shipped.
MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "initial schema",
        """
        CREATE TABLE meters(
            id INTEGER PRIMARY KEY,
            site TEXT NOT NULL, building TEXT NOT NULL, meter TEXT NOT NULL,
            UNIQUE(site, building, meter)
        );
        CREATE TABLE sources(
            id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, position TEXT
        );
        CREATE TABLE readings(
            ts INTEGER NOT NULL, meter INTEGER NOT NULL, value REAL NOT NULL, source INTEGER NOT NULL,
            PRIMARY KEY(ts, meter)
        ) WITHOUT ROWID;
        CREATE TABLE resend(
            ts INTEGER NOT NULL, meter INTEGER NOT NULL, PRIMARY KEY(ts, meter)
        ) WITHOUT ROWID;
        CREATE TABLE quarantine(
            id INTEGER PRIMARY KEY,
            at INTEGER NOT NULL,
            kind TEXT NOT NULL,          -- 'reading' or 'message'
            reason TEXT NOT NULL,
            raw TEXT NOT NULL,
            source TEXT NOT NULL,
            location TEXT NOT NULL       -- file:line, source@ts, or the topic
        );
        CREATE TABLE state(key TEXT PRIMARY KEY, value) WITHOUT ROWID;
        """,
    ),
    (
        2,
        "scoring: what each meter has learned up to, and the scorer's status",
        """
        CREATE TABLE IF NOT EXISTS meter_learned(
            meter_key TEXT PRIMARY KEY, last_ts INTEGER NOT NULL
        ) WITHOUT ROWID;
        CREATE TABLE IF NOT EXISTS scoring_status(key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID;
        """,
    ),
]

# Counters, saved with each ack and at least once a second with puts (a crash may lose the last
# second of counts; the readings themselves are never at stake).
STAT_KEYS = (
    "received",          # readings offered to put()
    "stored",            # new readings written
    "duplicates",        # same (meter, ts) and same value: already stored, ignored
    "quarantined",       # readings quarantined (invalid, conflicting duplicate)
    "evicted_oldest",    # unsent readings dropped by the drop_oldest policy
    "rejected_newest",   # incoming readings refused by the reject_newest policy
    "delivered",         # readings acknowledged by the cloud
    "undeliverable",     # messages quarantined by the forwarder
)


class Claim:
    """A batch handed out by :meth:`Buffer.claim`: ``rows`` are (ts, meter id, value)."""

    __slots__ = ("id", "lane", "rows", "lo", "hi", "done", "resend")

    def __init__(self, id: int, lane: str, rows: list[tuple[int, int, float]], resend: bool = False):
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


class PutResult(NamedTuple):
    stored: int
    duplicates: int
    quarantined: int
    evicted: int
    refused: int


class MeterInfo(NamedTuple):
    site: str
    building: str
    meter: str

    @property
    def key(self) -> str:
        return f"{self.building}:{self.meter}"


@dataclass
class _Lane:
    name: str
    cursor: Key                 # everything <= cursor in this lane is acknowledged
    frontier: Key               # everything <= frontier in this lane is claimed or acknowledged
    inflight: deque = field(default_factory=deque)


def _after(key: Key, t: str = "") -> tuple[str, tuple]:
    """SQL for ``(ts, meter) > key`` that uses the primary key (``t``: a table alias and dot)."""
    return f"{t}ts >= ? AND ({t}ts > ? OR {t}meter > ?)", (key[0], key[0], key[1])


def _upto(key: Key, t: str = "") -> tuple[str, tuple]:
    """SQL for ``(ts, meter) <= key`` that uses the primary key (``t``: a table alias and dot)."""
    return f"{t}ts <= ? AND ({t}ts < ? OR {t}meter <= ?)", (key[0], key[0], key[1])


class Buffer:
    """The SQLite buffer. Thread-safe: one lock serialises the connection."""

    def __init__(
        self,
        path: str | Path,
        *,
        budget_bytes: int = 1 << 30,
        policy: str = "drop_oldest",
        live_window_ms: int = 5 * 60 * 1000,
        synchronous: str = "full",
        reclaim_every: int = 50_000,
        clock: Callable[[], float] = time.time,
        readonly: bool = False,
    ):
        if policy not in POLICIES:
            raise BufferError(f"policy: {policy!r} is not one of {', '.join(POLICIES)}")
        if synchronous not in ("full", "normal"):
            raise BufferError(f"synchronous: {synchronous!r} is not one of full, normal")
        self.path = Path(path)
        self.budget_bytes = budget_bytes
        self.policy = policy
        self.live_window_ms = live_window_ms
        self.synchronous = synchronous.upper()
        self.reclaim_every = reclaim_every
        self.clock = clock
        self._lock = threading.RLock()
        self._listeners: list[Callable[[], None]] = []
        self.readonly = readonly
        self._held: BufferLock | None = None  # the lock file, for a writable buffer only
        try:
            if readonly:  # for `gateway status` beside a running gateway: changes nothing
                if not self.path.exists():
                    raise BufferError(f"{self.path}: no buffer here (has the gateway run with this buffer path?)")
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None,
                                          check_same_thread=False)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._held = BufferLock(self.path)  # before any write: a second gateway stops here
                self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute(f"PRAGMA synchronous={self.synchronous}")
            self.db.execute("PRAGMA busy_timeout=5000")
            if not readonly:
                self._migrate()
            self._load()
        except sqlite3.Error as exc:
            self._unlock()
            raise BufferError(f"{self.path}: cannot open the buffer: {exc}") from exc
        except BaseException:
            self._unlock()
            raise

    # ------------------------------------------------------------------ set-up

    def _migrate(self) -> None:
        db = self.db
        db.execute(
            "CREATE TABLE IF NOT EXISTS migrations(version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " applied_at INTEGER NOT NULL)"
        )
        done = {v for (v,) in db.execute("SELECT version FROM migrations")}
        known = {v for v, _, _ in MIGRATIONS}
        if done - known:
            raise SchemaError(
                f"{self.path}: schema version {max(done)} is newer than this gateway knows "
                f"({max(known)}); upgrade the gateway or point it at another buffer file"
            )
        for version, name, sql in MIGRATIONS:
            if version in done:
                continue
            db.execute("BEGIN IMMEDIATE")
            try:
                for stmt in sql.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute(
                    "INSERT INTO migrations VALUES(?, ?, ?)", (version, name, int(self.clock() * 1000))
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        return self.db.execute("SELECT max(version) FROM migrations").fetchone()[0]

    def _state(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        if not row:
            return default
        try:
            return json.loads(row[0])
        except (TypeError, ValueError) as exc:  # a damaged value: say so, not a JSONDecodeError traceback
            raise BufferCorrupt(
                f"{self.path}: the buffer file is damaged (state {key!r} is not JSON: {exc}); stop the gateway "
                f"and run `gateway buffer recover {self.path} NEW_FILE` to salvage its readings"
            ) from exc

    def _set_state(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO state VALUES(?, ?)", (key, json.dumps(value)))

    def _load(self) -> None:
        db = self.db
        self.meters: dict[int, MeterInfo] = {}
        self._meter_ids: dict[tuple[str, str, str], int] = {}
        for mid, site, building, meter in db.execute("SELECT id, site, building, meter FROM meters"):
            self.meters[mid] = MeterInfo(site, building, meter)
            self._meter_ids[(site, building, meter)] = mid
        self._source_ids = {name: sid for sid, name in db.execute("SELECT id, name FROM sources")}
        self.stats: dict[str, int] = {k: 0 for k in STAT_KEYS}
        self.stats.update(self._state("stats", {}))
        cursor = tuple(self._state("cursor", BOTTOM))
        self.backlog = _Lane("backlog", cursor, cursor)
        live = self._state("live")  # [floor, cursor] or None
        self.live_floor: Key | None = tuple(live[0]) if live else None
        self.live = _Lane("live", tuple(live[1]), tuple(live[1])) if live else None
        self._next_claim_id = 1
        self._since_reclaim = 0
        self._stats_saved_at = 0
        self._last_used, self._unmeasured = 0, 1 << 40  # measure on the first put
        self.live_floors: list[Key] = []  # every live lane opened by this process, in order
        self._rate = _Rate()
        self._delivery_rate = _Rate()
        if self.readonly:
            self._resend_count = db.execute("SELECT count(*) FROM resend").fetchone()[0]
            self._resend_frontier, self._resend_inflight, self._newest_ts = BOTTOM, set(), 0
            return
        # Resend entries that a lane will walk again anyway are dropped (they would go twice).
        self.db.execute("BEGIN IMMEDIATE")
        sql, args = _upto(self.backlog.cursor)
        keep = f"({sql})"
        if self.live_floor is not None:
            lsql, largs = _after(self.live_floor)
            usql, uargs = _upto(self.live.cursor)
            keep += f" OR (({lsql}) AND ({usql}))"
            args = args + largs + uargs
        db.execute(f"DELETE FROM resend WHERE NOT ({keep})", args)
        self.db.execute("COMMIT")
        self._resend_count = db.execute("SELECT count(*) FROM resend").fetchone()[0]
        self._resend_frontier: Key = BOTTOM
        self._resend_inflight: set[Key] = set()
        newest = db.execute("SELECT ts, meter FROM readings ORDER BY ts DESC, meter DESC LIMIT 1").fetchone()
        self._newest_ts: int = newest[0] if newest else 0

    def add_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` (without arguments, from the putting thread) after every put that stored."""
        self._listeners.append(fn)

    # ------------------------------------------------------------------ put

    def put(
        self,
        readings: Iterable[Reading],
        rejected: Iterable[Rejected] = (),
        *,
        source: str | None = None,
        position: Any = None,
    ) -> PutResult:
        """Store ``readings``, quarantine ``rejected`` and the invalid readings, and commit
        ``source``'s ``position``: all in one transaction."""
        readings = list(readings)
        now_ms = int(self.clock() * 1000)
        quarantine: list[tuple] = [
            (now_ms, "reading", r.reason, r.raw, r.source, r.where) for r in rejected
        ]
        rows: list[tuple[int, int, float, int]] = []
        max_ts = now_ms + MAX_FUTURE_MS
        with self._lock:
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                meter_ids = self._meter_ids
                fast = self._fast_rows(readings, max_ts)
                if fast is not None:
                    rows, lo_ts, hi_ts = fast
                    readings_left = ()
                else:
                    readings_left = readings
                get_meter, append, inf, lo_ts = meter_ids.get, rows.append, math.inf, MIN_TS_MS
                last_src, last_sid = None, 0  # a batch nearly always comes from one source
                for r in readings_left:  # one reading at a time: new meters, invalid readings
                    site, building, meter, ts, value, src = r
                    mid = get_meter((site, building, meter))
                    # The fast path: a known meter with a plausible, finite, non-negative value.
                    if (
                        mid is not None
                        and type(ts) is int
                        and lo_ts <= ts <= max_ts
                        and (type(value) is float or type(value) is int)
                        and 0 <= value < inf
                    ):
                        if src is not last_src:
                            last_src, last_sid = src, self._source_id(src)
                        append((ts, mid, value, last_sid))
                        continue
                    reason = check(r, now_ms)
                    if reason is None:  # a valid reading of a meter seen for the first time
                        mid = self._meter_id(site, building, meter)
                        sid = self._source_id(src)
                        rows.append((ts, mid, value, sid))
                    else:
                        quarantine.append((now_ms, "reading", reason, repr(tuple(r)), str(src), f"{src}@{ts}"))

                if fast is None and rows:
                    lo_ts, hi_ts = min(r[0] for r in rows), max(r[0] for r in rows)
                evicted = refused = 0
                if rows and self.budget_bytes and self._near_budget(len(rows)):
                    evicted, refused, rows = self._make_room(rows)

                before = db.total_changes
                db.executemany("INSERT INTO readings VALUES(?, ?, ?, ?) ON CONFLICT DO NOTHING", rows)
                stored = db.total_changes - before
                duplicates = 0
                if stored < len(rows):
                    conflicts = self._conflicts(rows)
                    duplicates = len(rows) - stored - len(conflicts)
                    for ts, mid, value, stored_value, sid in conflicts:
                        m = self.meters[mid]
                        quarantine.append((
                            now_ms, "reading",
                            f"duplicate (meter, ts) with a different value: stored {stored_value!r}, got {value!r}",
                            repr((m.site, m.building, m.meter, ts, value)), self._source_name(sid), f"{m.key}@{ts}",
                        ))
                if rows:
                    self._note_late(rows, lo_ts)
                    if hi_ts > self._newest_ts:
                        self._newest_ts = hi_ts
                if quarantine:
                    db.executemany(
                        "INSERT INTO quarantine(at, kind, reason, raw, source, location) VALUES(?,?,?,?,?,?)",
                        quarantine,
                    )
                if source is not None:
                    sid = self._source_id(source)
                    db.execute("UPDATE sources SET position = ? WHERE id = ?", (json.dumps(position), sid))
                st = self.stats
                st["received"] += len(readings)
                st["stored"] += stored
                st["duplicates"] += duplicates
                st["quarantined"] += len(quarantine)
                st["evicted_oldest"] += evicted
                st["rejected_newest"] += refused
                self._rate.add(now_ms, stored)
                st["ingest_per_h"] = self._rate.per_hour()
                st["stored_at"] = now_ms
                if now_ms - self._stats_saved_at >= 1000:  # counters are informational: once a second
                    self._set_state("stats", st)
                    self._stats_saved_at = now_ms
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        if stored:
            for fn in self._listeners:
                fn()
        return PutResult(stored, duplicates, len(quarantine), evicted, refused)

    def _fast_rows(self, readings: list[Reading], max_ts: int) -> tuple[list[tuple], int, int] | None:
        """The rows of a batch in which every reading is valid, of a known meter, from one source,
        checked with C-level passes; None when any of that fails (put then goes reading by
        reading, and the same checks give each bad reading its reason)."""
        if not readings:
            return [], 0, 0
        mids = list(map(self._meter_ids.get, map(_KEY, readings)))
        if None in mids:
            return None
        ts = list(map(_TS, readings))
        if set(map(type, ts)) != _INT:
            return None
        lo, hi = min(ts), max(ts)
        if lo < MIN_TS_MS or hi > max_ts:
            return None
        values = list(map(_VALUE, readings))
        if not set(map(type, values)) <= _NUMBER or min(values) < 0 or not math.isfinite(sum(values)):
            return None  # a NaN or an infinity makes the sum non-finite
        sources = set(map(_SOURCE, readings))
        if len(sources) != 1:
            return None
        src = sources.pop()
        sid = self._source_id(src)
        return list(zip(ts, mids, values, repeat(sid))), lo, hi

    def _meter_id(self, site: str, building: str, meter: str) -> int:
        cur = self.db.execute(
            "INSERT INTO meters(site, building, meter) VALUES(?, ?, ?)", (site, building, meter)
        )
        mid = cur.lastrowid
        self.meters[mid] = MeterInfo(site, building, meter)
        self._meter_ids[(site, building, meter)] = mid
        return mid

    def _source_id(self, name: str) -> int:
        """The id of source ``name``, recorded on first sight (inside put's transaction)."""
        sid = self._source_ids.get(name)
        if sid is None:
            sid = self._source_ids[str(name)] = self.db.execute(
                "INSERT INTO sources(name) VALUES(?)", (str(name),)).lastrowid
        return sid

    def _source_name(self, sid: int) -> str:
        for name, i in self._source_ids.items():
            if i == sid:
                return name
        return str(sid)

    def _conflicts(self, rows: list[tuple]) -> list[tuple]:
        """After an insert that skipped rows, list those whose value differs from the stored one.

        Rows this transaction inserted read back their own value, so only a real conflict (the
        same (meter, ts) with another value, stored before or earlier in the batch) differs.
        """
        conflicts = []
        get = self.db.execute
        for ts, mid, value, sid in rows:
            stored = get("SELECT value FROM readings WHERE ts = ? AND meter = ?", (ts, mid)).fetchone()[0]
            if stored != value:
                conflicts.append((ts, mid, value, stored, sid))
        return conflicts

    # ------------------------------------------------------------------ late readings

    def _frontier_for(self, key: Key) -> Key:
        if self.live_floor is not None and key > self.live_floor:
            return self.live.frontier
        return self.backlog.frontier

    def _note_late(self, rows: list[tuple], lo_ts: int) -> None:
        """List in ``resend`` every new row that fell at or below its lane's claim frontier."""
        top_frontier = self.live.frontier if self.live is not None else self.backlog.frontier
        if lo_ts > top_frontier[0]:  # the usual case: everything new is above every frontier
            return
        late = [(ts, mid) for ts, mid, _, _ in rows if (ts, mid) <= self._frontier_for((ts, mid))]
        if late:
            before = self.db.total_changes
            self.db.executemany("INSERT OR IGNORE INTO resend VALUES(?, ?)", late)
            self._resend_count += self.db.total_changes - before

    # ------------------------------------------------------------------ budget

    def _near_budget(self, incoming: int) -> bool:
        """Whether the budget is used, reading the pages only when an estimate says it may be:
        never more than 64 bytes a reading since the last reading of the pages."""
        self._unmeasured += incoming
        if self._last_used + 64 * self._unmeasured < self.budget_bytes:
            return False
        self._last_used, self._unmeasured = self._used_bytes(), 0
        return self._last_used >= self.budget_bytes

    def _used_bytes(self) -> int:
        pages, free, size = self.db.execute(
            "SELECT * FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()"
        ).fetchone()
        return (pages - free) * size

    def _make_room(self, rows: list[tuple]) -> tuple[int, int, list[tuple]]:
        """Apply the budget policy, inside put's transaction, when the budget is used up.

        Returns (evicted, refused, rows to insert)."""
        self._reclaim()  # acknowledged rows go first
        if self._used_bytes() < self.budget_bytes:
            return 0, 0, rows
        if self.policy == "reject_newest":
            return 0, len(rows), []
        # drop_oldest: evict as many unsent, unclaimed readings as are coming in, oldest first:
        # the backlog below the live floor, then the live lane. Claims in flight finish.
        evicted = self._evict(self.backlog, self.live_floor, len(rows))
        if evicted < len(rows) and self.live is not None:
            evicted += self._evict(self.live, None, len(rows) - evicted)
        return evicted, 0, rows

    def _evict(self, lane: _Lane, ceiling: Key | None, n: int) -> int:
        sql, args = _after(lane.frontier)
        if ceiling is not None:
            usql, uargs = _upto(ceiling)
            sql, args = f"{sql} AND {usql}", args + uargs
        last = self.db.execute(
            f"SELECT ts, meter FROM readings WHERE {sql} ORDER BY ts, meter LIMIT 1 OFFSET ?", args + (n - 1,)
        ).fetchone()
        if last is None:  # fewer than n: take what there is
            last = self.db.execute(
                f"SELECT ts, meter FROM readings WHERE {sql} ORDER BY ts DESC, meter DESC LIMIT 1", args
            ).fetchone()
            if last is None:
                return 0
        usql, uargs = _upto(tuple(last))
        before = self.db.total_changes
        self.db.execute(f"DELETE FROM readings WHERE {sql} AND {usql}", args + uargs)
        gone = self.db.total_changes - before
        # The evicted range counts as settled: the cursor moves over it like over an acked claim.
        settled = Claim(self._next_claim_id, lane.name, [(last[0], last[1], 0.0)])
        self._next_claim_id += 1
        settled.done = True
        lane.frontier = settled.hi
        lane.inflight.append(settled)
        self._advance(lane)
        return gone

    # ------------------------------------------------------------------ claim / ack

    def claim(self, limit: int = 1000) -> Claim | None:
        """The next batch of unsent readings, or None when there is nothing to send.

        Order: late readings (``resend``), then the live lane, then the backlog in time order.
        """
        with self._lock:
            if self._resend_count > len(self._resend_inflight):
                c = self._claim_resend(limit)
                if c is not None:
                    return c
            self._maybe_open_live()
            if self.live is not None:
                c = self._claim_lane(self.live, None, limit)
                if c is not None:
                    return c
            c = self._claim_lane(self.backlog, self.live_floor, limit)
            if c is None and self.live is not None:
                self._maybe_merge()
            return c

    def _claim_lane(self, lane: _Lane, ceiling: Key | None, limit: int) -> Claim | None:
        sql, args = _after(lane.frontier)
        if ceiling is not None:
            usql, uargs = _upto(ceiling)
            sql, args = f"{sql} AND {usql}", args + uargs
        rows = self.db.execute(
            f"SELECT ts, meter, value FROM readings WHERE {sql} ORDER BY ts, meter LIMIT ?", args + (limit,)
        ).fetchall()
        if not rows:
            return None
        c = Claim(self._next_claim_id, lane.name, rows)
        self._next_claim_id += 1
        lane.frontier = c.hi
        lane.inflight.append(c)
        return c

    def _claim_resend(self, limit: int) -> Claim | None:
        sql, args = _after(self._resend_frontier, "s.")
        rows = self.db.execute(
            "SELECT r.ts, r.meter, r.value FROM resend s JOIN readings r USING(ts, meter)"
            f" WHERE {sql} ORDER BY s.ts, s.meter LIMIT ?",
            args + (limit,),
        ).fetchall()
        rows = [r for r in rows if (r[0], r[1]) not in self._resend_inflight]
        if not rows:
            self._resend_frontier = BOTTOM
            return None
        c = Claim(self._next_claim_id, "resend", rows, resend=True)
        self._next_claim_id += 1
        self._resend_frontier = c.hi
        self._resend_inflight.update((r[0], r[1]) for r in rows)
        return c

    def _maybe_open_live(self) -> None:
        if self.live is not None or not self._newest_ts:
            return
        if self._newest_ts < self.clock() * 1000 - self.live_window_ms:
            return  # nothing is live by the clock (a backfill of old data): keep time order
        nxt = self.db.execute(
            f"SELECT ts FROM readings WHERE {_after(self.backlog.frontier)[0]} ORDER BY ts, meter LIMIT 1",
            _after(self.backlog.frontier)[1],
        ).fetchone()
        if nxt is None or self._newest_ts - nxt[0] <= self.live_window_ms:
            return
        # The live lane holds every reading newer than the window's start: ts > floor ts.
        floor: Key = (self._newest_ts - self.live_window_ms, 1 << 62)
        if floor <= self.backlog.frontier:
            return
        self.live_floor = floor
        self.live_floors.append(floor)
        self.live = _Lane("live", floor, floor)
        self._persist_lanes()

    def _maybe_merge(self) -> None:
        """Close the live lane once the backlog below its floor is all acknowledged."""
        if self.live is None or self.backlog.inflight:
            return
        rest = self.db.execute(
            f"SELECT 1 FROM readings WHERE {_after(self.backlog.frontier)[0]} AND {_upto(self.live_floor)[0]} LIMIT 1",
            _after(self.backlog.frontier)[1] + _upto(self.live_floor)[1],
        ).fetchone()
        if rest is not None:
            return
        # Everything up to the floor is acknowledged, and the live lane's cursor carries on from it.
        self.backlog = _Lane("backlog", self.live.cursor, self.live.frontier, self.live.inflight)
        self.live = None
        self.live_floor = None
        self._persist_lanes()

    def ack(self, *claims: Claim) -> None:
        """Mark ``claims`` delivered, in one transaction. Cursors advance over acknowledged
        claims in order; a claim acknowledged ahead of an earlier one waits for it."""
        with self._lock:
            self.db.execute("PRAGMA synchronous=NORMAL")  # a lost ack only means a resend
            self.db.execute("BEGIN IMMEDIATE")
            try:
                lanes = set()
                for claim in claims:
                    claim.done = True
                    self.stats["delivered"] += len(claim.rows)
                    if claim.resend:
                        keys = [(r[0], r[1]) for r in claim.rows]
                        before = self.db.total_changes
                        self.db.executemany("DELETE FROM resend WHERE ts = ? AND meter = ?", keys)
                        self._resend_count -= self.db.total_changes - before
                        self._resend_inflight.difference_update(keys)
                        continue
                    lane = self.live if claim.lane == "live" else self.backlog
                    if lane is None or claim not in lane.inflight:
                        lane = self.backlog  # the lanes merged while it was in flight
                    lanes.add(lane.name)
                now_ms = int(self.clock() * 1000)
                self._delivery_rate.add(now_ms, sum(len(c.rows) for c in claims))
                self.stats["delivered_per_h"] = self._delivery_rate.per_hour()
                self.stats["delivered_at"] = now_ms
                for name in lanes:
                    lane = self.live if name == "live" and self.live is not None else self.backlog
                    self._advance(lane)
                if self.live is not None and not self.backlog.inflight:
                    self._maybe_merge()
                self._set_state("stats", self.stats)
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
            finally:
                self.db.execute(f"PRAGMA synchronous={self.synchronous}")

    def _advance(self, lane: _Lane) -> None:
        """Move ``lane``'s cursor over the acknowledged claims at its head (inside a transaction)."""
        moved = False
        while lane.inflight and lane.inflight[0].done:
            c = lane.inflight.popleft()
            self._since_reclaim += len(c.rows)
            if c.hi > lane.cursor:
                lane.cursor = c.hi
            moved = True
        if moved:
            self._persist_lanes()
            if self._since_reclaim >= self.reclaim_every:
                self._reclaim()

    def release_all(self) -> None:
        """Forget every claim in flight: after a publish failure, unacknowledged claims are
        handed out again from the cursors (those acknowledged out of order may go twice)."""
        with self._lock:
            for lane in (self.backlog, self.live):
                if lane is not None:
                    lane.inflight.clear()
                    lane.frontier = lane.cursor
            self._resend_frontier = BOTTOM
            self._resend_inflight.clear()

    def _persist_lanes(self) -> None:
        self._set_state("cursor", list(self.backlog.cursor))
        self._set_state("live", [list(self.live_floor), list(self.live.cursor)] if self.live else None)

    # ------------------------------------------------------------------ reclaim

    def _reclaim(self) -> int:
        """Delete acknowledged rows below the backlog cursor (one range delete)."""
        sql, args = _upto(self.backlog.cursor)
        if self._resend_count:
            sql += " AND NOT EXISTS (SELECT 1 FROM resend s WHERE s.ts = readings.ts AND s.meter = readings.meter)"
        before = self.db.total_changes
        self.db.execute(f"DELETE FROM readings WHERE {sql}", args)
        self._since_reclaim = 0
        return self.db.total_changes - before

    def reclaim(self) -> int:
        """Reclaim space now; returns the number of rows deleted."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            n = self._reclaim()
            self.db.execute("COMMIT")
            return n

    # ------------------------------------------------------------------ reading back

    def position(self, source: str) -> Any:
        row = self.db.execute("SELECT position FROM sources WHERE name = ?", (source,)).fetchone()
        return json.loads(row[0]) if row and row[0] is not None else None

    def pending(self) -> int:
        """Readings stored and not yet acknowledged."""
        with self._lock:
            sql, args = _after(self.backlog.cursor)
            n = self.db.execute(f"SELECT count(*) FROM readings WHERE {sql}", args).fetchone()[0]
            if self.live is not None:
                lsql, largs = _after(self.live_floor)
                usql, uargs = _upto(self.live.cursor)
                n -= self.db.execute(
                    f"SELECT count(*) FROM readings WHERE {lsql} AND {usql}", largs + uargs
                ).fetchone()[0]
            return n + self._resend_count

    def oldest_pending_ts(self) -> int | None:
        with self._lock:
            sql, args = _after(self.backlog.cursor)
            row = self.db.execute(
                f"SELECT ts FROM readings WHERE {sql} ORDER BY ts, meter LIMIT 1", args
            ).fetchone()
            if self._resend_count:
                r2 = self.db.execute("SELECT min(ts) FROM resend").fetchone()
                if r2 and r2[0] is not None and (row is None or r2[0] < row[0]):
                    return r2[0]
            return row[0] if row else None

    def quarantined(self, limit: int = 100, kind: str | None = None) -> list[dict]:
        sql = "SELECT id, at, kind, reason, raw, source, location FROM quarantine"
        args: tuple = ()
        if kind:
            sql += " WHERE kind = ?"
            args = (kind,)
        sql += " ORDER BY id LIMIT ?"
        cols = ("id", "at", "kind", "reason", "raw", "source", "location")
        return [dict(zip(cols, row)) for row in self.db.execute(sql, args + (limit,))]

    def quarantine_message(self, reason: str, payload: bytes, topic: str, readings: int) -> None:
        """Record a message that can never be delivered (the forwarder's dead letters)."""
        with self._lock:
            self.stats["undeliverable"] += 1
            self.db.execute(
                "INSERT INTO quarantine(at, kind, reason, raw, source, location) VALUES(?,?,?,?,?,?)",
                (int(self.clock() * 1000), "message", reason, payload.decode("utf-8", "replace"),
                 f"forwarder ({readings} readings)", topic),
            )

    def status(self) -> dict:
        """Depth, oldest unsent age, rates, evictions and hours of autonomy left."""
        with self._lock:
            used = self._used_bytes()
            pending = self.pending()
            oldest = self.oldest_pending_ts()
            now_ms = int(self.clock() * 1000)
            rate_h = self.stats.get("ingest_per_h") or 0.0
            if now_ms - (self.stats.get("stored_at") or 0) > self._rate.window_ms:
                rate_h = 0.0  # nothing stored for a while: no current rate to project
            stored_rows = self.db.execute("SELECT count(*) FROM readings").fetchone()[0]
            bytes_per_reading = used / stored_rows if stored_rows else 40.0
            free = max(self.budget_bytes - used, 0)
            autonomy = (free / (rate_h * bytes_per_reading)) if rate_h > 0 else None
            return {
                "path": str(self.path),
                "pending": pending,
                "oldest_pending_ts": oldest,
                "oldest_pending_age_s": (now_ms - oldest) / 1000 if oldest else None,
                "used_bytes": used,
                "budget_bytes": self.budget_bytes,
                "policy": self.policy,
                "bytes_per_reading": round(bytes_per_reading, 1),
                "ingest_per_h": rate_h,
                "delivered_per_h": self.stats.get("delivered_per_h") or 0.0,
                "autonomy_hours": autonomy,
                "live_lane": self.live is not None,
                "resend": self._resend_count,
                "quarantine": self.db.execute("SELECT count(*) FROM quarantine").fetchone()[0],
                "health": self._state("health"),
                **{k: self.stats.get(k, 0) for k in STAT_KEYS},
            }

    def save_health(self, health: dict) -> None:
        """Record the gateway's stage health (``gateway status`` shows it beside the buffer's)."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self._set_state("health", health)
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise

    def health(self) -> dict | None:
        """The stage health last recorded by :meth:`save_health`, or None."""
        return self._state("health")

    def close(self) -> None:
        with self._lock:
            try:
                if not self.readonly:
                    self._set_state("stats", self.stats)
                    self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                self.db.close()
                self._unlock()

    def _unlock(self) -> None:
        if self._held is not None:
            self._held.release()


class _Rate:
    """Readings per hour over the last few minutes of puts."""

    def __init__(self, window_ms: int = 10 * 60 * 1000):
        self.window_ms = window_ms
        self.events: deque[tuple[int, int]] = deque()
        self.total = 0

    def add(self, now_ms: int, n: int) -> None:
        self.events.append((now_ms, n))
        self.total += n
        while self.events and self.events[0][0] < now_ms - self.window_ms:
            self.total -= self.events.popleft()[1]

    def per_hour(self) -> float:
        if len(self.events) < 2:
            return 0.0
        span = max(self.events[-1][0] - self.events[0][0], 1000)
        return (self.total - self.events[0][1]) * 3_600_000 / span
