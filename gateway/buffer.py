"""The durable buffer: every reading lives in SQLite until the cloud has acknowledged it.

Contract: :meth:`Buffer.put` / :meth:`Buffer.claim` a batch / :meth:`Buffer.ack`.

- ``put`` validates, scores (when a scorer is set), stores, quarantines the bad ones, and
  commits the source's position in the same transaction. When it returns, the readings are on
  disk (``synchronous=FULL`` by default): nothing sits only in RAM after a source has been told
  "stored". When it raises, nothing of it was stored, and the buffer's memory is as before it.
- ``claim`` hands out the next batch of unacknowledged readings, each with the scores it was
  given at ingest. Claims live in memory only; after a crash everything unacknowledged is
  claimed again, with the same scores (duplicates are limited to what was in flight, and every
  reading carries its (meter, ts) key for the cloud to dedupe).
- ``ack`` marks a claim delivered. Nothing is removed before it is acknowledged.

The concepts around it have their own files: :mod:`gateway.lanes` (cursors, live lane, order),
:mod:`gateway.claims` (what goes next), :mod:`gateway.budget` (the byte budget and its policies),
:mod:`gateway.eviction` (what the policies do when it is used up), :mod:`gateway.reclaim`,
:mod:`gateway.quarantine`, :mod:`gateway.ids` (meter, source and model ids),
:mod:`gateway.keyrange` (SQL for key ranges), :mod:`gateway.status` (counters, depth, rates,
autonomy), :mod:`gateway.scores` (scoring at ingest), :mod:`gateway.schema` (migrations) and
:mod:`gateway.db` (``atomic()``, sqlite3 error mapping).

Storage
    ``readings(ts, meter, value, source, expected, score, flag, model) PRIMARY KEY(ts, meter)
    WITHOUT ROWID``: a time-first key, so inserts append to the right edge of one B-tree. The
    same key rejects a (meter, ts) that arrives twice with a different value (quarantined).

Scoring at ingest (see :mod:`gateway.scores`)
    With a scorer, each batch is scored inside put and the result is stored beside the reading;
    a scoring failure stores the reading unscored (raw only).

Sending by cursor
    Acknowledging does not delete: each lane keeps a cursor, and space is reclaimed by periodic
    range deletes below the backlog cursor (:mod:`gateway.reclaim`, which also says what becomes
    of a key whose row was reclaimed).

Order (see :mod:`gateway.claims` and :mod:`gateway.lanes`)
    The live lane first, then late readings, then the backlog in time order.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from contextlib import contextmanager
from itertools import repeat
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from gateway import quarantine as q
from gateway import status as report
from gateway.budget import POLICIES, Budget
from gateway.claims import maybe_merge, next_claim
from gateway.db import atomic, map_error, mapped
from gateway.errors import BufferCorrupt, BufferError, DiskFull
from gateway.eviction import make_room
from gateway.ids import Ids, MeterInfo
from gateway.keyrange import after, upto
from gateway.lanes import BOTTOM, Claim, Key, Lane, Lanes
from gateway.lock import BufferLock
from gateway.rates import Rate
from gateway.readings import Reading, Rejected, check, check_batch
from gateway.reclaim import reclaim_in_chunks
from gateway.schema import MIGRATIONS, migrate
from gateway.scores import IngestScorer, score
from gateway.status import STAT_KEYS

__all__ = ["Buffer", "Claim", "MIGRATIONS", "POLICIES", "PutResult", "MeterInfo", "STAT_KEYS"]

log = logging.getLogger(__name__)


class PutResult(NamedTuple):
    stored: int
    duplicates: int
    quarantined: int
    evicted: int
    refused: int


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
        scorer: IngestScorer | None = None,
    ):
        if policy not in POLICIES:
            raise BufferError(f"policy: {policy!r} is not one of {', '.join(POLICIES)}")
        if synchronous not in ("full", "normal"):
            raise BufferError(f"synchronous: {synchronous!r} is not one of full, normal")
        self.path = Path(path)
        self.budget = Budget(self.path, budget_bytes, policy)
        self.live_window_ms = live_window_ms
        self.synchronous = synchronous.upper()
        self.reclaim_every = reclaim_every
        self.clock = clock
        self.scorer = scorer
        self._lock = threading.RLock()
        self._listeners: list[Callable[[], None]] = []
        self.readonly = readonly
        self.scoring_error: str | None = None
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
                # Debian's SQLite zeroes every freed page (secure_delete=ON): reclaim then writes
                # each page it frees. FAST zeroes only what costs no extra write.
                self.db.execute("PRAGMA secure_delete=FAST")
                self.budget.configure(self.db)
                self.budget.keep_reserve()
            self.db.execute("PRAGMA busy_timeout=5000")
            if not readonly:
                migrate(self.db, self.path, int(self.clock() * 1000))
            self._load()
        except sqlite3.Error as exc:
            if hasattr(self, "db"):
                self.db.close()
            self._unlock()
            err = map_error(exc, self.path)
            if type(err) is BufferError:
                err = BufferError(f"{self.path}: cannot open the buffer: {exc}")
            raise err from exc
        except BaseException:
            if hasattr(self, "db"):
                self.db.close()
            self._unlock()
            raise

    def _unlock(self) -> None:
        if self._held is not None:
            self._held.release()
            self._held = None

    @property
    def budget_bytes(self) -> int:
        return self.budget.budget_bytes

    @property
    def policy(self) -> str:
        return self.budget.policy

    # The id registry's meters and model versions by id (the forwarder names them in messages).
    @property
    def meters(self) -> dict[int, MeterInfo]:
        return self.ids.meters

    @property
    def models(self) -> dict[int, str]:
        return self.ids.models

    # The lanes, for status and tests.
    @property
    def backlog(self) -> Lane:
        return self.lanes.backlog

    @property
    def live(self) -> Lane | None:
        return self.lanes.live

    @property
    def live_floor(self) -> Key | None:
        return self.lanes.floor

    @property
    def live_floors(self) -> list[Key]:
        return self.lanes.opened

    # ------------------------------------------------------------------ set-up

    @property
    def schema_version(self) -> int:
        return self.db.execute("SELECT max(version) FROM migrations").fetchone()[0]

    def _state(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        if not row:
            return default
        try:
            return json.loads(row[0])
        except (TypeError, ValueError) as exc:
            raise BufferCorrupt(
                f"{self.path}: the buffer's state {key!r} is damaged ({exc}); stop the gateway and run "
                f"`gateway buffer recover {self.path} NEW_FILE` to salvage its readings"
            ) from exc

    def _set_state(self, key: str, value: Any) -> None:
        self.db.execute("INSERT OR REPLACE INTO state VALUES(?, ?)", (key, json.dumps(value)))

    def _load(self) -> None:
        db = self.db
        self.ids = Ids(db)
        self.stats: dict[str, Any] = {k: 0 for k in STAT_KEYS}
        self.stats.update(self._state("stats", {}))
        cursor, live = self._state("cursor", list(BOTTOM)), self._state("live")
        self.lanes = Lanes(tuple(cursor), (tuple(live[0]), tuple(live[1])) if live else None,
                           self._state("holes", []))
        self._since_reclaim = 0
        self._reclaim_due = False
        self._rate = Rate()
        self._delivery_rate = Rate()
        if not self.readonly:
            # Resend entries that a lane will walk again anyway are dropped (they would go twice),
            # and so are those whose reading is gone.
            with atomic(db):
                sql, args = upto(self.lanes.backlog.cursor)
                keep = f"({sql})"
                if self.lanes.live is not None:
                    lsql, largs = after(self.lanes.floor)
                    usql, uargs = upto(self.lanes.live.cursor)
                    keep += f" OR (({lsql}) AND ({usql}))"
                    args = args + largs + uargs
                for lane in (self.lanes.backlog, self.lanes.live):  # the lanes step over their holes
                    for c in lane.inflight if lane is not None else ():
                        hsql, hargs = upto(c.hi)
                        keep += f" OR ((ts > ? OR (ts = ? AND meter >= ?)) AND ({hsql}))"
                        args = args + (c.lo[0], c.lo[0], c.lo[1]) + hargs
                db.execute(f"DELETE FROM resend WHERE NOT ({keep})", args)
                db.execute("DELETE FROM resend WHERE NOT EXISTS (SELECT 1 FROM readings r"
                           " WHERE r.ts = resend.ts AND r.meter = resend.meter)")
        self._resend_count = db.execute("SELECT count(*) FROM resend").fetchone()[0]
        self._quarantine_bytes = q.total_bytes(db)

    def add_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` (without arguments, from the putting thread) after every put that stored."""
        self._listeners.append(fn)

    # ------------------------------------------------------------------ transactions

    def _memory(self) -> tuple:
        """Everything in memory that a transaction may change (the rates too: a put retried on a
        full disk must not count its readings once per try)."""
        rates = [(r, r.events.copy(), r.total) for r in (self._rate, self._delivery_rate)]
        return (self.lanes.copy(), dict(self.stats), self.ids.mark(), self._resend_count,
                (self._since_reclaim, self._reclaim_due),
                self.budget.state(), self._quarantine_bytes, rates)

    def _restore(self, saved: tuple) -> None:
        lanes, stats, ids, resend, since, budget, self._quarantine_bytes, rates = saved
        for rate, events, total in rates:
            rate.events, rate.total = events, total
        self.lanes.restore(lanes)
        self.stats = stats
        self.ids.restore(ids)  # ids handed out inside the transaction
        self._resend_count, (self._since_reclaim, self._reclaim_due) = resend, since
        self.budget.restore(budget)

    @contextmanager
    def _atomic(self) -> Iterator[sqlite3.Connection]:
        """A write transaction whose in-memory effects are undone when it rolls back; sqlite3
        errors leave it as the gateway's errors (:mod:`gateway.db`)."""
        saved = self._memory()
        try:
            with mapped(self.path), atomic(self.db) as db:
                yield db
        except BaseException as exc:
            self._restore(saved)
            if isinstance(exc, DiskFull):
                with mapped(self.path):
                    self.budget.disk_full(self.db)
            raise
        if not self.db.in_transaction:  # committed (a nested block leaves that to the outer one)
            self.budget.hold_wal(self.db)

    # ------------------------------------------------------------------ put

    def put(
        self,
        readings: Iterable[Reading],
        rejected: Iterable[Rejected] = (),
        *,
        source: str | None = None,
        position: Any = None,
        can_wait: bool = True,
    ) -> PutResult:
        """Store ``readings``, quarantine ``rejected`` and the invalid readings, and commit
        ``source``'s ``position``: all in one transaction.

        When the budget is used and the policy is ``reject_newest``, a source that ``can_wait``
        gets :class:`BufferFull` (nothing stored, its position stays: it offers the batch again
        later); one that cannot has the batch refused and counted, and its position moves on."""
        readings = list(readings)
        now_ms = int(self.clock() * 1000)
        quarantine: list[tuple] = [
            (now_ms, "reading", r.reason, r.raw, r.source, r.where) for r in rejected
        ]
        undo: Callable[[], None] | None = None
        saving = False
        with self._lock:
            near = bool(readings) and self.budget.near(self.db, len(readings))
            if near:  # every acknowledged row goes first, so that the put's own log is only its rows
                self._reclaim_due = True
            if self._reclaim_due:  # in transactions of their own (gateway.reclaim)
                reclaim_in_chunks(self, chunks=1 << 30 if near else 20)
            try:
                with self._atomic() as db:
                    rows, lo_ts = self._rows(readings, now_ms, quarantine)
                    evicted = refused = 0
                    if rows and near:
                        evicted, refused, rows = make_room(self, rows, can_wait)
                    if rows and self.scorer is not None:
                        rows, undo = score(self, rows)
                    before = db.total_changes
                    if rows and len(rows[0]) > 4:
                        db.executemany("INSERT INTO readings VALUES(?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                                       rows)
                    else:
                        db.executemany("INSERT INTO readings(ts, meter, value, source) VALUES(?, ?, ?, ?)"
                                       " ON CONFLICT DO NOTHING", rows)
                    stored = db.total_changes - before
                    duplicates, conflicts = 0, set()
                    if stored < len(rows):
                        conflicts = self._quarantine_conflicts(rows, now_ms, quarantine)
                        duplicates = len(rows) - stored - len(conflicts)
                    if rows:
                        self._note_late(rows, lo_ts, conflicts)
                    q.store(self, db, quarantine)
                    if source is not None:
                        db.execute("UPDATE sources SET position = ? WHERE id = ?",
                                   (json.dumps(position), self.ids.source_id(db, source)))
                    self._count(len(readings), stored, duplicates, len(quarantine), evicted, refused, now_ms)
                    saving = self.scorer is not None and self.scorer.save_due()
                    if saving:
                        self.scorer.save(db)
                if saving:
                    self.scorer.saved()  # committed: what changed is on disk
            except BaseException:
                if undo is not None:
                    undo()
                raise
        if stored:
            for fn in self._listeners:
                fn()
        return PutResult(stored, duplicates, len(quarantine), evicted, refused)

    def _rows(self, readings: list[Reading], now_ms: int, quarantine: list) -> tuple[list[tuple], int]:
        """(ts, meter id, value, source id) of the valid readings, and their lowest ts; the invalid
        ones are added to ``quarantine``."""
        fast = self._fast_rows(readings, now_ms)
        if fast is not None:
            return fast
        rows: list[tuple] = []
        for r in readings:  # one reading at a time: new meters, invalid readings
            reason = check(r, now_ms)
            if reason is None:
                site, building, meter, ts, value, src = r
                rows.append((ts, self.ids.meter_id(self.db, site, building, meter), value,
                             self.ids.source_id(self.db, src)))
            else:
                quarantine.append((now_ms, "reading", reason, repr(tuple(r))[:1024], str(r.source),
                                   f"{r.source}@{r.ts!r}"[:256]))
        return rows, min((r[0] for r in rows), default=0)

    def _fast_rows(self, readings: list[Reading], now_ms: int) -> tuple[list[tuple], int] | None:
        """The rows of a batch in which every reading is valid, of a known meter, from one source;
        None when any of that fails (put then goes reading by reading, and the same checks give
        each bad reading its reason)."""
        if not readings:
            return [], 0
        cols = check_batch(readings, now_ms)
        if cols is None:
            return None
        keys, ts, values, src = cols
        mids = list(map(self.ids.meter_ids.get, keys))
        if None in mids:
            return None
        return list(zip(ts, mids, values, repeat(self.ids.source_id(self.db, src)))), min(ts)

    def _quarantine_conflicts(self, rows: list[tuple], now_ms: int, quarantine: list) -> set[Key]:
        """After an insert that skipped rows, quarantine those whose value differs from the stored
        one; returns their keys. Rows this transaction inserted read back their own value, so only a
        real conflict (another value, stored before or earlier in the batch) differs."""
        keys: set[Key] = set()
        get = self.db.execute
        for row in rows:
            ts, mid, value, sid = row[:4]
            stored = get("SELECT value FROM readings WHERE ts = ? AND meter = ?", (ts, mid)).fetchone()[0]
            if stored != value:
                m = self.meters[mid]
                quarantine.append((
                    now_ms, "reading",
                    f"duplicate (meter, ts) with a different value: stored {stored!r}, got {value!r}",
                    repr((m.site, m.building, m.meter, ts, value)), self.ids.source_name(sid), f"{m.key}@{ts}",
                ))
                keys.add((ts, mid))
        return keys

    def _count(self, received: int, stored: int, duplicates: int, quarantined: int, evicted: int,
               refused: int, now_ms: int) -> None:
        st = self.stats
        st["received"] += received
        st["stored"] += stored
        st["duplicates"] += duplicates
        st["quarantined"] += quarantined
        st["evicted_oldest"] += evicted
        st["rejected_newest"] += refused
        self._rate.add(now_ms, stored)
        st["ingest_per_h"] = self._rate.per_hour()
        st["stored_at"] = now_ms
        # The counts commit with the rows they count: a stop on a full disk, a crash, loses none.
        self._set_state("stats", st)

    # ------------------------------------------------------------------ late readings

    def _note_late(self, rows: list[tuple], lo_ts: int, conflicts: set[Key]) -> None:
        """List in ``resend`` every new row that fell at or below its lane's claim frontier (not
        the conflicting duplicates, which were quarantined instead of stored)."""
        if lo_ts > self.lanes.top_frontier[0]:  # the usual case: everything new is above every frontier
            return
        late = [(r[0], r[1]) for r in rows if self.lanes.is_late((r[0], r[1])) and (r[0], r[1]) not in conflicts]
        if late:
            before = self.db.total_changes
            self.db.executemany("INSERT OR IGNORE INTO resend VALUES(?, ?)", late)
            self._resend_count += self.db.total_changes - before

    def _moved(self, lane: Lane, passed: list[Claim] | None) -> None:
        """After ``lane``'s cursor passed the claims ``passed`` (None: it did not move): what it passed
        is delivered, or evicted."""
        if passed is None:
            return
        for c in passed:
            self._since_reclaim += len(c)
            if not c.evicted:
                self.stats["delivered"] += len(c)
        self._persist_lanes()
        if self._since_reclaim >= self.reclaim_every:
            self._reclaim_due = True  # after the transaction, in chunks of its own

    # ------------------------------------------------------------------ claim / ack

    def claim(self, limit: int = 1000) -> Claim | None:
        """The next batch of unsent readings, or None when there is nothing to send
        (:func:`gateway.claims.next_claim`, which says in which order).

        Rows are (ts, meter id, value, expected, score, flag, model id); the scores are None for
        a reading stored unscored."""
        return next_claim(self, limit)

    def ack(self, *claims: Claim) -> None:
        """Mark ``claims`` delivered, in one transaction. Cursors advance over acknowledged
        claims in order; a claim acknowledged ahead of an earlier one waits for it. A claim
        released since it was handed out (:meth:`release_all`) changes nothing: it is sent again."""
        with self._lock:
            claims = tuple(c for c in claims if not c.done and self.lanes.owns(c))
            if not claims:
                return
            self.db.execute("PRAGMA synchronous=NORMAL")  # a lost ack only means a resend
            try:
                with self._atomic() as db:
                    lanes: dict[str, Lane] = {}
                    for claim in claims:
                        claim.done = True
                        if claim.resend:
                            self.stats["delivered"] += len(claim.rows)
                            keys = [(r[0], r[1]) for r in claim.rows]
                            before = db.total_changes
                            db.executemany("DELETE FROM resend WHERE ts = ? AND meter = ?", keys)
                            self._resend_count -= db.total_changes - before
                            # Delivered: the row goes too, or a lane walking over it again (after a
                            # release) would send it twice, or evict what the cloud already has.
                            db.executemany("DELETE FROM readings WHERE ts = ? AND meter = ?", keys)
                            self.lanes.resend_inflight.difference_update(keys)
                            continue
                        lane = self.lanes.lane_for_ack(claim)
                        lanes[lane.name] = lane
                    now_ms = int(self.clock() * 1000)
                    self._delivery_rate.add(now_ms, sum(len(c.rows) for c in claims))
                    self.stats["delivered_per_h"] = self._delivery_rate.per_hour()
                    self.stats["delivered_at"] = now_ms
                    for lane in lanes.values():
                        self._moved(lane, self.lanes.advance(lane))
                    self._persist_lanes()  # a claim acknowledged ahead of the cursor is kept too
                    if self.lanes.live is not None and not self.lanes.backlog.inflight:
                        maybe_merge(self)
                    self._set_state("stats", self.stats)
            except BaseException:
                for claim in claims:
                    claim.done = False
                raise
            finally:
                self.db.execute(f"PRAGMA synchronous={self.synchronous}")
            if self._reclaim_due:  # committed: reclaim what it passed, in bounded transactions
                reclaim_in_chunks(self, chunks=20)

    def release_all(self) -> None:
        """Forget every claim in flight: after a publish failure, unacknowledged claims are
        handed out again from the cursors (those acknowledged out of order may go twice)."""
        with self._lock:
            self.lanes.release()

    def _persist_lanes(self) -> None:
        cursor, live, holes = self.lanes.persisted()
        self._set_state("cursor", cursor)
        self._set_state("live", live)
        self._set_state("holes", holes)

    # ------------------------------------------------------------------ reclaim

    def reclaim(self) -> int:
        """Reclaim space now; returns the number of rows deleted."""
        with self._lock:
            self._reclaim_due = True
            return reclaim_in_chunks(self)

    # ------------------------------------------------------------------ the quarantine

    def quarantined(self, limit: int = 100, kind: str | None = None) -> list[dict]:
        with self._lock, mapped(self.path):
            return q.listing(self.db, limit, kind)

    def quarantine_message(self, reason: str, payload: bytes, topic: str, readings: int) -> None:
        """Record a message that can never be delivered (the forwarder's dead letters)."""
        q.store_message(self, reason, payload, topic, readings)

    def replay_quarantine(self, ids: Iterable[int] | None = None, kind: str | None = None) -> dict:
        """Re-queue quarantined entries that now pass (:func:`gateway.quarantine.replay`)."""
        return q.replay(self, ids, kind)

    # ------------------------------------------------------------------ reading back

    def position(self, source: str) -> Any:
        with self._lock, mapped(self.path):
            row = self.db.execute("SELECT position FROM sources WHERE name = ?", (source,)).fetchone()
        try:
            return json.loads(row[0]) if row and row[0] is not None else None
        except ValueError as exc:
            raise BufferCorrupt(f"{self.path}: source {source!r} has a damaged position: {exc}") from exc

    def pending(self) -> int:
        """Readings stored and not yet acknowledged."""
        return report.pending(self)

    def oldest_pending_ts(self) -> int | None:
        return report.oldest_pending_ts(self)

    def status(self) -> dict:
        """Depth, oldest unsent age, rates, evictions and hours of autonomy left
        (:mod:`gateway.status`)."""
        return report.status(self)

    def save_health(self, health: dict) -> None:
        """Record the gateway's stage health (``gateway status`` shows it beside the buffer's)."""
        with self._lock, self._atomic():
            self._set_state("health", health)

    def health(self) -> dict | None:
        """The stage health last recorded by :meth:`save_health`, or None."""
        with self._lock, mapped(self.path):
            return self._state("health")

    def close(self) -> None:
        with self._lock:
            try:
                if not self.readonly:
                    try:
                        with self._atomic():
                            self._set_state("stats", self.stats)
                            if self.scorer is not None:
                                self.scorer.save(self.db)
                        if self.scorer is not None:
                            self.scorer.saved()
                        self.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                    except (sqlite3.Error, BufferError) as exc:  # a full disk: what was committed stays
                        log.warning("%s: could not save the last counters at stop: %s", self.path, exc)
            finally:
                self.db.close()
                self._unlock()
