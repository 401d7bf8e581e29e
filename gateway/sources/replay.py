"""Replay recorded meter readings from a file, as fast as possible or in scaled time.

Two formats, chosen by the file name:

- ``*.csv`` / ``*.csv.gz``: the ASHRAE layout (``building_id, meter, timestamp, meter_reading,
  site_id, ...``; see ``data/README.md``). ``timestamp`` is the site's local standard time,
  ``YYYY-MM-DD HH:MM:SS``; it is converted to UTC with the site's offset
  (:data:`gateway.sites.UTC_OFFSET_HOURS`, overridable with ``site_offsets``).
- ``*.json`` / ``*.json.gz``: a JSON array of messages, one reading each, with the same field
  names (``{"building_id": 1433, "meter": 0, "site_id": 15, "timestamp": 1451624400000,
  "meter_reading": 45.2}``). A numeric ``timestamp`` is UTC epoch milliseconds; a
  ``YYYY-MM-DD HH:MM:SS`` string is site-local, as in the CSV.

The reader only parses. A row it cannot parse becomes a :class:`~gateway.readings.Rejected`
naming the file and line (``readings.csv.gz:767766``; ``readings.json[12]`` for the 13th JSON
message) and the reader goes on. Range checks (NaN, negative, future) are
:func:`gateway.readings.validate`'s job downstream.

Position is the number of data lines consumed (CSV, header excluded) or messages consumed
(JSON). Resuming from ``N`` skips exactly ``N`` lines without parsing them.

Pacing: ``speed=None`` reads as fast as it can (backfill). ``speed=60.0`` plays 60 data-seconds
per wall-second: batches are cut whenever the timestamp column changes and each waits, on
``stop.wait``, until its time has come. The pace follows the timestamp column as written, i.e.
site-local time for the CSV (the order the file is sorted in) and UTC for JSON.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import threading
import time
from calendar import timegm
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterator

from gateway.errors import ConfigError
from gateway.readings import METER_TYPES, Reading, Rejected
from gateway.sites import UTC_OFFSET_HOURS
from gateway.sources import Batch

__all__ = ["ReplaySource", "REQUIRED_COLUMNS", "local_to_utc_ms"]

#: Columns a readings CSV must have (it may have more, in any order).
REQUIRED_COLUMNS: tuple[str, ...] = ("building_id", "meter", "timestamp", "meter_reading", "site_id")

_MS_PER_HOUR = 3_600_000
# Meter codes as they appear in the CSV (and in JSON as strings) → meter type names.
_METER_BY_CODE: dict[str, str] = {str(code): name for code, name in enumerate(METER_TYPES)}
# JSON may carry the code as an int or the type name itself.
_METER_ANY: dict[Any, str] = {
    **_METER_BY_CODE,
    **{code: name for code, name in enumerate(METER_TYPES)},
    **{name: name for name in METER_TYPES},
}
# Bound on the timestamp cache (entries per site); a year of hourly data is 8,784.
_CACHE_LIMIT = 200_000


def local_to_utc_ms(text: str, offset_hours: float) -> int:
    """Convert a site-local ``YYYY-MM-DD HH:MM:SS`` to UTC epoch milliseconds.

    Raises ValueError when ``text`` is not such a timestamp. No strptime: this runs once per
    distinct timestamp, but a backfill meets a lot of them.
    """
    if (
        len(text) != 19
        or text[4] != "-"
        or text[7] != "-"
        or text[10] not in " T"
        or text[13] != ":"
        or text[16] != ":"
    ):
        raise ValueError(text)
    parts = (text[0:4], text[5:7], text[8:10], text[11:13], text[14:16], text[17:19])
    if not all(p.isdigit() and p.isascii() for p in parts):
        raise ValueError(text)
    y, mo, d, h, mi, s = (int(p) for p in parts)
    # timegm does not check ranges (it happily takes month 13); check them here.
    if not (1 <= mo <= 12 and 1 <= d <= _days_in_month(y, mo) and h <= 23 and mi <= 59 and s <= 59):
        raise ValueError(text)
    return (timegm((y, mo, d, h, mi, s)) * 1000) - int(round(offset_hours * _MS_PER_HOUR))


def _days_in_month(year: int, month: int) -> int:
    if month == 2:
        leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
        return 29 if leap else 28
    return 30 if month in (4, 6, 9, 11) else 31


class ReplaySource:
    """A :class:`~gateway.sources.Source` that replays an ASHRAE CSV(.gz) or JSON array file."""

    def __init__(
        self,
        name: str,
        path: str | Path,
        speed: float | None = None,
        batch_size: int = 5000,
        site_offsets: dict[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if speed is not None and not (speed > 0):
            raise ConfigError("speed", f"{speed!r} must be > 0 (or null for as fast as possible)")
        if batch_size < 1:
            raise ConfigError("batch_size", f"{batch_size!r} must be >= 1")
        self.name = name
        self.path = Path(path)
        self.speed = speed
        self.batch_size = batch_size
        self.offsets: dict[str, float] = {**UTC_OFFSET_HOURS, **{str(k): v for k, v in (site_offsets or {}).items()}}
        self.clock = clock
        self._file_name = self.path.name
        lower = self._file_name.lower()
        self._is_json = lower.endswith(".json") or lower.endswith(".json.gz")
        # site → {local timestamp text → UTC epoch ms}
        self._ts_cache: dict[str, dict[str, int]] = {}

    def __repr__(self) -> str:
        return f"ReplaySource({self.name!r}, {str(self.path)!r}, speed={self.speed!r})"

    # -- the Source seam -------------------------------------------------------------------

    def batches(self, position: Any, stop: threading.Event) -> Iterator[Batch]:
        """Yield batches from ``position`` (lines or messages consumed; None = start) on."""
        start = int(position or 0)
        if start < 0:
            raise ValueError(f"position: {position!r} must be >= 0")
        if self._is_json:
            groups = self._json_groups(start)
        else:
            groups = self._csv_groups(start)
        yield from self._paced(groups, stop)

    # -- pacing ----------------------------------------------------------------------------

    def _paced(self, groups: Iterator[tuple[Batch, int | None]], stop: threading.Event) -> Iterator[Batch]:
        """Yield each batch once its data time (``key``, epoch ms) is due at ``speed``."""
        speed = self.speed
        wall0: float | None = None
        key0 = 0
        for batch, key in groups:
            if stop.is_set():
                return
            if speed is not None and key is not None:
                if wall0 is None:
                    wall0, key0 = self.clock(), key
                else:
                    delay = wall0 + (key - key0) / 1000.0 / speed - self.clock()
                    if delay > 0 and stop.wait(delay):
                        return
            yield batch

    # -- CSV -------------------------------------------------------------------------------

    def _open_text(self) -> io.TextIOBase:
        if self._file_name.lower().endswith(".gz"):
            return gzip.open(self.path, "rt", encoding="utf-8-sig", newline="")
        return open(self.path, encoding="utf-8-sig", newline="")

    def _csv_groups(self, start: int) -> Iterator[tuple[Batch, int | None]]:
        """Parse the CSV from data line ``start`` on; yield (batch, pacing key) pairs."""
        name = self.name
        file_name = self._file_name
        pacing = self.speed is not None
        batch_size = self.batch_size
        meters = _METER_BY_CODE
        offsets = self.offsets
        site_cache = self._ts_cache
        with self._open_text() as f:
            header_line = f.readline()
            if not header_line:
                return
            header = next(csv.reader([header_line]))
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise ConfigError("path", f"{self.path}: no column {', '.join(missing)} in the header")
            ncols = len(header)
            ib, im, it, iv, isite = (header.index(c) for c in REQUIRED_COLUMNS)
            # Skip what was already consumed: whole lines, no CSV parsing.
            if start:
                deque(itertools.islice(f, start), maxlen=0)
            # Tap the lines the csv reader takes, to quote a rejected row exactly as it was.
            last = [""]

            def tap(lines: Any) -> Iterator[str]:
                for line in lines:
                    last[0] = line
                    yield line

            reader = csv.reader(tap(f))
            readings: list[Reading] = []
            rejected: list[Rejected] = []
            done = 0  # data lines consumed by the reader since ``start``, up to the last full row
            rows = 0  # rows in the current batch (readings + rejected)
            cur_key: int | None = None  # pacing key (local naive epoch ms) of the current batch
            cur_text: str | None = None
            for row in reader:
                if pacing:
                    text = row[it] if len(row) > it else None
                    if text != cur_text and rows and text is not None:
                        yield Batch(readings, rejected, start + done), cur_key
                        readings, rejected, rows = [], [], 0
                        cur_key = None
                    cur_text = text
                rows += 1
                reason = None
                if len(row) != ncols:
                    reason = f"columns: {len(row)} instead of {ncols}"
                else:
                    building = row[ib]
                    meter = meters.get(row[im])
                    site = row[isite]
                    cache = site_cache.get(site)
                    if cache is None or len(cache) > _CACHE_LIMIT:
                        cache = site_cache[site] = {} if site in offsets else None  # type: ignore[assignment]
                    text = row[it]
                    ts = cache.get(text) if cache is not None else None
                    raw_value = row[iv]
                    if meter is None:
                        reason = f"meter: {row[im]!r} is not a meter code 0..3"
                    elif not building:
                        reason = "building_id: empty"
                    elif cache is None:
                        reason = "site_id: empty" if not site else f"site_id: {site!r} has no UTC offset"
                    elif not raw_value:
                        reason = "meter_reading: empty"
                    if reason is None and ts is None:
                        try:
                            ts = cache[text] = local_to_utc_ms(text, offsets[site])  # type: ignore[index]
                        except ValueError:
                            reason = f"timestamp: {text!r} is not a valid YYYY-MM-DD HH:MM:SS"
                    if reason is None:
                        try:
                            value = float(raw_value)
                        except ValueError:
                            reason = f"meter_reading: {raw_value!r} is not a number"
                        else:
                            readings.append(Reading(site, building, meter, ts, value, name))  # type: ignore[arg-type]
                            if pacing and cur_key is None:
                                # The local time as written: the order the file is sorted in.
                                cur_key = ts + int(round(offsets[site] * _MS_PER_HOUR))  # type: ignore[operator]
                done = reader.line_num
                if reason is not None:
                    line_no = start + done + 1  # + 1: the header is line 1
                    rejected.append(Rejected(reason, last[0].rstrip("\r\n"), name, f"{file_name}:{line_no}"))
                if rows >= batch_size:
                    yield Batch(readings, rejected, start + done), cur_key
                    readings, rejected, rows = [], [], 0
                    cur_key = None
            if rows:
                yield Batch(readings, rejected, start + done), cur_key

    # -- JSON ------------------------------------------------------------------------------

    def _json_groups(self, start: int) -> Iterator[tuple[Batch, int | None]]:
        """Parse the JSON array; yield (batch, pacing key) pairs from message ``start`` on."""
        try:
            with self._open_text() as f:
                messages = json.load(f)
            if not isinstance(messages, list):
                raise ValueError("the file is not a JSON array")
        except (ValueError, OSError) as exc:  # json.JSONDecodeError is a ValueError
            # A broken file is quarantined, not fatal. The position does not move, so a fixed
            # file is read in full on the next start (nothing lost; the reject may repeat).
            yield Batch([], [Rejected(f"json: {exc}", "", self.name, self._file_name)], start), None
            return
        pacing = self.speed is not None
        readings: list[Reading] = []
        rejected: list[Rejected] = []
        rows = 0
        cur_key: int | None = None
        for i in range(start, len(messages)):
            msg = messages[i]
            result = self._parse_message(msg)
            if isinstance(result, str):
                raw = json.dumps(msg, separators=(",", ":"), default=str)
                rejected_row = Rejected(result, raw, self.name, f"{self._file_name}[{i}]")
                key = None
            else:
                rejected_row = None
                key = result.ts
            if pacing and rows and key is not None and cur_key is not None and key != cur_key:
                yield Batch(readings, rejected, i), cur_key
                readings, rejected, rows, cur_key = [], [], 0, None
            rows += 1
            if rejected_row is None:
                readings.append(result)  # type: ignore[arg-type]
                if cur_key is None:
                    cur_key = key
            else:
                rejected.append(rejected_row)
            if rows >= self.batch_size:
                yield Batch(readings, rejected, i + 1), cur_key
                readings, rejected, rows, cur_key = [], [], 0, None
        if rows:
            yield Batch(readings, rejected, len(messages)), cur_key

    def _parse_message(self, msg: Any) -> Reading | str:
        """One JSON message → a Reading, or the reason it is not one."""
        if not isinstance(msg, dict):
            return "message: not a JSON object"
        values = []
        for key, alias in (("building_id", "building"), ("site_id", "site"), ("meter", "meter"),
                           ("timestamp", "ts"), ("meter_reading", "value")):
            v = msg.get(key, msg.get(alias))
            if v is None or v == "":
                if key == "meter_reading":
                    return "meter_reading: empty"
                return f"{key}: missing" if key not in msg and alias not in msg else f"{key}: empty"
            values.append(v)
        building, site, meter_raw, ts_raw, value_raw = values
        building = _id_text(building)
        site = _id_text(site)
        if building is None:
            return f"building_id: {values[0]!r} is not an id"
        if site is None:
            return f"site_id: {values[1]!r} is not an id"
        meter = _METER_ANY.get(meter_raw) if not isinstance(meter_raw, (bool, float)) else None
        if meter is None:
            return f"meter: {meter_raw!r} is not a meter code 0..3"
        if isinstance(ts_raw, str):
            if site not in self.offsets:
                return f"site_id: {site!r} has no UTC offset"
            try:
                ts = local_to_utc_ms(ts_raw, self.offsets[site])
            except ValueError:
                return f"timestamp: {ts_raw!r} is not a valid YYYY-MM-DD HH:MM:SS"
        elif isinstance(ts_raw, int) and not isinstance(ts_raw, bool):
            ts = ts_raw
        elif isinstance(ts_raw, float) and ts_raw.is_integer():
            ts = int(ts_raw)
        else:
            return f"timestamp: {ts_raw!r} is not epoch milliseconds"
        if isinstance(value_raw, bool):
            return f"meter_reading: {value_raw!r} is not a number"
        try:
            value = float(value_raw)
        except (TypeError, ValueError):
            return f"meter_reading: {value_raw!r} is not a number"
        return Reading(site, building, meter, ts, value, self.name)


def _id_text(v: Any) -> str | None:
    """A building or site id as text: 1433 and "1433" both give "1433"."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, str) and v.strip():
        return v.strip()
    return None
