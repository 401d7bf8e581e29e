"""SQL for ranges of reading keys ``(ts, meter)`` that SQLite answers from the primary key.

``readings`` and ``resend`` are keyed ``PRIMARY KEY(ts, meter)``. "After this key" is spelled
``ts >= ? AND (ts > ? OR meter > ?)``: its leading bound on ``ts`` lets SQLite seek in the
primary key instead of scanning. The lanes' claims, eviction and reclaim all walk the key space
with these.
"""

from __future__ import annotations

from gateway.lanes import Key


def after(key: Key, t: str = "") -> tuple[str, tuple]:
    """SQL for ``(ts, meter) > key`` that uses the primary key (``t``: a table alias and dot)."""
    return f"{t}ts >= ? AND ({t}ts > ? OR {t}meter > ?)", (key[0], key[0], key[1])


def upto(key: Key, t: str = "") -> tuple[str, tuple]:
    """SQL for ``(ts, meter) <= key`` that uses the primary key (``t``: a table alias and dot)."""
    return f"{t}ts <= ? AND ({t}ts < ? OR {t}meter <= ?)", (key[0], key[0], key[1])


def between(lo: Key, hi: Key | None) -> tuple[str, tuple]:
    """SQL for ``lo < (ts, meter) <= hi`` (no upper bound when ``hi`` is None)."""
    sql, args = after(lo)
    if hi is not None:
        usql, uargs = upto(hi)
        sql, args = f"{sql} AND {usql}", args + uargs
    return sql, args
