"""The buffer file's schema: recorded, ordered migrations (append only; never edit a shipped one).

Every table of the buffer file is created here, the scorer's included, so a file of any earlier
version upgrades in order and ``migrations`` says what was applied when. A step is SQL, or a
function of the connection for what SQL alone cannot say (a column that may already exist).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Callable

from gateway.errors import SchemaError


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def ensure_meter_stats(db: sqlite3.Connection) -> None:
    """``meter_stats``, the scorer's per-meter statistics (:mod:`gateway.model.online`), with every
    column: a file of version 2 may hold one made before it was a migration, without ``zeros``
    or ``format``."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS meter_stats(meter_key TEXT PRIMARY KEY, n_seen INTEGER NOT NULL,"
        " window INTEGER NOT NULL, residuals BLOB NOT NULL, errors BLOB NOT NULL, zeros BLOB, format INTEGER)"
    )
    have = _columns(db, "meter_stats")
    for name, kind in (("zeros", "BLOB"), ("format", "INTEGER")):
        if name not in have:
            db.execute(f"ALTER TABLE meter_stats ADD COLUMN {name} {kind}")


def _scores_beside_readings(db: sqlite3.Connection) -> None:
    ensure_meter_stats(db)
    db.execute("CREATE TABLE IF NOT EXISTS models(id INTEGER PRIMARY KEY, version TEXT NOT NULL UNIQUE)")
    have = _columns(db, "readings")
    # expected and score have no declared type (no affinity): they hold integers of their rounding
    # unit, or a REAL too large for that, exactly as given (a REAL column would turn the integers
    # into floats, an INTEGER one an integral float into an integer).
    for name, kind in (("expected", ""), ("score", ""), ("flag", " INTEGER"), ("model", " INTEGER")):
        if name not in have:
            db.execute(f"ALTER TABLE readings ADD COLUMN {name}{kind}")


Step = str | Callable[[sqlite3.Connection], None]

MIGRATIONS: list[tuple[int, str, Step]] = [
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
    (
        3,
        "scores stored beside each reading at ingest (expected, score, flag, model); meter_stats and models",
        _scores_beside_readings,
    ),
]

LATEST = MIGRATIONS[-1][0]


def migrate(db: sqlite3.Connection, path: str | Path, now_ms: int) -> None:
    """Apply every migration ``db`` lacks, each in its own transaction."""
    from gateway.db import atomic

    db.execute(
        "CREATE TABLE IF NOT EXISTS migrations(version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
        " applied_at INTEGER NOT NULL)"
    )
    done = {v for (v,) in db.execute("SELECT version FROM migrations")}
    known = {v for v, _, _ in MIGRATIONS}
    if done - known:
        raise SchemaError(
            f"{path}: schema version {max(done)} is newer than this gateway knows "
            f"({max(known)}); upgrade the gateway or point it at another buffer file"
        )
    for version, name, step in MIGRATIONS:
        if version in done:
            continue
        with atomic(db):
            if callable(step):
                step(db)
            else:
                for stmt in step.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
            db.execute("INSERT INTO migrations VALUES(?, ?, ?)", (version, name, now_ms))
