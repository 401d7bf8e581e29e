"""Read readings in ASHRAE's CSV columns (CSV or CSV.GZ) into numpy columns.

One reader for training and for :mod:`gateway.model.score_file`, so both see the same rows: a
row that is cut short, carries a bad number, a negative reading or an unknown meter type is
rejected with a reason and its line number, never silently dropped or half-parsed.
Only numpy is needed (no pandas on the gateway).
"""

from __future__ import annotations

import csv
import gzip
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gateway.errors import ModelError
from gateway.model.features import WEATHER_FIELDS, local_to_utc_ms, utc_offset_ms

COLUMNS: tuple[str, ...] = (
    "building_id", "meter", "timestamp", "meter_reading", "site_id", "primary_use", "square_feet",
    "year_built", "floor_count", "air_temperature", "cloud_coverage", "dew_temperature",
    "precip_depth_1_hr", "sea_level_pressure", "wind_direction", "wind_speed", "city", "country", "state",
)  # fmt: skip
REQUIRED: tuple[str, ...] = ("building_id", "meter", "timestamp", "meter_reading", "site_id")
METADATA_COLUMNS: tuple[str, ...] = ("building_id", "site_id", "primary_use", "square_feet", "year_built", "floor_count")


@dataclass
class Table:
    """Accepted rows as columns, in file order, plus what was rejected and why."""

    header: list[str]
    lines: list[str]  # the accepted rows' raw text (no newline), for writing them back out
    line_no: np.ndarray  # 1-based line number in the file (header is line 1)
    building_id: np.ndarray  # int64
    meter: np.ndarray  # int64 0..3
    site_id: np.ndarray  # int64
    timestamp: np.ndarray  # local time, datetime64[s]
    ts_ms: np.ndarray  # UTC epoch ms, int64
    meter_reading: np.ndarray  # float64 ≥ 0
    weather: dict[str, np.ndarray]
    metadata: list[dict] = field(default_factory=list)  # first row seen of each building
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)

    def __len__(self) -> int:
        return len(self.lines)

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
            timestamp=self.timestamp[idx],
            ts_ms=self.ts_ms[idx],
            meter_reading=self.meter_reading[idx],
            weather={k: v[idx] for k, v in self.weather.items()},
            metadata=self.metadata,
            rejected=self.rejected,
        )


def _open(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _num(text: str) -> float:
    return float(text) if text else np.nan


def read(path: str | Path, progress=None) -> Table:
    """Read and check every row of ``path``. ``progress(n_lines)`` is called every 50k lines."""
    path = Path(path)
    try:
        f = _open(path)
    except OSError as exc:
        raise ModelError(f"{path}: {exc}") from exc
    with f:
        header_line = f.readline().rstrip("\r\n")
        header = next(csv.reader([header_line]))
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ModelError(f"{path}: missing columns {', '.join(missing)}")
        n_fields = len(header)
        pos = {name: header.index(name) for name in header}
        i_b, i_m, i_t, i_r, i_s = (pos[c] for c in REQUIRED)
        wpos = [(name, pos.get(name)) for name in WEATHER_FIELDS]
        mpos = [(name, pos[name]) for name in METADATA_COLUMNS if name in pos]
        has_meta = len(mpos) == len(METADATA_COLUMNS)

        # numeric columns grow in compact stdlib arrays (8 bytes a value, no object per value)
        lines: list[str] = []
        line_no = array("q")
        bid = array("q")
        met = array("q")
        site = array("q")
        stamp: list[str] = []
        value = array("d")
        wcols = {name: array("d") for name in WEATHER_FIELDS}
        seen: dict[int, dict] = {}
        rejected: list[tuple[int, str]] = []
        nan = np.nan

        for n, line in enumerate(f, start=2):
            if progress is not None and n % 50_000 == 0:
                progress(n)
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split(",") if '"' not in line else next(csv.reader([line]))
            if len(fields) != n_fields:
                rejected.append((n, f"columns: {len(fields)} instead of {n_fields}"))
                continue
            try:
                b = int(fields[i_b])
            except ValueError:
                rejected.append((n, f"building_id: {fields[i_b]!r} is not an integer"))
                continue
            try:
                m = int(fields[i_m])
            except ValueError:
                m = -1
            if not 0 <= m <= 3:
                rejected.append((n, f"meter: {fields[i_m]!r} is not a meter code 0..3"))
                continue
            try:
                s = int(fields[i_s])
            except ValueError:
                rejected.append((n, f"site_id: {fields[i_s]!r} is not an integer"))
                continue
            text = fields[i_r]
            try:
                v = float(text)
            except ValueError:
                rejected.append((n, f"meter_reading: {text!r} is not a number"))
                continue
            if not v >= 0 or v == float("inf"):
                kind = "negative" if v < 0 else "not finite"
                rejected.append((n, f"meter_reading: {text} is {kind}"))
                continue
            try:
                w = [nan if p is None else _num(fields[p]) for _, p in wpos]
            except ValueError:
                bad = next(name for name, p in wpos if p is not None and not _is_num(fields[p]))
                rejected.append((n, f"{bad}: {fields[pos[bad]]!r} is not a number"))
                continue
            ts = fields[i_t]
            if len(ts) != 19 or ts[4] != "-" or ts[10] != " ":
                rejected.append((n, f"timestamp: {ts!r} is not YYYY-MM-DD HH:MM:SS"))
                continue
            lines.append(line)
            line_no.append(n)
            bid.append(b)
            met.append(m)
            site.append(s)
            stamp.append(ts)
            value.append(v)
            for (name, _), x in zip(wpos, w):
                wcols[name].append(x)
            if has_meta and b not in seen:
                seen[b] = {name: fields[p] for name, p in mpos}

    site_arr = np.frombuffer(site, dtype=np.int64).copy()
    try:
        local = np.array(stamp, dtype="datetime64[s]")
    except ValueError:
        local = np.array([_ts_or_nat(t) for t in stamp], dtype="datetime64[s]")
    keep = ~np.isnat(local) & ~np.isnan(utc_offset_ms(site_arr))
    if not keep.all():
        for i in np.flatnonzero(~keep).tolist():
            reason = f"timestamp: {stamp[i]!r} is not a date" if np.isnat(local[i]) else f"site_id: {site[i]} has no UTC offset"
            rejected.append((line_no[i], reason))
        rejected.sort()
    idx = np.flatnonzero(keep)
    table = Table(
        header=header,
        lines=lines,
        line_no=np.frombuffer(line_no, dtype=np.int64).copy(),
        building_id=np.frombuffer(bid, dtype=np.int64).copy(),
        meter=np.frombuffer(met, dtype=np.int64).copy(),
        site_id=site_arr,
        timestamp=local,
        ts_ms=np.zeros(len(lines), dtype=np.int64),
        meter_reading=np.frombuffer(value, dtype=np.float64).copy(),
        weather={name: np.frombuffer(col, dtype=np.float64).copy() for name, col in wcols.items()},
        metadata=list(seen.values()),
        rejected=rejected,
    )
    if not keep.all():
        table = table.take(idx)
    table.ts_ms = local_to_utc_ms(table.site_id, table.timestamp)
    return table


def _is_num(text: str) -> bool:
    try:
        _num(text)
    except ValueError:
        return False
    return True


def _ts_or_nat(text: str):
    try:
        return np.datetime64(text, "s")
    except ValueError:
        return np.datetime64("NaT")
