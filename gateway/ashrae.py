"""The ASHRAE readings format: its columns, its one row parser, and the two faces that read it.

A file of readings in ASHRAE's columns (CSV or CSV.GZ, ``building_id, meter, timestamp,
meter_reading, site_id, ...``; see ``data/README.md``) is parsed by one row parser,
:func:`rows`, with two faces over it:

- :func:`stream`, the replay source's face: batches of :class:`~gateway.readings.Reading` and
  :class:`~gateway.readings.Rejected`, each with the position after it;
- :func:`read`, the face of training and ``gateway score``: the accepted rows as numpy columns
  (a :class:`Table`), plus ``(line, reason)`` for each rejected row.

The same row gets the same verdict, in the same words, from both (``read`` also refuses weather
cells that are not numbers: the replay does not read them). ``timestamp`` is the site's local
standard time, converted to UTC with :func:`gateway.sites.local_to_utc_ms`. A parsed row counts
as a reading only if it also passes :func:`gateway.readings.check` (NaN, negative, future...).
A row that does not is located ``file:line`` (the header is line 1); the streaming face keeps
its raw text too, cut to :data:`RAW_LIMIT` characters.

:func:`stream_json` reads the same fields from a JSON array of messages (``{"building_id": 1433,
"meter": 0, "site_id": 15, "timestamp": 1451624400000, "meter_reading": 45.2}``; a numeric
``timestamp`` is UTC epoch milliseconds, a ``YYYY-MM-DD HH:MM:SS`` string is site-local). It
decodes one message at a time, so a message that cannot be decoded (nested 100,000 deep, an
integer of 5,000 digits, a syntax error inside it) is rejected on its own.

No input stops a reader: an over-long line, a csv error, a bad number, a file cut short (gzip
or JSON) each become a rejection located ``file:line``, and the reader goes on past it where it
can. Only a header without the required columns is an error.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import math
import operator
import re
import time
import zlib
from array import array
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import numpy as np

from gateway.errors import ModelError
from gateway.readings import MAX_FUTURE_MS, METER_CODE, METER_TYPES, MIN_TS_MS, Reading, Rejected, check
from gateway.sites import UTC_OFFSET_HOURS, local_to_utc_ms
from gateway.sources import Batch
from gateway.sources.weather import WEATHER_FIELDS

__all__ = [
    "COLUMNS", "REQUIRED", "METADATA_COLUMNS", "MAX_LINE", "RAW_LIMIT", "Columns", "MissingColumns", "Table",
    "header", "rows", "stream", "stream_json", "read", "raw_text",
]  # fmt: skip

#: The columns of the ASHRAE readings files, in their order.
COLUMNS: tuple[str, ...] = (
    "building_id", "meter", "timestamp", "meter_reading", "site_id", "primary_use", "square_feet",
    "year_built", "floor_count", "air_temperature", "cloud_coverage", "dew_temperature",
    "precip_depth_1_hr", "sea_level_pressure", "wind_direction", "wind_speed", "city", "country", "state",
)  # fmt: skip
#: Columns a readings file must have (it may have more, in any order).
REQUIRED: tuple[str, ...] = ("building_id", "meter", "timestamp", "meter_reading", "site_id")
#: The building metadata a readings file may carry in each row.
METADATA_COLUMNS: tuple[str, ...] = ("building_id", "site_id", "primary_use", "square_feet", "year_built", "floor_count")

#: A line longer than this (characters) is rejected unparsed: csv's own field limit, and a
#: thousand times a real row.
MAX_LINE = 131_072
#: A rejected input's raw text is kept up to this many characters.
RAW_LIMIT = 1024

_METER_BY_CODE: dict[str, str] = {str(code): name for code, name in enumerate(METER_TYPES)}
# JSON may carry the code as an int, as a string, or the type name itself.
_METER_ANY: dict[Any, str] = {**_METER_BY_CODE, **dict(enumerate(METER_TYPES)), **{n: n for n in METER_TYPES}}
_MS_PER_HOUR = 3_600_000
_INT64 = 2**63
# Bound on a site's timestamp cache; a year of hourly data is 8,784 entries.
_CACHE_LIMIT = 200_000
# What a damaged file raises while it is read (a gzip cut short, a bad CRC, a disk error).
_READ_ERRORS = (OSError, EOFError, zlib.error)


def raw_text(text: str) -> str:
    """``text`` as a rejection keeps it: whole up to :data:`RAW_LIMIT` characters, else cut, saying so."""
    if len(text) <= RAW_LIMIT:
        return text
    return f"{text[:RAW_LIMIT]}… [truncated: {len(text):,} characters]"


def _show(value: Any) -> str:
    """``repr(value)`` for a reason, cut when long (a reason names the value, it does not carry it)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}… [{len(text):,} characters]"


def _is_id(text: str) -> bool:
    return text.isdigit() and text.isascii()


# -- the header ---------------------------------------------------------------------------------


class Columns(NamedTuple):
    """Where the required columns are in a file's header."""

    names: list[str]
    building: int
    meter: int
    timestamp: int
    reading: int
    site: int


def header(line: str) -> Columns | list[str]:
    """The :class:`Columns` of a header line, or the required columns it lacks."""
    try:
        names = next(csv.reader([line.rstrip("\r\n")]), [])
    except csv.Error:
        names = []
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        return missing
    return Columns(names, *(names.index(c) for c in REQUIRED))


class MissingColumns(ValueError):
    """A header without the required columns (the one fatal input: the file is not this format)."""

    def __init__(self, path: str | Path, missing: list[str]):
        self.missing = missing
        super().__init__(f"{path}: no column {', '.join(missing)} in the header")


def open_text(path: Path):
    """A readings file as text lines (``.gz`` decompressed; a BOM dropped; undecodable bytes
    replaced, so they reject their row instead of stopping the reader)."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", errors="replace", newline="")
    return open(path, encoding="utf-8-sig", errors="replace", newline="")


# -- the row parser -----------------------------------------------------------------------------


def rows(
    lines: Iterable[str],
    cols: Columns,
    offsets: dict[str, float],
    source: str,
    line: int = 1,
) -> Iterator[tuple[int, int, str, list[str] | None, Reading | str]]:
    """Parse data lines; yield ``(first, last, text, fields, verdict)`` for each row.

    ``lines`` follow line number ``line`` (1: the header). ``first`` and ``last`` are the
    row's line numbers (they differ only for a quoted field that spans lines), ``text`` its raw
    text without the newline, ``fields`` its cells (None when it could not be split), and
    ``verdict`` either a :class:`~gateway.readings.Reading` that passes
    :func:`~gateway.readings.check`, or the reason it is not one. Blank lines are skipped.
    A file that cannot be read on ends with one last row: ``last`` stays at the last full line
    (a resume from there reads it again), ``fields`` None and the reason ``file: ...``.
    """
    ncols = len(cols.names)
    ib, im, it, iv, isite = cols.building, cols.meter, cols.timestamp, cols.reading, cols.site
    meters = _METER_BY_CODE
    caches: dict[str, dict[str, int]] = {}
    inf = math.inf
    new, reading_type = tuple.__new__, Reading  # Reading(...) without its Python-level __new__
    # A stale clock only sends a row to check() (which reads the clock again): never too lax.
    max_ts = int(time.time() * 1000) + MAX_FUTURE_MS
    n = line
    it_lines = iter(lines)
    try:
        for text in it_lines:
            n += 1
            first = n
            text = text.rstrip("\r\n")
            if len(text) > MAX_LINE:
                yield first, n, text, None, f"line: {len(text):,} characters, more than {MAX_LINE:,}"
                continue
            if not text:
                continue
            if '"' in text:
                fields, n, text = _quoted(text, it_lines, n)
                if type(fields) is str:
                    yield first, n, text, None, fields
                    continue
            else:
                fields = text.split(",")
            if len(fields) != ncols:
                yield first, n, text, fields, f"columns: {len(fields)} instead of {ncols}"
                continue
            building = fields[ib]
            meter = meters.get(fields[im])
            site = fields[isite]
            stamp = fields[it]
            raw_value = fields[iv]
            if meter is None:
                yield first, n, text, fields, f"meter: {_show(fields[im])} is not a meter code 0..3"
                continue
            if not (building.isdigit() and building.isascii()):
                why = f"building_id: {_show(building)} is not an integer" if building else "building_id: empty"
                yield first, n, text, fields, why
                continue
            cache = caches.get(site)
            if cache is None:
                if site not in offsets:
                    why = f"site_id: {_show(site)} has no UTC offset" if site else "site_id: empty"
                    yield first, n, text, fields, why
                    continue
                cache = caches[site] = {}
            if not raw_value:
                yield first, n, text, fields, "meter_reading: empty"
                continue
            ts = cache.get(stamp)
            if ts is None:
                try:
                    ts = local_to_utc_ms(stamp, offsets[site])
                except ValueError:
                    yield first, n, text, fields, f"timestamp: {_show(stamp)} is not a valid YYYY-MM-DD HH:MM:SS"
                    continue
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[stamp] = ts
            try:
                value = float(raw_value)
            except ValueError:
                yield first, n, text, fields, f"meter_reading: {_show(raw_value)} is not a number"
                continue
            reading = new(reading_type, (site, building, meter, ts, value, source))
            # The checks of gateway.readings.check that parsing leaves open, in one comparison;
            # check() itself gives a failing row its reason (and has the last word).
            if MIN_TS_MS <= ts <= max_ts and 0.0 <= value < inf:
                yield first, n, text, fields, reading
            else:
                yield first, n, text, fields, check(reading) or reading
    except _READ_ERRORS as exc:
        yield n + 1, n, "", None, f"file: {exc}"


def _quoted(text: str, lines: Iterator[str], n: int) -> tuple[list[str] | str, int, str]:
    """Split a row with quotes the csv way; a quoted field may go on over the next lines.

    Returns (fields or the reason they could not be split, the row's last line number, its text).
    """
    taken = [text]

    def more() -> Iterator[str]:
        yield text
        for line in lines:
            taken.append(line.rstrip("\r\n"))
            if len(taken[-1]) > MAX_LINE:
                size, taken[-1] = len(taken[-1]), raw_text(taken[-1])
                raise csv.Error(f"a line of {size:,} characters inside a quoted field")
            yield line

    reader = csv.reader(more())
    try:
        fields = next(reader, [])
        reason = None
    except csv.Error as exc:
        fields, reason = [], f"csv: {exc}"
    last = n + len(taken) - 1
    joined = "\n".join(taken) if len(taken) > 1 else text
    return (reason if reason is not None else fields), last, joined


# -- the streaming face -------------------------------------------------------------------------


def stream(
    path: str | Path,
    source: str,
    start: int = 0,
    offsets: dict[str, float] | None = None,
    batch_size: int = 1000,
    by_time: bool = False,
) -> Iterator[tuple[Batch, int | None]]:
    """Read a CSV(.gz) from data line ``start`` on (header excluded) into batches.

    Yields ``(batch, key)``: a :class:`~gateway.sources.Batch` whose position is the number of
    data lines consumed after it, and the batch's pacing key (its first reading's site-local time
    as epoch ms, the order the file is sorted in; None without readings). ``by_time`` also cuts a
    batch where the timestamp column changes. Raises :class:`MissingColumns` for a header
    without the required columns.
    """
    path = Path(path)
    offsets = UTC_OFFSET_HOURS if offsets is None else offsets
    where = path.name + ":"
    with open_text(path) as f:
        try:
            head = f.readline()
        except _READ_ERRORS as exc:
            yield Batch([], [Rejected(f"file: {exc}", "", source, where + "1")], start), None
            return
        if not head:
            return
        cols = header(head)
        if type(cols) is list:
            raise MissingColumns(path, cols)
        skipped = _skip(f, start)
        if skipped is not None:
            yield Batch([], [Rejected(f"file: {skipped}", "", source, where + "2")], start), None
            return
        readings: list[Reading] = []
        rejected: list[Rejected] = []
        done = start  # data lines consumed, up to the last whole row
        count = 0  # rows in the current batch (readings + rejected)
        key: int | None = None
        stamp: str | None = None
        it = cols.timestamp
        for first, last, text, fields, verdict in rows(f, cols, offsets, source, start + 1):
            if by_time:
                this = fields[it] if fields is not None and len(fields) > it else None
                if this != stamp and count and this is not None:
                    yield Batch(readings, rejected, done), key
                    readings, rejected, count, key = [], [], 0, None
                stamp = this
            if type(verdict) is str:
                rejected.append(Rejected(verdict, raw_text(text), source, f"{where}{first}"))
            else:
                readings.append(verdict)
                if key is None and by_time:
                    key = verdict.ts + int(round(offsets[verdict.site] * _MS_PER_HOUR))
            done = last - 1
            count += 1
            if count >= batch_size:
                yield Batch(readings, rejected, done), key
                readings, rejected, count, key = [], [], 0, None
        if count:
            yield Batch(readings, rejected, done), key


def _skip(f: Iterator[str], n: int) -> Exception | None:
    """Skip ``n`` lines without parsing them; the read error that stopped it, if any."""
    if n:
        try:
            deque(itertools.islice(f, n), maxlen=0)
        except _READ_ERRORS as exc:
            return exc
    return None


# -- JSON ---------------------------------------------------------------------------------------

_DECODE = json.JSONDecoder().raw_decode
_SPACE = re.compile(r"[ \t\n\r]*")
# A JSON string (possibly cut short), or a bracket: enough to find where a value ends.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.DOTALL)
_SCALAR_END = re.compile(r"[,\]}\s]")


def json_items(text: str) -> Iterator[tuple[int, str, Any, str | None, bool]]:
    """The elements of a JSON array, decoded one at a time: ``(line, raw, value, reason, broken)``.

    ``line`` is where the element starts, ``raw`` its text. ``reason`` is None for a decoded
    element; otherwise ``value`` is None. ``broken`` marks the break after which the array cannot
    be followed (not an array, a syntax error between elements, a file cut short): it comes
    last, and it is not an element. A RecursionError, an integer past Python's digit limit, a
    syntax error inside an element: each costs that element, not the file.
    """
    pos = _SPACE.match(text).end()
    if pos == len(text) or text[pos] != "[":
        yield text.count("\n", 0, pos) + 1, text[pos:], None, "json: the file is not a JSON array", True
        return
    line, counted = 1, 0
    pos = _SPACE.match(text, pos + 1).end()
    if text.startswith("]", pos):
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        reason = None
        try:
            value, end = _DECODE(text, pos)
        except RecursionError:
            value, end, reason = None, _value_end(text, pos), "json: nested too deeply to decode"
        except json.JSONDecodeError as exc:
            at = line + text.count("\n", pos, exc.pos)
            value, end, reason = None, _value_end(text, pos), f"json: {exc.msg} at line {at}"
        except ValueError as exc:  # e.g. an integer longer than sys.get_int_max_str_digits()
            value, end, reason = None, _value_end(text, pos), f"json: {exc}"
        if end is None:
            yield line, text[pos:], None, "json: the array is cut short", True
            return
        yield line, text[pos:end], value, reason, False
        pos = _SPACE.match(text, end).end()
        if text.startswith(",", pos):
            pos = _SPACE.match(text, pos + 1).end()
            if text.startswith("]", pos):
                return  # a trailing comma: nothing is lost by taking it
            continue
        if text.startswith("]", pos):
            return
        line += text.count("\n", counted, pos)
        counted = pos
        what = "the array is cut short" if pos >= len(text) else f"expected ',' or ']' at line {line}"
        yield line, text[pos:], None, f"json: {what}", True
        return


def _value_end(text: str, pos: int) -> int | None:
    """Where the JSON value starting at ``pos`` ends, counting brackets outside strings; None
    when it never does (the file is cut short)."""
    if pos >= len(text):
        return None
    if text[pos] not in "[{":
        if text[pos] == '"':
            m = _TOKEN.match(text, pos)
            return m.end() if m and m.end() - pos >= 2 and text[m.end() - 1] == '"' else None
        m = _SCALAR_END.search(text, pos)
        return m.start() if m else None
    depth = 0
    for m in _TOKEN.finditer(text, pos):
        tok = m.group()
        if tok in "[{":
            depth += 1
        elif tok in "]}":
            depth -= 1
            if depth == 0:
                return m.end()
        elif tok[-1] != '"' or len(tok) < 2:
            return None  # a string cut short
    return None


def stream_json(
    path: str | Path,
    source: str,
    start: int = 0,
    offsets: dict[str, float] | None = None,
    batch_size: int = 1000,
    by_time: bool = False,
) -> Iterator[tuple[Batch, int | None]]:
    """Read a JSON array (``.json`` / ``.json.gz``) of reading messages from message ``start`` on.

    Yields ``(batch, key)`` as :func:`stream` does; the position counts messages, the key is a
    batch's first UTC timestamp. A rejection is located ``file:line[index]``: the line the
    message starts on, and its index in the array (a compact file is all one line). A file that
    cannot be followed to its end (cut short) ends with a rejection at the break, and the position
    does not pass it: a mended file is read on from there.
    """
    path = Path(path)
    offsets = UTC_OFFSET_HOURS if offsets is None else offsets
    where = path.name + ":"
    try:
        with open_text(path) as f:
            text = f.read()
    except _READ_ERRORS as exc:
        yield Batch([], [Rejected(f"file: {exc}", "", source, where + "1")], start), None
        return
    max_ts = int(time.time() * 1000) + MAX_FUTURE_MS
    readings: list[Reading] = []
    rejected: list[Rejected] = []
    count = 0
    key: int | None = None
    index = start
    for index, (line, raw, msg, reason, broken) in enumerate(json_items(text)):
        if broken:
            # Not a message: the position stays before it, so a fixed file is read on from here.
            rejected.append(Rejected(reason, raw_text(raw), source, f"{where}{line}[{index}]"))
            yield Batch(readings, rejected, max(index, start)), key
            return
        if index < start:
            continue
        verdict = reason if reason is not None else _message(msg, offsets, source, max_ts)
        ts = None if type(verdict) is str else verdict.ts
        if by_time and count and ts is not None and key is not None and ts != key:
            yield Batch(readings, rejected, index), key
            readings, rejected, count, key = [], [], 0, None
        if type(verdict) is str:
            rejected.append(Rejected(verdict, raw_text(raw), source, f"{where}{line}[{index}]"))
        else:
            readings.append(verdict)
            if key is None:
                key = ts
        count += 1
        if count >= batch_size:
            yield Batch(readings, rejected, index + 1), key
            readings, rejected, count, key = [], [], 0, None
    if count:
        yield Batch(readings, rejected, index + 1), key


def _message(msg: Any, offsets: dict[str, float], source: str, max_ts: int) -> Reading | str:
    """One JSON message → a Reading that passes check(), or the reason it is not one."""
    if not isinstance(msg, dict):
        return "message: not a JSON object"
    values = []
    for name, alias in (("building_id", "building"), ("site_id", "site"), ("meter", "meter"),
                        ("timestamp", "ts"), ("meter_reading", "value")):  # fmt: skip
        v = msg.get(name, msg.get(alias))
        if v is None or v == "":
            if name == "meter_reading":
                return "meter_reading: empty"
            return f"{name}: missing" if name not in msg and alias not in msg else f"{name}: empty"
        values.append(v)
    building_raw, site_raw, meter_raw, ts_raw, value_raw = values
    building = _id_text(building_raw)
    if building is None or not _is_id(building):
        return f"building_id: {_show(building_raw)} is not an integer"
    site = _id_text(site_raw)
    if site is None:
        return f"site_id: {_show(site_raw)} is not an id"
    meter = _METER_ANY.get(meter_raw) if not isinstance(meter_raw, (bool, float, list, dict)) else None
    if meter is None:
        return f"meter: {_show(meter_raw)} is not a meter code 0..3"
    if isinstance(ts_raw, str):
        if site not in offsets:
            return f"site_id: {_show(site)} has no UTC offset"
        try:
            ts = local_to_utc_ms(ts_raw, offsets[site])
        except ValueError:
            return f"timestamp: {_show(ts_raw)} is not a valid YYYY-MM-DD HH:MM:SS"
    elif isinstance(ts_raw, int) and not isinstance(ts_raw, bool):
        ts = ts_raw
    elif isinstance(ts_raw, float) and ts_raw.is_integer():
        ts = int(ts_raw)
    else:
        return f"timestamp: {_show(ts_raw)} is not epoch milliseconds"
    if not -_INT64 <= ts < _INT64:
        return f"timestamp: {_show(ts_raw)} is out of range"
    if isinstance(value_raw, (bool, list, dict)):
        return f"meter_reading: {_show(value_raw)} is not a number"
    try:
        value = float(value_raw)
    except (TypeError, ValueError):
        return f"meter_reading: {_show(value_raw)} is not a number"
    except OverflowError:
        return f"meter_reading: {_show(value_raw)} is too large for a number"
    reading = Reading(site, building, meter, ts, value, source)
    if MIN_TS_MS <= ts <= max_ts and 0.0 <= value < math.inf:
        return reading
    return check(reading) or reading


def _id_text(v: Any) -> str | None:
    """A building or site id as text: 1433 and "1433" both give "1433"."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return str(v) if -10**40 < v < 10**40 else None
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, str) and v.strip():
        return v.strip()
    return None


# -- the columnar face --------------------------------------------------------------------------


@dataclass
class Table:
    """Accepted rows as columns, in file order, plus what was rejected and why."""

    header: list[str]
    lines: list[str]  # the accepted rows' raw text (no newline), for writing them back out
    line_no: np.ndarray  # 1-based line number in the file (header is line 1)
    building_id: np.ndarray  # int64
    meter: np.ndarray  # int64 0..3
    site_id: np.ndarray  # int64
    ts_ms: np.ndarray  # UTC epoch ms, int64
    meter_reading: np.ndarray  # float64 ≥ 0
    weather: dict[str, np.ndarray]
    metadata: list[dict] = field(default_factory=list)  # first row seen of each building
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def timestamp(self) -> np.ndarray:
        """The rows' site-local time as written, ``datetime64[s]``."""
        offset = np.zeros(len(self.ts_ms), dtype=np.int64)
        for site in np.unique(self.site_id).tolist():
            offset[self.site_id == site] = int(round(UTC_OFFSET_HOURS[str(site)] * _MS_PER_HOUR))
        return (self.ts_ms + offset).astype("datetime64[ms]").astype("datetime64[s]")

    def rejected_counts(self) -> dict[str, int]:
        """Number of rejected rows per reason kind (the text before the first colon)."""
        out: dict[str, int] = {}
        for _, reason in self.rejected:
            kind = reason.split(":", 1)[0]
            out[kind] = out.get(kind, 0) + 1
        return out

    def take(self, idx: np.ndarray) -> Table:
        """The rows at positions ``idx`` (rejections and metadata are kept whole)."""
        return Table(
            header=self.header,
            lines=[self.lines[i] for i in idx.tolist()],
            line_no=self.line_no[idx],
            building_id=self.building_id[idx],
            meter=self.meter[idx],
            site_id=self.site_id[idx],
            ts_ms=self.ts_ms[idx],
            meter_reading=self.meter_reading[idx],
            weather={k: v[idx] for k, v in self.weather.items()},
            metadata=self.metadata,
            rejected=self.rejected,
        )


def read(path: str | Path, progress=None) -> Table:
    """Read and check every row of ``path`` into a :class:`Table`.

    ``progress(n_lines)`` is called every 50k lines. The weather columns, when present, must be
    numbers or empty (NaN). Raises :class:`~gateway.errors.ModelError` when the file cannot be
    opened or lacks a required column.
    """
    path = Path(path)
    try:
        f = open_text(path)
        head = f.readline()
    except _READ_ERRORS as exc:
        raise ModelError(f"{path}: {exc}") from exc
    with f:
        cols = header(head)
        if type(cols) is list:
            raise ModelError(str(MissingColumns(path, cols)))
        pos = {name: i for i, name in enumerate(cols.names)}
        # The weather columns the file has; the others are NaN. All rows' values go into one
        # array, row after row (one extend a row), split into columns at the end.
        wpos = [(name, pos[name]) for name in WEATHER_FIELDS if name in pos]
        weather_cells = operator.itemgetter(*(p for _, p in wpos)) if wpos else (lambda fields: ())
        if len(wpos) == 1:
            one = weather_cells
            weather_cells = lambda fields: (one(fields),)  # noqa: E731
        weather = array("d")
        mpos = [(name, pos[name]) for name in METADATA_COLUMNS if name in pos]
        has_meta = len(mpos) == len(METADATA_COLUMNS)
        # numeric columns grow in compact stdlib arrays (8 bytes a value, no object per value)
        lines: list[str] = []
        line_no, bid, met, site, stamp = (array("q") for _ in range(5))
        value = array("d")
        ints: dict[str, int] = {}
        seen: dict[int, dict] = {}
        rejected: list[tuple[int, str]] = []
        nan = math.nan
        every = 50_000
        next_progress = every
        for first, last, text, fields, verdict in rows(f, cols, UTC_OFFSET_HOURS, "", 1):
            if progress is not None and last >= next_progress:
                progress(last)
                next_progress += every
            if type(verdict) is str:
                rejected.append((first, verdict))
                continue
            try:
                w = [float(x) if x else nan for x in weather_cells(fields)]
            except ValueError:
                bad, p = next((name, p) for name, p in wpos if not _is_num(fields[p]))
                rejected.append((first, f"{bad}: {_show(fields[p])} is not a number"))
                continue
            s, b, m, ts, v, _ = verdict
            b_int = ints.get(b)
            if b_int is None:
                b_int = ints[b] = int(b)
            lines.append(text)
            line_no.append(first)
            bid.append(b_int)
            met.append(METER_CODE[m])
            s_int = ints.get(s)
            if s_int is None:
                s_int = ints[s] = int(s)
            site.append(s_int)
            stamp.append(ts)
            value.append(v)
            weather.extend(w)
            if has_meta and b_int not in seen:
                seen[b_int] = {name: fields[p] for name, p in mpos}

    def column(a: array, dtype) -> np.ndarray:
        return np.frombuffer(a, dtype=dtype).copy() if len(a) else np.zeros(0, dtype=dtype)

    cells = column(weather, np.float64).reshape(len(lines), len(wpos))
    has = {name: j for j, (name, _) in enumerate(wpos)}
    weather_columns = {
        name: cells[:, has[name]].copy() if name in has else np.full(len(lines), np.nan) for name in WEATHER_FIELDS
    }
    del cells

    return Table(
        header=cols.names,
        lines=lines,
        line_no=column(line_no, np.int64),
        building_id=column(bid, np.int64),
        meter=column(met, np.int64),
        site_id=column(site, np.int64),
        ts_ms=column(stamp, np.int64),
        meter_reading=column(value, np.float64),
        weather=weather_columns,
        metadata=list(seen.values()),
        rejected=rejected,
    )


def _is_num(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return bool(not text)
    return True
