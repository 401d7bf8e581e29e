"""Scoring at ingest: what the buffer asks of a scorer, and how the scores are stored beside a reading.

With a scorer, each batch is scored inside put, in the order it arrives (data time per meter for
every source the gateway has), and the result is stored beside the reading. A reading's expected
value, score and flag depend only on the readings of its meter stored before it, never on the
order or the number of times it is sent: a message sent again carries the same bytes and batch id.
A scoring failure stores the reading unscored (raw only): scoring never stops ingest.

Scores are stored as integers of their rounding unit (expected in 1e-4 kWh, score in 1e-3): 3-4
bytes instead of 8 on disk, and the same floats back (:func:`columns` decodes them in the claim's
SELECT). A value too large for that stays REAL.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from gateway.buffer import Buffer

log = logging.getLogger("gateway.buffer")  # its errors are the buffer's, as they were

EXPECTED_UNIT, SCORE_UNIT = 10_000, 1_000
_FIXED_MAX = 1 << 53


class IngestScorer(Protocol):
    """What the buffer needs of a scorer (:class:`gateway.model.scoring.ReadingScorer`)."""

    def score(self, rows: list[tuple], meters: dict) -> tuple[str, list[tuple | None], Callable[[], None]]:
        """For rows starting (ts, meter id, value): the model version, (expected, score, flag)
        or None per row, and an undo that forgets what the call learned (its put rolled back)."""
        ...

    def save_due(self) -> bool: ...

    def save(self, db: sqlite3.Connection) -> None:
        """Write what changed of the learned state, inside the caller's transaction."""
        ...

    def saved(self) -> None:
        """The transaction of the last :meth:`save` committed."""
        ...


def _fixed(x: float | None, unit: int) -> float | int | None:
    if x is None or not -_FIXED_MAX < x * unit < _FIXED_MAX:  # (inf compares False)
        return x
    return round(x * unit)


def columns(t: str = "") -> str:
    """The claim's columns, scores decoded back to floats (``t``: a table alias and dot)."""
    def dec(col: str, unit: int) -> str:
        return f"CASE WHEN typeof({t}{col}) = 'integer' THEN {t}{col} / {unit}.0 ELSE {t}{col} END"
    return (f"{t}ts, {t}meter, {t}value, {dec('expected', EXPECTED_UNIT)}, {dec('score', SCORE_UNIT)},"
            f" {t}flag, {t}model")


def score(buf: Buffer, rows: list[tuple]) -> tuple[list[tuple], Callable[[], None] | None]:
    """Rows with their scores (expected, score, flag, model id), or NULLs where a reading
    cannot be scored. A scoring failure never stops a put: the readings go unscored."""
    try:
        version, scores, undo = buf.scorer.score(rows, buf.meters)
    except Exception as exc:  # scoring never stops ingest: the raw readings are stored
        reason = f"{type(exc).__name__}: {exc}"
        if reason != buf.scoring_error:
            log.error("scoring failed, storing readings unscored: %s", reason)
        buf.scoring_error = reason
        buf.stats["unscored"] += len(rows)
        return rows, None
    buf.scoring_error = None
    model = buf.ids.model_id(buf.db, version)
    out, none = [], (None, None, None, None)
    for row, s in zip(rows, scores):
        if s is None:
            out.append(row + none)
        else:
            out.append(row + (_fixed(s[0], EXPECTED_UNIT), _fixed(s[1], SCORE_UNIT), s[2], model))
    buf.stats["unscored"] += sum(1 for s in scores if s is None)
    return out, undo
