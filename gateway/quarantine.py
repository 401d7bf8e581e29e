"""The quarantine: what could not be stored or delivered, with its reason, raw input and place.

Two kinds live in the buffer's ``quarantine`` table:

- ``reading``: an input that failed the checks (its reason, the raw line or value, ``file:line``);
- ``message``: a message that can never be delivered as it is (a topic IoT Core refuses, a
  payload over 128 KB), with its payload and topic.

The quarantine counts against the buffer's byte budget: it may take an eighth of it. Past that,
its oldest entries are dropped, half its share at a time, and counted (``quarantine_dropped``), so
a flood of bad input can never crowd out the readings.

Nothing here is a dead end. :func:`replay` re-queues what now passes, after its cause is fixed:
a message's readings go back into the buffer to be sent again, and a reading whose raw input
parses as a reading and now passes the checks is stored. What still fails stays, with its
(possibly new) reason.

The functions at the end are the buffer's side (:meth:`Buffer.quarantine_message`,
:meth:`Buffer.replay_quarantine`, and put's quarantined readings): they work inside the buffer's
transactions, so an entry and the counters that count it commit together.
"""

from __future__ import annotations

import ast
import json
import logging
import sqlite3
from typing import TYPE_CHECKING, Any, Iterable, NamedTuple

from gateway.readings import METER_CODE, Reading, check

if TYPE_CHECKING:
    from gateway.buffer import Buffer

log = logging.getLogger("gateway.buffer")  # its warnings are the buffer's, as they were

COLUMNS = ("id", "at", "kind", "reason", "raw", "source", "location")
INSERT = "INSERT INTO quarantine(at, kind, reason, raw, source, location) VALUES(?,?,?,?,?,?)"
REPLAY_SOURCE = "quarantine-replay"


#: What an entry costs beside its text (its id, time, kind and the B-tree's overhead).
ENTRY_OVERHEAD = 32
_SIZE = "sum(length(reason) + length(raw) + length(source) + length(location) + 32)"


def entry_bytes(row: tuple) -> int:
    """The bytes an ``(at, kind, reason, raw, source, location)`` row takes, about."""
    return len(row[2]) + len(row[3]) + len(row[4]) + len(row[5]) + ENTRY_OVERHEAD


def add(db: sqlite3.Connection, rows: list[tuple]) -> int:
    """Insert ``(at, kind, reason, raw, source, location)`` rows (inside the caller's transaction);
    returns the bytes they take."""
    if not rows:
        return 0
    db.executemany(INSERT, rows)
    return sum(map(entry_bytes, rows))


def total_bytes(db: sqlite3.Connection) -> int:
    return db.execute(f"SELECT coalesce({_SIZE}, 0) FROM quarantine").fetchone()[0]


def trim(db: sqlite3.Connection, drop_bytes: int) -> tuple[int, int]:
    """Delete the oldest entries until about ``drop_bytes`` are gone; returns (entries, bytes)."""
    entries = gone = 0
    for qid, size in db.execute(
        "SELECT id, length(reason) + length(raw) + length(source) + length(location) + 32 FROM quarantine ORDER BY id"
    ).fetchall():
        if gone >= drop_bytes:
            break
        entries += 1
        gone += size
        last = qid
    if entries:
        db.execute("DELETE FROM quarantine WHERE id <= ?", (last,))
    return entries, gone


def listing(db: sqlite3.Connection, limit: int = 100, kind: str | None = None) -> list[dict]:
    sql = "SELECT id, at, kind, reason, raw, source, location FROM quarantine"
    args: tuple = ()
    if kind:
        sql += " WHERE kind = ?"
        args = (kind,)
    sql += " ORDER BY id LIMIT ?"
    return [dict(zip(COLUMNS, row)) for row in db.execute(sql, args + (limit,))]


class Parsed(NamedTuple):
    readings: list[Reading]
    problem: str | None  # why the entry cannot be replayed, or None


def parse(entry: dict, now_ms: int) -> Parsed:
    """The readings a quarantine entry stands for, if they now pass the checks."""
    if entry["kind"] == "message":
        return _message_readings(entry["raw"], now_ms)
    raw = entry["raw"]
    reading = _reading_of(raw)
    if reading is None:
        return Parsed([], "its raw input is not a reading this gateway can parse again")
    reason = check(reading, now_ms)
    return Parsed([], reason) if reason else Parsed([reading], None)


def _message_readings(payload: str, now_ms: int) -> Parsed:
    try:
        msg = json.loads(payload)
        site = str(msg["site"])
        out = []
        for row in msg["readings"]:
            building, meter = str(row[0]).split(":", 1)
            out.append(Reading(site, building, meter, row[1], row[2], REPLAY_SOURCE))
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        return Parsed([], f"the payload is not a message of readings: {type(exc).__name__}: {exc}")
    for r in out:
        reason = check(r, now_ms)
        if reason:
            return Parsed([], f"{r.building}:{r.meter}@{r.ts}: {reason}")
    return Parsed(out, None)


class _Floats(ast.NodeTransformer):
    """``nan`` and ``inf`` as a tuple's repr writes them, as float constants."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in ("nan", "inf"):
            return ast.copy_location(ast.Constant(float(node.id)), node)
        return node


_FLOATS = _Floats()


def _reading_of(raw: str) -> Reading | None:
    """A reading from a quarantined raw input: the tuple a buffer check recorded
    (site, building, meter, ts, value[, source]), or a JSON object with those fields."""
    value: Any
    try:
        value = ast.literal_eval(_FLOATS.visit(ast.parse(raw, mode="eval")))
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):
            return None
    if isinstance(value, dict):
        try:
            value = (value["site"], value["building"], value["meter"], value["ts"], value["value"])
        except KeyError:
            return None
    if not isinstance(value, (tuple, list)) or len(value) not in (5, 6):
        return None
    site, building, meter, ts, v = value[:5]
    if not all(isinstance(x, str) for x in (site, building, meter)) or meter not in METER_CODE:
        return None
    return Reading(site, building, meter, ts, v, REPLAY_SOURCE)


# ---------------------------------------------------------------- the buffer's side

def store(buf: Buffer, db: sqlite3.Connection, rows: list[tuple]) -> None:
    """Add quarantine rows inside the buffer's transaction; keep the quarantine within its share
    of the budget (an eighth), dropping its oldest entries past that."""
    buf._quarantine_bytes += add(db, rows)
    share = buf.budget.limit // 8 if buf.budget_bytes else 0
    if share and buf._quarantine_bytes > share:
        entries, gone = trim(db, buf._quarantine_bytes - share // 2)
        buf._quarantine_bytes -= gone
        buf.stats["quarantine_dropped"] += entries
        log.warning("%s: quarantine over its share of the budget: dropped its %d oldest entries",
                    buf.path, entries)


def store_message(buf: Buffer, reason: str, payload: bytes, topic: str, readings: int) -> None:
    """Record a message that can never be delivered (the forwarder's dead letters)."""
    with buf._lock, buf._atomic() as db:
        buf.stats["undeliverable"] += 1
        store(buf, db, [(int(buf.clock() * 1000), "message", reason, payload.decode("utf-8", "replace"),
                         f"forwarder ({readings} readings)", topic)])
        buf._set_state("stats", buf.stats)


def replay(buf: Buffer, ids: Iterable[int] | None = None, kind: str | None = None) -> dict:
    """Re-queue quarantined entries that now pass (all, or ``ids``, or one ``kind``): their
    readings are stored again and the entries removed, in one transaction per entry. What
    still fails stays. Returns counts: requeued entries and readings, kept entries."""
    wanted = set(ids) if ids is not None else None
    out = {"entries": 0, "readings": 0, "kept": 0, "reasons": {}}
    with buf._lock:
        for entry in buf.quarantined(limit=1 << 62, kind=kind):
            if wanted is not None and entry["id"] not in wanted:
                continue
            parsed = parse(entry, int(buf.clock() * 1000))
            if parsed.problem is not None:
                out["kept"] += 1
                out["reasons"][entry["id"]] = parsed.problem
                continue
            with buf._atomic() as db:
                db.execute("DELETE FROM quarantine WHERE id = ?", (entry["id"],))
                buf._quarantine_bytes -= entry_bytes(tuple(entry[k] for k in COLUMNS[1:]))
                if entry["kind"] == "message":
                    buf.stats["undeliverable"] -= 1
                else:
                    buf.stats["quarantined"] -= 1
                buf.stats["requeued"] += len(parsed.readings)
                buf.put(parsed.readings)
            out["entries"] += 1
            out["readings"] += len(parsed.readings)
    return out
