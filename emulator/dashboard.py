"""The dashboard: the local stand-in for the seed's QuickSight view, a web page of plots.

It is served on 127.0.0.1 by the standard library's HTTP server in a thread and shows, for the
site and building picked:

- actual against expected consumption (kWh) over time, one chart per meter type, with the
  buckets that hold readings the gateway's model flagged (``flag`` = 1) marked, and a vertical
  line where the model that scored the readings changed;
- the health of the gateway that delivers them, from the health topic: buffer depth, lag (the
  oldest unsent reading's age), ingest and delivery rates, autonomy, and the model version over
  time, its switches marked.

Where the data comes from. Consumption is read through the emulated Athena (``LocalAthena``'s
``query(sql) -> Result(columns, rows)``), never as raw rows: one query, in Athena's own SQL over the
``readings`` table, flattens and de-duplicates the readings exactly as the named queries in
``cloud/athena/`` do and sums them per site, building, meter type, gateway, model and hour. That
is one scan of the bucket and, for a fleet-day (3.4 million readings), about 57,000 rows; the
result is kept and every request is answered from it (re-aggregated to days when the span is
long). It is queried again, in the background while the previous result is served, when the
bucket's ``readings/`` objects have changed, at most every ``refresh_s``; the first query starts
when the dashboard does. Health comes from the log lines the rules engine's CloudWatch Logs action writes
under ``<root>/logs/<health log group>/`` (one JSON message a line, or a CloudWatch event whose
``message`` is one), read incrementally.

Time ranges. A building's readings can come in periods far apart (``gateway demo``: a year of
2016 replayed from the sample, then a few minutes of today from the live Modbus polls). The hours
of the selection are split into *periods* wherever more than ``GAP_MS`` (30 days) passes without a
reading, and the page offers a range for each: ``all``, each period (``period-<ms>``, by its first
hour), and the last 24 hours and 7 days of data (``24h``, ``7d``, ending at the latest reading).
The default is the period holding the most readings. ``all`` draws the periods side by side with
the gaps between them collapsed into marked axis breaks, not empty space. The bucket (hour or day)
follows the span drawn (the gaps left out), not the whole data. Periods come from the cached
hourly aggregate (per selection, once per query result), so a range costs no query.

The page (``dashboard_static/``) is plain HTML with a small script that draws SVG from the JSON
endpoints: no library, no CDN, nothing from the network. Every drawn point carries its values in
``data-*`` attributes, so a test (and a curious user) can read the charts back.

Endpoints: ``/api/buildings`` (sites, buildings, meter types, gateways), ``/api/consumption?site=
&building=&range=`` (building empty: the whole site; range empty: the default period),
``/api/health?thing=`` (thing empty: every gateway's latest health and the first gateway's series).
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlparse

import click

from emulator import cfn

log = logging.getLogger(__name__)

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
# Longer spans than this are drawn in daily buckets, so a chart never holds more than ~1,500 points.
HOURLY_SPAN_MS = 62 * DAY_MS
# More than this without a reading splits a selection's readings into periods (see the module doc).
GAP_MS = 30 * DAY_MS
# The ranges ending at the latest reading, by id: (label, length).
RECENT_RANGES = {"24h": ("last 24 h", DAY_MS), "7d": ("last 7 days", 7 * DAY_MS)}
# Health points drawn per gateway at most (the latest are kept).
MAX_HEALTH_POINTS = 2000
HEALTH_LOG_GROUP = "/metergateway/health"

# The readings flattened and de-duplicated as cloud/athena/high_resolution.sql does (the scored
# copy, then the first received, of each (meter, ts)), negative values dropped, site 0
# electricity converted from kBTU to kWh (its expected value too: the model predicts in the
# meter's unit), summed per hour. Athena (Trino) SQL: the local Athena transpiles it for DuckDB.
HOURLY_SQL = """
WITH flat AS (
    SELECT
        m.site,
        m.thing,
        m.kind,
        m.model,
        m.received_ms,
        element_at(r, 1) AS meter,
        CAST(element_at(r, 2) AS bigint) AS ts,
        CAST(element_at(r, 3) AS double) AS value,
        CAST(element_at(r, 4) AS double) AS expected,
        CAST(element_at(r, 5) AS double) AS score,
        element_at(r, 6) IN ('true', '1') AS flag
    FROM readings AS m
    CROSS JOIN UNNEST(m.readings) AS t (r)
    WHERE m.kind IN ('raw', 'scored')
),
ranked AS (
    SELECT
        flat.*,
        row_number() OVER (PARTITION BY meter, ts ORDER BY kind DESC, received_ms) AS copy_no
    FROM flat
),
kept AS (
    SELECT
        site,
        thing,
        model,
        split_part(meter, ':', 1) AS building,
        split_part(meter, ':', 2) AS meter_type,
        ts,
        CASE WHEN site = '0' AND split_part(meter, ':', 2) = 'electricity'
            THEN 0.29307107 ELSE 1.0 END AS unit,
        value,
        expected,
        score,
        flag
    FROM ranked
    WHERE copy_no = 1 AND value >= 0
)
SELECT
    site,
    building,
    meter_type,
    thing,
    model,
    ts - ts % 3600000 AS hour_ms,
    count(*) AS readings,
    sum(value * unit) AS kwh,
    sum(expected * unit) AS expected_kwh,
    count(expected) AS scored,
    count_if(flag) AS flagged,
    max(score) AS max_score,
    min(ts) AS first_ts,
    max(ts) AS last_ts
FROM kept
GROUP BY site, building, meter_type, thing, model, ts - ts % 3600000
"""


class DashboardError(Exception):
    """The dashboard cannot start or cannot read its data (the message says which and where)."""


class RangeError(DashboardError, ValueError):
    """A request named a time range that does not exist (a 400: the caller's to fix)."""


# ---------------------------------------------------------------------------------------- values

def _text(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v)
    return s if s != "" else None


def _int(v: Any) -> int | None:
    s = _text(v)
    return None if s is None else int(float(s))


def _float(v: Any) -> float | None:
    s = _text(v)
    if s is None:
        return None
    f = float(s)
    return None if f != f else f  # NaN: no value


def _path(obj: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return obj


def _natural(s: str) -> tuple:
    """Sort "2" before "10"."""
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


# ---------------------------------------------------------------------------------------- consumption

@dataclass
class Bucket:
    """One (site, building, meter type, gateway, model, hour) row of the hourly query."""

    site: str
    building: str
    meter_type: str
    thing: str | None
    model: str | None
    hour_ms: int
    readings: int
    kwh: float
    expected_kwh: float | None
    scored: int
    flagged: int
    max_score: float | None
    first_ts: int
    last_ts: int


@dataclass
class Snapshot:
    """The hourly aggregate of every reading, as one query returned it."""

    buckets: list[Bucket]
    query_ms: float
    taken_at: float
    signature: Any
    wall_ms: float = field(default_factory=lambda: time.time() * 1000)
    by_site: dict[str, list[Bucket]] = field(default_factory=dict)

    _selections: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for b in self.buckets:
            self.by_site.setdefault(b.site, []).append(b)

    def warm_like(self, other: "Snapshot") -> None:
        """Compute the selections and views ``other`` computed (those the page asked for)."""
        for (site, building), sel in list(other._selections.items()):
            mine = self.selection(site, building or None)
            for range_id in list(sel._views):
                mine.view(range_id)

    def selection(self, site: str, building: str | None) -> "Selection":
        """The buckets of one site (or one of its buildings) with their periods, made once per
        snapshot (a race makes it twice, harmlessly)."""
        key = (site, building or "")
        sel = self._selections.get(key)
        if sel is None:
            rows = [b for b in self.by_site.get(site, []) if not building or b.building == building]
            sel = self._selections[key] = Selection(rows)
        return sel


@dataclass
class Period:
    """Hours with readings no more than GAP_MS apart: ``first_ms`` and ``last_ms`` are the first
    and last hour's start."""

    first_ms: int
    last_ms: int
    readings: int

    @property
    def end_ms(self) -> int:
        return self.last_ms + HOUR_MS


def periods_of(hours: list[int], readings: list[int]) -> list[Period]:
    """Split sorted, distinct hours (with the readings in each) where the gap exceeds GAP_MS."""
    out: list[Period] = []
    for h, n in zip(hours, readings):
        if out and h - out[-1].last_ms <= GAP_MS:
            out[-1].last_ms, out[-1].readings = h, out[-1].readings + n
        else:
            out.append(Period(h, h, n))
    return out


def _day(ms: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ms / 1000))


class Selection:
    """One selection's buckets sorted by hour, its hours, and its periods."""

    def __init__(self, rows: list[Bucket]):
        self.rows = sorted(rows, key=lambda b: b.hour_ms)
        self.row_hours = [b.hour_ms for b in self.rows]
        per_hour: dict[int, int] = {}
        for b in self.rows:
            per_hour[b.hour_ms] = per_hour.get(b.hour_ms, 0) + b.readings
        self.hours = list(per_hour)  # sorted, as the rows are
        self.cumulative = [0]
        for h in self.hours:
            self.cumulative.append(self.cumulative[-1] + per_hour[h])
        self.periods = periods_of(self.hours, [per_hour[h] for h in self.hours])
        self._views: dict[str, dict] = {}
        self._ranges: list[dict] | None = None

    def readings_between(self, lo: int, hi: int) -> int:
        i, j = bisect.bisect_left(self.hours, lo), bisect.bisect_left(self.hours, hi)
        return self.cumulative[j] - self.cumulative[i]

    def ranges(self) -> list[dict]:
        """The ranges the page offers: ``[{id, label, from_ms, to_ms, readings}]``, ``to_ms``
        exclusive; a period of its own only when there are several."""
        if self._ranges is None:
            self._ranges = self._make_ranges()
        return self._ranges

    def _make_ranges(self) -> list[dict]:
        if not self.periods:
            return []
        first, end = self.periods[0].first_ms, self.periods[-1].end_ms
        out = [{"id": "all", "label": "all", "from_ms": first, "to_ms": end,
                "readings": self.cumulative[-1]}]
        if len(self.periods) > 1:
            for p in self.periods:
                last_day = _day(p.last_ms)
                label = _day(p.first_ms) if last_day == _day(p.first_ms) else f"{_day(p.first_ms)} – {last_day}"
                out.append({"id": f"period-{p.first_ms}", "label": label, "from_ms": p.first_ms,
                            "to_ms": p.end_ms, "readings": p.readings})
        for rid, (label, length) in RECENT_RANGES.items():
            lo = max(first, end - length)
            out.append({"id": rid, "label": label, "from_ms": lo, "to_ms": end,
                        "readings": self.readings_between(lo, end)})
        return out

    def default_range(self) -> str:
        """The period holding the most readings (the later one on a tie), or ``all``."""
        if len(self.periods) < 2:
            return "all"
        best = max(self.periods, key=lambda p: (p.readings, p.first_ms))
        return f"period-{best.first_ms}"

    def window(self, range_id: str | None) -> tuple[str, int, int]:
        """``(range id shown, from_ms, to_ms)`` for a range id: empty gives the default; a
        period id names the period holding its time (so it survives the period growing), and one
        no period holds gives the default."""
        ranges = {r["id"]: r for r in self.ranges()}
        if not ranges:
            return "all", 0, 0
        rid = range_id or self.default_range()
        if rid.startswith("period-") and rid not in ranges:
            ms = int(rid[len("period-"):])
            held = [p for p in self.periods if p.first_ms <= ms < p.end_ms]
            rid = f"period-{held[0].first_ms}" if held and len(self.periods) > 1 else self.default_range()
        r = ranges.get(rid) or ranges[self.default_range()]
        return r["id"], r["from_ms"], r["to_ms"]

    def view(self, range_id: str | None) -> dict:
        """The charts' data for a range (see Consumption.consumption), computed once per range
        and snapshot: the page asks for the same every refresh."""
        shown, lo, hi = self.window(range_id)
        got = self._views.get(shown)
        if got is None:
            got = self._views[shown] = self._view(shown, lo, hi)
        return got

    def _view(self, shown: str, lo: int, hi: int) -> dict:
        rows = self.rows_between(lo, hi)
        parts = self.segments(lo, hi)
        span = sum(b - a for a, b in parts) - HOUR_MS * len(parts)  # first to last hour, gaps left out
        step = HOUR_MS if span <= HOURLY_SPAN_MS else DAY_MS
        segments = [[a - a % step, (b - HOUR_MS) - (b - HOUR_MS) % step] for a, b in parts]
        breaks = [{"from_ms": segments[i][1], "to_ms": segments[i + 1][0]} for i in range(len(segments) - 1)]
        by_type: dict[str, list[Bucket]] = {}
        for b in rows:
            by_type.setdefault(b.meter_type, []).append(b)
        return {"bucket_ms": step, "range": shown, "ranges": self.ranges(), "from_ms": lo, "to_ms": hi,
                "segments": segments, "breaks": breaks,
                "series": [_series(meter_type, by_type[meter_type], step) for meter_type in sorted(by_type)]}

    def rows_between(self, lo: int, hi: int) -> list[Bucket]:
        return self.rows[bisect.bisect_left(self.row_hours, lo):bisect.bisect_left(self.row_hours, hi)]

    def segments(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The periods' parts inside ``[lo, hi)``: what is drawn, the gaps between them left out."""
        return [(max(p.first_ms, lo), min(p.end_ms, hi)) for p in self.periods
                if p.first_ms < hi and p.end_ms > lo]


def _series(meter_type: str, mine: list[Bucket], step: int) -> dict:
    """One meter type's chart: its buckets summed per ``step``, its models and their switches."""
    points: dict[int, list] = {}
    models: dict[str, list[int]] = {}
    things: set[str] = set()
    for b in mine:
        key = b.hour_ms - b.hour_ms % step
        p = points.setdefault(key, [key, 0.0, None, 0, 0, None])
        p[1] += b.kwh
        if b.expected_kwh is not None:
            p[2] = (p[2] or 0.0) + b.expected_kwh
        p[3] += b.readings
        p[4] += b.flagged
        if b.max_score is not None:
            p[5] = b.max_score if p[5] is None else max(p[5], b.max_score)
        if b.model:
            span = models.setdefault(b.model, [b.first_ts, b.last_ts])
            span[0], span[1] = min(span[0], b.first_ts), max(span[1], b.last_ts)
        if b.thing:
            things.add(b.thing)
    ordered = sorted(models.items(), key=lambda kv: kv[1][0])
    switches = [{"ts": span[0], "from": ordered[i - 1][0], "to": model}
                for i, (model, span) in enumerate(ordered) if i > 0]
    return {
        "meter_type": meter_type, "unit": "kWh", "things": sorted(things),
        "points": [[k, round(p[1], 6), None if p[2] is None else round(p[2], 6), p[3], p[4], p[5]]
                   for k, p in sorted(points.items())],
        "models": [{"model": m, "first_ts": s[0], "last_ts": s[1]} for m, s in ordered],
        "switches": switches,
    }


def parse_range(value: str | None) -> str | None:
    """A ``range`` parameter checked: empty (the default), ``all``, ``24h``, ``7d`` or
    ``period-<ms>``; anything else is a DashboardError naming what is allowed."""
    if not value:
        return None
    if value == "all" or value in RECENT_RANGES:
        return value
    if value.startswith("period-") and value[len("period-"):].isdigit():
        return value
    raise RangeError(f"range={value!r} is not a time range: give all, {', '.join(RECENT_RANGES)} "
                     f"or period-<first hour in ms> (the ids /api/consumption lists under \"ranges\")")


class Consumption:
    """The consumption side: runs HOURLY_SQL through the Athena and answers from its result.

    ``signature()`` says whether the data changed (by default: the size and time of the objects
    under the bucket's ``readings/`` when the Athena tells its root and bucket, else nothing, and
    the result is refreshed every ``refresh_s``).
    """

    def __init__(self, athena: Any, *, refresh_s: float = 10.0,
                 signature: Callable[[], Any] | None = None, clock: Callable[[], float] = time.monotonic):
        self.athena = athena
        self.refresh_s = refresh_s
        self.clock = clock
        self.signature = signature or _bucket_signature(athena)
        self._snapshot: Snapshot | None = None
        self._lock = threading.Lock()  # one query at a time; the first requests wait for it
        self._refresher: threading.Thread | None = None
        self.queries = 0
        self.last_error: str | None = None

    def snapshot(self) -> Snapshot:
        """The latest result. The first call queries (and callers wait); afterwards a changed
        bucket is queried again in the background while the previous result is served, so a
        request never waits for a scan (a fleet-day takes seconds)."""
        snap = self._snapshot
        if snap is None:
            with self._lock:
                if self._snapshot is None:
                    self._snapshot = self._query(self.signature())
                return self._snapshot
        if self._stale(snap) and (self._refresher is None or not self._refresher.is_alive()):
            self._refresher = threading.Thread(target=self._refresh_quietly, name="dashboard-refresh", daemon=True)
            self._refresher.start()
        return snap

    def _stale(self, snap: Snapshot) -> bool:
        if self.clock() - snap.taken_at < self.refresh_s:
            return False
        sig = self.signature()
        return sig is None or sig != snap.signature

    def refresh(self) -> Snapshot:
        """Query now (waiting for a query under way first). The views the previous result served
        are computed on the new one before it is served, so the page's next request is fast."""
        with self._lock:
            snap = self._query(self.signature())
            if self._snapshot is not None:
                snap.warm_like(self._snapshot)
            self._snapshot = snap
            return snap

    def _refresh_quietly(self) -> None:
        try:
            self.refresh()
            self.last_error = None
        except DashboardError as exc:  # the previous result stays; the page shows why
            self.last_error = str(exc)
            log.warning("dashboard: %s", exc)

    def wait_refreshed(self, timeout: float = 30.0) -> bool:
        """Wait for a background refresh under way (tests, the demo)."""
        t = self._refresher
        if t is not None:
            t.join(timeout)
            return not t.is_alive()
        return True

    def _meta(self, snap: Snapshot) -> dict:
        return {"query_ms": round(snap.query_ms, 1), "as_of_ms": int(snap.wall_ms),
                "refreshing": self._refresher is not None and self._refresher.is_alive(),
                "error": self.last_error}

    def _query(self, sig: Any) -> Snapshot:
        t0 = time.perf_counter()
        try:
            result = self.athena.query(HOURLY_SQL)
        except Exception as exc:
            raise DashboardError(f"the Athena query for the consumption charts failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
        ms = (time.perf_counter() - t0) * 1000
        self.queries += 1
        cols = [c.lower() for c in result.columns]
        idx = {c: cols.index(c) for c in cols}
        buckets = []
        for row in result.rows:
            g = lambda name: row[idx[name]]  # noqa: E731
            buckets.append(Bucket(
                site=_text(g("site")) or "", building=_text(g("building")) or "",
                meter_type=_text(g("meter_type")) or "", thing=_text(g("thing")), model=_text(g("model")),
                hour_ms=_int(g("hour_ms")) or 0, readings=_int(g("readings")) or 0,
                kwh=_float(g("kwh")) or 0.0, expected_kwh=_float(g("expected_kwh")),
                scored=_int(g("scored")) or 0, flagged=_int(g("flagged")) or 0,
                max_score=_float(g("max_score")), first_ts=_int(g("first_ts")) or 0,
                last_ts=_int(g("last_ts")) or 0))
        log.info("dashboard: %d hourly rows in %.0f ms", len(buckets), ms)
        return Snapshot(buckets, ms, self.clock(), sig)

    def buildings(self) -> dict:
        snap = self.snapshot()
        sites: dict[str, dict[str, dict]] = {}
        for b in snap.buckets:
            bld = sites.setdefault(b.site, {}).setdefault(
                b.building, {"meter_types": set(), "things": set(), "readings": 0, "flagged": 0})
            bld["meter_types"].add(b.meter_type)
            if b.thing:
                bld["things"].add(b.thing)
            bld["readings"] += b.readings
            bld["flagged"] += b.flagged
        return {
            **self._meta(snap),
            "sites": [
                {"site": site, "buildings": [
                    {"building": name, "meter_types": sorted(v["meter_types"]), "things": sorted(v["things"]),
                     "readings": v["readings"], "flagged": v["flagged"]}
                    for name, v in sorted(blds.items(), key=lambda kv: _natural(kv[0]))]}
                for site, blds in sorted(sites.items(), key=lambda kv: _natural(kv[0]))],
        }

    def consumption(self, site: str, building: str | None, range_id: str | None = None) -> dict:
        """Per meter type, over the range asked for (None: the default; see the module doc):
        points ``[bucket_ms, kwh, expected_kwh, readings, flagged, max_score]``, the models that
        scored them and the switches between them. Besides: ``range`` (the id shown), ``ranges``
        (every range offered), ``from_ms``/``to_ms`` (the range, ``to_ms`` exclusive),
        ``segments`` (``[first, last]`` bucket of each period part drawn) and ``breaks`` (the
        collapsed gaps between them, ``{from_ms, to_ms}`` from one segment's last bucket to the
        next one's first)."""
        range_id = parse_range(range_id)
        snap = self.snapshot()
        sel = snap.selection(site, building)
        return {**self._meta(snap), "site": site, "building": building or "", **sel.view(range_id)}


def _bucket_signature(athena: Any) -> Callable[[], Any]:
    """Sizes and times of the objects under ``<root>/s3/<bucket>/readings/``, if the Athena says
    where that is (``root`` and ``bucket`` attributes); else a function returning None."""
    root, bucket = getattr(athena, "root", None), getattr(athena, "bucket", None)
    if root is None or bucket is None:
        return lambda: None
    # LocalAthena's bucket is an emulator.s3.LocalBucket (.path); a name will do too
    folder = getattr(bucket, "path", None) or Path(root) / "s3" / str(bucket)
    prefix = Path(folder) / "readings"

    def signature() -> Any:
        files, size, newest = 0, 0, 0
        for dirpath, _dirs, names in os.walk(prefix):
            for name in names:
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                files, size, newest = files + 1, size + st.st_size, max(newest, st.st_mtime_ns)
        return (files, size, newest)

    return signature


# ---------------------------------------------------------------------------------------- health

HEALTH_FIELDS = ("pending", "lag_s", "ingest_per_h", "delivered_per_h", "autonomy_hours")


def health_point(msg: dict) -> tuple[str, dict] | None:
    """The values the dashboard plots from one health message (gateway/greengrass.py's
    ``health()``), or None if it is not one."""
    thing = msg.get("thing")
    buffer = msg.get("buffer")
    if not isinstance(thing, str) or not isinstance(buffer, dict):
        return None
    ts = _int(msg.get("ts")) or _int(msg.get("received_ms"))
    if ts is None:
        return None
    lag = _float(buffer.get("oldest_pending_age_s"))
    return thing, {
        "ts": ts,
        "pending": _float(buffer.get("pending")),
        "lag_s": 0.0 if lag is None and buffer.get("pending") == 0 else lag,
        "ingest_per_h": _float(buffer.get("ingest_per_h")),
        "delivered_per_h": _float(buffer.get("delivered_per_h")),
        "autonomy_hours": _float(buffer.get("autonomy_hours")),
        "model": _text(_path(msg, "model", "version")),
        "connected": _path(msg, "forwarder", "connected"),
        "state": _text(msg.get("state")),
        "model_error": _text(_path(msg, "model", "last_error")),
    }


class HealthLog:
    """The health messages under ``health_dir`` (every file, recursively, JSON lines), read
    incrementally: each file is read from where the last read stopped, whole lines only."""

    def __init__(self, health_dir: str | Path):
        self.dir = Path(health_dir)
        self._offsets: dict[Path, int] = {}
        self._points: dict[str, list[dict]] = {}
        self._lock = threading.Lock()
        self.bad_lines = 0

    def _read(self) -> None:
        if not self.dir.is_dir():
            return
        for path in sorted(p for p in self.dir.rglob("*") if p.is_file()):
            start = self._offsets.get(path, 0)
            try:
                size = path.stat().st_size
                if size < start:  # rewritten: read it again
                    start = 0
                    for pts in self._points.values():
                        pts[:] = [p for p in pts if p.get("_file") != str(path)]
                if size == start:
                    continue
                with path.open("rb") as f:
                    f.seek(start)
                    data = f.read(size - start)
            except OSError as exc:
                log.warning("dashboard: cannot read %s: %s", path, exc)
                continue
            end = data.rfind(b"\n")
            if end < 0:
                continue
            self._offsets[path] = start + end + 1
            for line in data[: end + 1].splitlines():
                self._take(line, path)
        for pts in self._points.values():
            pts.sort(key=lambda p: p["ts"])
            del pts[: max(0, len(pts) - MAX_HEALTH_POINTS)]

    def _take(self, line: bytes, path: Path) -> None:
        if not line.strip():
            return
        try:
            obj = json.loads(line)
            if isinstance(obj, dict) and isinstance(obj.get("message"), str) and "buffer" not in obj:
                obj = json.loads(obj["message"])  # a CloudWatch Logs event {"timestamp", "message"}
        except ValueError:
            self.bad_lines += 1
            return
        got = health_point(obj) if isinstance(obj, dict) else None
        if got is None:
            self.bad_lines += 1
            return
        thing, point = got
        point["_file"] = str(path)
        self._points.setdefault(thing, []).append(point)

    def health(self, thing: str | None) -> dict:
        with self._lock:
            self._read()
            things = sorted(self._points)
            latest = {t: _public(self._points[t][-1]) for t in things}
            chosen = thing if thing in self._points else (things[0] if things else None)
            points = [_public(p) for p in self._points.get(chosen, [])] if chosen else []
        switches, segments = [], []
        for p in points:
            if p["model"] is None:
                continue
            if segments and segments[-1]["model"] == p["model"]:
                segments[-1]["last_ts"] = p["ts"]
                continue
            if segments:
                switches.append({"ts": p["ts"], "from": segments[-1]["model"], "to": p["model"]})
            segments.append({"model": p["model"], "first_ts": p["ts"], "last_ts": p["ts"]})
        return {"things": things, "thing": chosen or "", "latest": latest, "points": points,
                "models": segments, "switches": switches}


def _public(point: dict) -> dict:
    return {k: v for k, v in point.items() if not k.startswith("_")}


# ---------------------------------------------------------------------------------------- server

def _static_dir():
    return resources.files("emulator") / "dashboard_static"


_STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}


class _Handler(BaseHTTPRequestHandler):
    server_version = "metergateway-dashboard"
    dashboard: "Dashboard"  # set on the subclass made for each Dashboard

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base's name)
        log.debug("dashboard: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlparse(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if url.path in ("/", "/index.html"):
                return self._file("index.html")
            if url.path.startswith("/static/"):
                return self._file(url.path[len("/static/"):])
            if url.path == "/api/buildings":
                return self._json(self.dashboard.consumption.buildings())
            if url.path == "/api/consumption":
                if not q.get("site"):
                    return self._json({"error": "give ?site=<site id>"}, HTTPStatus.BAD_REQUEST)
                return self._json(self.dashboard.consumption.consumption(
                    q["site"], q.get("building") or None, q.get("range") or None))
            if url.path == "/api/health":
                return self._json(self.dashboard.health.health(q.get("thing") or None))
        except RangeError as exc:
            return self._json({"error": str(exc)}, HTTPStatus.BAD_REQUEST)
        except DashboardError as exc:
            return self._json({"error": str(exc)}, HTTPStatus.SERVICE_UNAVAILABLE)
        except BrokenPipeError:
            return None
        self.send_error(HTTPStatus.NOT_FOUND, f"no such page: {url.path}")

    def _file(self, name: str) -> None:
        path = _static_dir() / name
        kind = _STATIC_TYPES.get(Path(name).suffix)
        if "/" in name or ".." in name or kind is None or not path.is_file():
            self.send_error(HTTPStatus.NOT_FOUND, f"no such file: {name}")
            return
        self._send(path.read_bytes(), kind)

    def _json(self, obj: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        body = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
        self._send(body, "application/json", status)

    def _send(self, body: bytes, kind: str, status: HTTPStatus = HTTPStatus.OK) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)


class Dashboard:
    """The page and its JSON endpoints, served from a thread.

    ``athena``: anything with ``query(sql) -> Result(columns, rows)`` over the ``readings`` table
    (``emulator.athena.LocalAthena``); ``health_dir``: the health log group's folder.
    """

    def __init__(self, athena: Any, health_dir: str | Path, host: str = "127.0.0.1", port: int = 0,
                 *, refresh_s: float = 10.0):
        self.consumption = Consumption(athena, refresh_s=refresh_s)
        self.health = HealthLog(health_dir)
        self.host, self.port = host, port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise DashboardError("the dashboard is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> str:
        """Serve; returns the page's URL (the port chosen when ``port`` is 0)."""
        if self._server is not None:
            return self.url
        handler = type("Handler", (_Handler,), {"dashboard": self})
        try:
            self._server = ThreadingHTTPServer((self.host, self.port), handler)
        except OSError as exc:
            raise DashboardError(f"cannot serve the dashboard on {self.host}:{self.port}: {exc}") from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="dashboard", daemon=True)
        self._thread.start()
        threading.Thread(target=self._warm, name="dashboard-warm", daemon=True).start()
        log.info("dashboard at %s", self.url)
        return self.url

    def _warm(self) -> None:
        try:
            self.consumption.snapshot()
        except DashboardError as exc:  # the page's requests get the same error, with a 503
            log.warning("dashboard: %s", exc)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> "Dashboard":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------- command

def health_dir_for(root: str | Path, template_path: str | Path | None = None) -> Path:
    """``<root>/logs/<the template's health log group, without its leading slash>``: where the
    rules engine's CloudWatch Logs action writes (``<log stream>.log`` files of JSON lines)."""
    group = HEALTH_LOG_GROUP
    if template_path is not None:
        try:
            tpl = cfn.load_template(template_path)
            value = tpl["Resources"]["HealthLogGroup"]["Properties"]["LogGroupName"]
            group = str(cfn.resolve(value, template=tpl))
        except (KeyError, TypeError, OSError, cfn.TemplateError) as exc:
            log.debug("health log group from the template: %s; using %s", exc, group)
    return Path(root) / "logs" / group.strip("/")


def _default_template() -> Path:
    return Path(__file__).resolve().parents[1] / "cloud" / "analytics.yaml"


@click.command("dashboard")
@click.option("--root", required=True, type=click.Path(file_okay=False),
              help="The emulation root (s3/<bucket>/, logs/), as the demo makes it.")
@click.option("--bucket", default="metergateway-data", show_default=True, help="The data bucket's name.")
@click.option("--template", "template_path", type=click.Path(dir_okay=False, exists=True),
              help="cloud/analytics.yaml (default: the repository's).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8050, show_default=True, help="0 picks a free port.")
def command(root: str, bucket: str, template_path: str | None, host: str, port: int) -> None:
    """Serve the dashboard of an emulated cloud (its Athena and health log) until Ctrl-C."""
    from emulator.athena import LocalAthena  # the emulator extra (duckdb, sqlglot)

    template = Path(template_path) if template_path else _default_template()
    athena = LocalAthena(root, template_path=str(template), bucket=bucket)
    board = Dashboard(athena, health_dir_for(root, template), host=host, port=port)
    try:
        url = board.start()
    except DashboardError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"dashboard: {url} (Ctrl-C stops)")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        board.stop()
