"""``gateway buffer recover SRC DST``: salvage every readable row of a damaged buffer file.

A damaged page in a buffer (a bad SD card sector, a torn write) makes every query that reaches
it fail with "database disk image is malformed". :func:`recover` copies what can still be read
into a new buffer file, so that one bad page loses only its own rows:

1. It refuses when DST exists, and while a gateway holds SRC's lock (:mod:`gateway.lock`); it
   holds both locks while it works, so no gateway starts on either file meanwhile. SRC is only
   ever read (``mode=ro``).
2. DST is made by opening ``Buffer(DST)``: the same schema and recorded migrations as a
   gateway's. Tables SRC has beyond those (the scorer's ``meter_stats``) are created from
   SRC's own SQL.
3. Each table is walked in primary-key order (its rowid, or the key of a ``WITHOUT ROWID``
   table) in chunks. A chunk that fails is read again in smaller chunks, down to one row; when
   the next row itself cannot be read, the walk seeks past the damage to the first key of the
   next readable leaf page (``dbstat`` lists the leaves in key order; their first keys are
   read from the pages' bytes, through the WAL), then reads down from there to the damage (in
   a ``WITHOUT ROWID`` table the interior cell above a bad page is a row too). Without
   ``dbstat`` it bisects an integer key space for the first key a seek reads again.
4. What cannot be used is dropped and counted: a ``state`` value that is not JSON, a reading
   whose meter was lost, a ``resend`` entry whose reading was lost. A source position that is
   not JSON is reset (the source reads again from its start; the buffer ignores duplicates).

The rows of an unreadable page cannot be counted from the page itself. SQLite's ``dbstat``
table lists each B-tree's pages with their cell counts and marks the unreadable ones, so the
loss is the readable rows the walk could not reach (exact) plus, for each unreadable page, the
table's average rows per page (an estimate, and said so). A damaged interior page also cuts
off the pages below it: they are in no table's list and not free, so they are counted apart,
and the loss of a table with bad pages is then a lower bound ("at least").
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote

from gateway.buffer import MIGRATIONS, Buffer
from gateway.db import atomic, mapped
from gateway.errors import BufferCorrupt, BufferError, SchemaError
from gateway.lock import BufferLock

_INT_MIN, _INT_MAX = -(1 << 63), (1 << 63) - 1
_CHUNK = 512
_DAMAGE = ("SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_IOERR")


@dataclass
class TableResult:
    """What became of one table: rows saved into DST, and rows lost with why."""

    name: str
    saved: int = 0
    lost: int = 0                 # counted exactly: dropped rows, readable rows out of reach
    bad_pages: int = 0            # unreadable pages of the table's B-tree
    estimated: int = 0            # rows thought to be on those pages (average per page)
    known_pages: bool = True      # False when this SQLite has no dbstat: bad pages unknown
    beyond: bool = False          # rows under a bad interior page may be lost too: a lower bound
    notes: dict[str, int] = field(default_factory=dict)

    @property
    def total_lost(self) -> int:
        return self.lost + self.estimated

    def __str__(self) -> str:
        lost = f"{self.total_lost:,}"
        if self.beyond or not self.known_pages:
            lost = f"at least {lost}"
        elif self.estimated:
            lost = f"about {lost}"
        notes = [f"{n:,} {why}" for why, n in self.notes.items() if n]
        if not self.known_pages:
            notes.append("unreadable pages not counted: this SQLite has no dbstat")
        if self.bad_pages:
            notes.insert(0, f"{self.bad_pages:,} unreadable page{'s' if self.bad_pages != 1 else ''}")
        return f"{self.name}: {self.saved:,} saved, {lost} lost" + (f" ({'; '.join(notes)})" if notes else "")


@dataclass
class Recovery:
    """What :func:`recover` did: one :class:`TableResult` per table of SRC (its ``migrations``
    are DST's own), and how many pages of SRC no table reaches any more (under a damaged
    interior page; None when that cannot be told)."""

    tables: list[TableResult]
    out_of_reach: int | None

    def lines(self) -> list[str]:
        out = [str(t) for t in self.tables]
        if self.out_of_reach:
            s = "s" if self.out_of_reach != 1 else ""
            out.append(f"{self.out_of_reach:,} more page{s} lay under a damaged page, out of every table's "
                       "reach: their rows are lost too")
        return out


def recover(src: str | Path, dst: str | Path) -> Recovery:
    """Copy every readable row of the buffer ``src`` into a new buffer file ``dst``."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise BufferError(f"{src}: no buffer here")
    if dst.exists() or Path(f"{dst}-wal").exists():
        raise BufferError(f"{dst}: already exists; recover writes a new buffer file: give a path that does not exist")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with BufferLock(src), BufferLock(dst):
        source = _open_source(src)
        try:
            return _recover(source, src, dst)
        except BaseException:
            for leftover in (dst, Path(f"{dst}-wal"), Path(f"{dst}-shm")):  # no half-made buffer stays
                leftover.unlink(missing_ok=True)
            raise
        finally:
            source.close()


def _open_source(src: Path) -> sqlite3.Connection:
    db = sqlite3.connect(f"file:{quote(str(src.resolve()))}?mode=ro", uri=True, isolation_level=None)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        db.close()
        raise BufferCorrupt(f"{src}: cannot read its schema ({exc}): nothing in it can be recovered") from exc
    return db


def _recover(source: sqlite3.Connection, src: Path, dst: Path) -> Recovery:
    known = max(v for v, _, _ in MIGRATIONS)
    try:
        newest = source.execute("SELECT max(version) FROM migrations").fetchone()[0]
    except sqlite3.DatabaseError:
        newest = None  # no readable record: the tables are copied by name all the same
    if newest is not None and newest > known:
        raise SchemaError(f"{src}: schema version {newest} is newer than this gateway knows ({known}); "
                          "recover it with a newer gateway")
    tables = [(name, sql) for name, sql in source.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        " AND name != 'migrations' ORDER BY rowid")]
    if "readings" not in {name for name, _ in tables}:
        raise BufferError(f"{src}: not a gateway buffer (it has no readings table)")
    indexes = [sql for (sql,) in source.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")]
    Buffer(dst).close()  # the schema and migrations, exactly as a gateway makes them
    out = sqlite3.connect(str(dst), isolation_level=None)
    # SQLite's errors become the gateway's, naming the file they came from: a full disk under DST
    # is DiskFull naming DST, never a traceback (reads of SRC are mapped apart, in mapped(src)).
    try:
        with mapped(dst):
            out.execute("PRAGMA synchronous=NORMAL")
            have = {n for (n,) in out.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            for name, sql in tables:
                if name not in have:
                    out.execute(sql)
            for sql in indexes:
                out.execute(re.sub(r"^CREATE (UNIQUE )?INDEX ", r"CREATE \1INDEX IF NOT EXISTS ", sql))
            with mapped(src):
                pages = _pages(source)
                reader = _PageReader(src) if pages is not None else None
            order = sorted(tables, key=lambda t: t[0] != "meters")  # meters first: readings need them
            results = {}
            for name, sql in order:
                results[name] = _copy_table(source, src, out, name, reader, pages.get(name, []) if pages else [])
            _drop_orphans(out, results)
            with mapped(src):
                out_of_reach = _out_of_reach(source, pages)
            for name, sql in tables:
                _account(results[name], pages, _without_rowid(sql), bool(out_of_reach))
            out.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        out.close()
    return Recovery([results[name] for name, _ in tables], out_of_reach)


def _without_rowid(sql: str) -> bool:
    return re.search(r"\)\s*WITHOUT\s+ROWID\s*$", sql, re.IGNORECASE) is not None


def _q(name: str) -> str:
    """``name`` quoted as an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _damage(exc: sqlite3.DatabaseError) -> bool:
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(_DAMAGE) or "malformed" in str(exc)


# ---------------------------------------------------------------- the walk


class _Table:
    """One table of the source: its key columns, and SQL that reads it by key."""

    def __init__(self, db: sqlite3.Connection, name: str):
        self.db = db
        self.name = name
        self.anchors: list[tuple] | None = None  # the first key of each readable leaf, in key order
        info = db.execute(f"PRAGMA table_info({_q(name)})").fetchall()  # cid, name, type, notnull, default, pk
        self.columns = [r[1] for r in info]
        sql = db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
        self.without_rowid = _without_rowid(sql)
        if self.without_rowid:  # the primary key is the B-tree's key
            pk = sorted((r[5], r[1], r[2]) for r in info if r[5])
            self.key = [_q(n) for _, n, _ in pk]
            self.int_key = [t.upper() == "INTEGER" for _, _, t in pk]
        else:  # the rowid (an INTEGER PRIMARY KEY is the rowid itself)
            self.key, self.int_key = ["rowid"], [True]
        self._select = f'SELECT {", ".join(self.key)}, {", ".join(map(_q, self.columns))} FROM {_q(name)}'
        self._order = ", ".join(self.key)
        self._order_desc = ", ".join(f"{k} DESC" for k in self.key)

    def _where(self, key: tuple, op: str) -> str:
        n = len(key)
        return f' WHERE ({", ".join(self.key[:n])}) {op} ({", ".join("?" * n)})'

    def rows_after(self, key: tuple | None, inclusive: bool, limit: int) -> list[tuple]:
        where = "" if key is None else self._where(key, ">=" if inclusive else ">")
        return self.db.execute(f"{self._select}{where} ORDER BY {self._order} LIMIT ?",
                               (*(key or ()), limit)).fetchall()

    def rows_before_end(self, key: tuple | None, limit: int, below: tuple | None) -> list[tuple]:
        """Rows above ``key``, from the end of the table down (``below``: only under this key)."""
        where, args = ("", ()) if key is None else (self._where(key, ">"), key)
        if below is not None:
            where += (" AND" if where else " WHERE") + self._where(below, "<")[6:]
            args += below
        return self.db.execute(f"{self._select}{where} ORDER BY {self._order_desc} LIMIT ?",
                               (*args, limit)).fetchall()

    def seeks(self, prefix: tuple) -> bool:
        """Whether a B-tree seek to ``prefix`` (and one step on) reads without an error."""
        try:
            self.db.execute(f"SELECT {self._order} FROM {_q(self.name)}{self._where(prefix, '>=')}"
                            f" ORDER BY {self._order} LIMIT 1", prefix).fetchall()
            return True
        except sqlite3.DatabaseError as exc:
            if not _damage(exc):
                raise
            return False


def _walk(t: _Table) -> Iterator[list[tuple]]:
    """Chunks of (key..., columns...) rows in key order, every readable one reached."""
    key: tuple | None = None
    inclusive = False
    chunk = _CHUNK
    while True:
        try:
            rows = t.rows_after(key, inclusive, chunk)
        except sqlite3.DatabaseError as exc:
            if not _damage(exc):
                raise
            if chunk > 1:
                chunk = max(chunk // 8, 1)
                continue
            # The next row cannot be read: find where a seek reads again, and take the rows a
            # walk down from there reaches (in an index B-tree, the divider above the bad page).
            if t.anchors is not None:
                resume = next((a for a in t.anchors if key is None or a > key), None)
            else:
                resume = _bisect_key(t, key) if all(t.int_key) else None
            below = _down_to_damage(t, key, resume)
            if below:
                yield below[::-1]
            if resume is None:
                return
            key, inclusive, chunk = resume, True, _CHUNK
            continue
        if not rows:
            return
        yield rows
        key, inclusive = tuple(rows[-1][: len(t.key)]), False
        chunk = min(chunk * 2, _CHUNK)


def _bisect_key(t: _Table, last: tuple | None) -> tuple | None:
    """The first key after ``last`` that a seek reads again (or None): a bisection of the
    integer key space, column by column."""
    n = len(t.key)
    lo_first = last[0] if last is not None else _INT_MIN
    v = _first_true(lambda x: t.seeks((x,)), lo_first, _INT_MAX)
    if v is None:
        return None
    prefix: tuple = (v,)
    # The damage may end inside the previous value of the first column: look one column deeper.
    if n > 1 and v - 1 >= lo_first:
        lo = last[1] if last is not None and v - 1 == last[0] else _INT_MIN
        w = _first_true(lambda x: t.seeks((v - 1, x)), lo, _INT_MAX)
        if w is not None and w != _INT_MAX:
            prefix = (v - 1, w)
    try:
        row = t.rows_after(prefix, True, 1)
    except sqlite3.DatabaseError as exc:
        if not _damage(exc):
            raise
        return None
    return tuple(row[0][:n]) if row else None


def _first_true(ok: Callable[[int], bool], lo: int, hi: int) -> int | None:
    """The least x in (lo, hi] with ok(x), assuming ok is false then true; None if not ok(hi)."""
    if lo >= hi or not ok(hi):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _down_to_damage(t: _Table, last: tuple | None, below: tuple | None) -> list[tuple]:
    """The rows above ``last`` and under ``below`` (None: the table's end), read downwards
    until the damage: highest first."""
    got: list[tuple] = []
    chunk = _CHUNK
    while True:
        try:
            rows = t.rows_before_end(last, chunk, below)
        except sqlite3.DatabaseError as exc:
            if not _damage(exc):
                raise
            if chunk > 1:
                chunk = max(chunk // 8, 1)
                continue
            return got
        if not rows:
            return got
        got.extend(rows)
        below = tuple(rows[-1][: len(t.key)])


# ---------------------------------------------------------------- copying


def _copy_table(source: sqlite3.Connection, src: Path, out: sqlite3.Connection, name: str,
                reader: "_PageReader | None", pages: list[tuple[str, int, int]]) -> TableResult:
    t = _Table(source, name)
    if reader is not None:
        t.anchors = reader.first_keys(pages, t.without_rowid, len(t.key))
    result = TableResult(name)
    dst_cols = {r[1] for r in out.execute(f"PRAGMA table_info({_q(name)})")}
    cols = [c for c in t.columns if c in dst_cols]
    pick = [len(t.key) + t.columns.index(c) for c in cols]
    fix = _fixer(name, cols, result)
    insert = f'INSERT OR REPLACE INTO {_q(name)}({", ".join(map(_q, cols))}) VALUES({", ".join("?" * len(cols))})'
    with atomic(out):  # its ROLLBACK copes with one SQLite already made (a full disk)
        for rows in _read(_walk(t), src):
            values = [fix(tuple(r[i] for i in pick)) for r in rows]
            values = [v for v in values if v is not None]
            out.executemany(insert, values)
            result.saved += len(values)
    return result


def _read(chunks: Iterator[list[tuple]], src: Path) -> Iterator[list[tuple]]:
    """``chunks``, with SQLite's errors in reading them as the gateway's naming ``src`` (the
    caller's own errors, writing the copy, are not thrown in here)."""
    with mapped(src):
        yield from chunks


def _fixer(name: str, cols: list[str], result: TableResult) -> Callable[[tuple], tuple | None]:
    """What to do with a row that was read but cannot be used as it is."""

    def json_at(i: int) -> Callable[[tuple], bool]:
        def ok(row: tuple) -> bool:
            try:
                json.loads(row[i])
                return True
            except (TypeError, ValueError):
                return False
        return ok

    if name == "state" and "value" in cols:
        valid = json_at(cols.index("value"))

        def drop_bad_state(row: tuple) -> tuple | None:
            if valid(row):
                return row
            result.lost += 1
            result.notes["not JSON"] = result.notes.get("not JSON", 0) + 1
            return None
        return drop_bad_state
    if name == "sources" and "position" in cols:
        i = cols.index("position")
        valid = json_at(i)

        def reset_bad_position(row: tuple) -> tuple:
            if row[i] is None or valid(row):
                return row
            result.notes["positions reset"] = result.notes.get("positions reset", 0) + 1
            return row[:i] + (None,) + row[i + 1:]
        return reset_bad_position
    return lambda row: row


def _drop_orphans(out: sqlite3.Connection, results: dict[str, TableResult]) -> None:
    """Readings whose meter was lost cannot be sent; resend entries whose reading was lost
    would be pending forever: both go, counted."""
    drops = [
        ("readings", "of a lost meter", "DELETE FROM readings WHERE meter NOT IN (SELECT id FROM meters)"),
        ("resend", "of a lost reading", "DELETE FROM resend WHERE NOT EXISTS (SELECT 1 FROM readings r"
                                        " WHERE r.ts = resend.ts AND r.meter = resend.meter)"),
    ]
    for table, why, sql in drops:
        if table not in results or "meters" not in results:
            continue
        before = out.total_changes
        out.execute(sql)
        n = out.total_changes - before
        if n:
            results[table].saved -= n
            results[table].lost += n
            results[table].notes[why] = n


def _pages(source: sqlite3.Connection) -> dict[str, list[tuple[str, int, int]]] | None:
    """Each B-tree's pages as (page type, cells, page number) in key order, from dbstat; None if
    this SQLite has none."""
    try:
        rows = source.execute("SELECT name, pagetype, ncell, pageno FROM dbstat ORDER BY name, path").fetchall()
    except sqlite3.DatabaseError:
        return None
    pages: dict[str, list[tuple[str, int, int]]] = {}
    for name, kind, ncell, pageno in rows:
        pages.setdefault(name, []).append((kind, ncell, pageno))
    return pages


def _account(result: TableResult, pages: dict | None, without_rowid: bool, orphans: bool) -> None:
    """Add to ``result`` the rows out of reach and those of the unreadable pages (``orphans``:
    some pages lie under a damaged one, so a table with bad pages may have lost more)."""
    if pages is None:
        result.known_pages = False
        return
    mine = pages.get(result.name, [])
    # In a rowid table only leaves hold rows; in a WITHOUT ROWID one, interior cells are rows too.
    holds = ("leaf", "internal") if without_rowid else ("leaf",)
    readable = sum(n for kind, n, _ in mine if kind in holds)
    read = result.saved + result.lost  # every row the walk read (dropped ones included)
    result.lost += max(readable - read, 0)
    result.bad_pages = sum(1 for kind, _, _ in mine if kind == "corrupted")
    leaves = [n for kind, n, _ in mine if kind == "leaf"]
    if result.bad_pages and leaves:
        result.estimated = round(result.bad_pages * sum(leaves) / len(leaves))
    result.beyond = bool(result.bad_pages) and (orphans or not leaves)


def _out_of_reach(source: sqlite3.Connection, pages: dict | None) -> int | None:
    """Pages that are in no table's B-tree and not free: the subtrees of damaged interior pages."""
    if pages is None:
        return None
    count, free, size, vacuum = source.execute(
        "SELECT * FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size(), pragma_auto_vacuum()"
    ).fetchone()
    if vacuum:
        return None  # pointer-map pages belong to no tree either
    listed = {pgno for tree in pages.values() for _, _, pgno in tree}
    lock_byte = 1 if count * size > 1 << 30 else 0  # the page holding the lock bytes is never used
    return max(count - free - lock_byte - len(listed), 0)


# ---------------------------------------------------------------- raw pages


class _PageReader:
    """Pages of the source as SQLite sees them: the newest committed copy in the WAL, else the
    main file's. Enough of the file format to read the first key of a leaf page."""

    def __init__(self, src: Path):
        self.src = src
        with open(src, "rb") as f:
            header = f.read(100)
        size = int.from_bytes(header[16:18], "big")
        self.page_size = 65536 if size == 1 else size
        self.wal: dict[int, int] = {}  # page number -> offset of its newest committed frame
        wal = Path(f"{src}-wal")
        if wal.exists() and wal.stat().st_size > 32:
            self._read_wal(wal)

    def _read_wal(self, wal: Path) -> None:
        data = wal.read_bytes()
        salts = data[16:24]
        pending: dict[int, int] = {}
        at = 32
        while at + 24 + self.page_size <= len(data):
            pgno, commit = int.from_bytes(data[at:at + 4], "big"), int.from_bytes(data[at + 4:at + 8], "big")
            if data[at + 8:at + 16] != salts:
                break  # frames of an earlier generation of the WAL: not current
            pending[pgno] = at + 24
            if commit:
                self.wal.update(pending)
                pending.clear()
            at += 24 + self.page_size
        self._wal_data = data

    def page(self, pgno: int) -> bytes:
        if pgno in self.wal:
            at = self.wal[pgno]
            return self._wal_data[at:at + self.page_size]
        with open(self.src, "rb") as f:
            f.seek((pgno - 1) * self.page_size)
            return f.read(self.page_size)

    def first_keys(self, pages: list[tuple[str, int, int]], without_rowid: bool, n: int) -> list[tuple] | None:
        """The first key of each readable leaf of one B-tree, in key order; None if a page does
        not parse (the walk then bisects instead)."""
        keys = []
        for kind, ncell, pgno in pages:
            if kind != "leaf" or not ncell:
                continue
            try:
                keys.append(_first_key(self.page(pgno), pgno, without_rowid, n))
            except (IndexError, ValueError):
                return None
        return keys


def _varint(b: bytes, i: int) -> tuple[int, int]:
    """SQLite's big-endian varint at ``b[i]``: (value, next offset)."""
    v = 0
    for k in range(8):
        c = b[i + k]
        v = (v << 7) | (c & 0x7F)
        if c < 0x80:
            return v, i + k + 1
    return (v << 8) | b[i + 8], i + 9


_INT_SIZES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}


def _first_key(page: bytes, pgno: int, without_rowid: bool, n: int) -> tuple:
    """The key of the first cell of a leaf page: the rowid (table leaf), or the record's ``n``
    leading columns (index leaf: a WITHOUT ROWID table stores its key columns first)."""
    h = 100 if pgno == 1 else 0
    kind = page[h]
    cell = int.from_bytes(page[h + 8:h + 10], "big")
    _, i = _varint(page, cell)  # payload size
    if kind == 0x0D and not without_rowid:
        return (_signed(_varint(page, i)[0], 8),)
    if kind != 0x0A or not without_rowid:
        raise ValueError(f"page {pgno}: not a leaf of the expected kind ({kind:#x})")
    header_size, j = _varint(page, i)
    types, end = [], i + header_size
    while j < end:
        t, j = _varint(page, j)
        types.append(t)
    values, at = [], end
    for t in types[:n]:
        if t == 0:
            values.append(None)
        elif t in _INT_SIZES:
            n = _INT_SIZES[t]
            values.append(int.from_bytes(page[at:at + n], "big", signed=True))
            at += n
        elif t in (8, 9):
            values.append(t - 8)
        elif t >= 13 and t % 2:
            n = (t - 13) // 2
            values.append(page[at:at + n].decode("utf-8"))
            at += n
        else:  # a float or a blob key: not in the buffer's tables
            raise ValueError(f"page {pgno}: key of serial type {t}")
    return tuple(values)


def _signed(v: int, size: int) -> int:
    return v - (1 << (8 * size)) if v >= 1 << (8 * size - 1) else v
