"""The one feature module shared by training and inference, so the two cannot drift.

A feature row describes one reading: the building's metadata, the site's weather at that hour,
the local calendar and the meter type. ``building_id`` is never a feature: it does not generalise
to buildings the model has not seen, and it would bloat the ONNX graph.

Everything is vectorised with numpy; missing values stay NaN (LightGBM routes them itself).
Only numpy and ``holidays`` are needed here, so the gateway can featurize without pandas.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from gateway.errors import ModelError
from gateway.sites import COUNTRY, UTC_OFFSET_HOURS
from gateway.sources.weather import WEATHER_FIELDS

#: ASHRAE primary uses; a building's code is its index here (unknown → NaN). Append only.
PRIMARY_USES: tuple[str, ...] = (
    "Education",
    "Lodging/residential",
    "Office",
    "Entertainment/public assembly",
    "Other",
    "Retail",
    "Parking",
    "Public services",
    "Warehouse/storage",
    "Food sales and service",
    "Religious worship",
    "Healthcare",
    "Utility",
    "Technology/science",
    "Manufacturing/industrial",
    "Services",
)
PRIMARY_USE_CODE: dict[str, int] = {name: code for code, name in enumerate(PRIMARY_USES)}

#: The model's inputs, in column order. The ONNX metadata must list exactly these. The weather
#: inputs are the feed's :data:`~gateway.sources.weather.WEATHER_FIELDS`, in the order the
#: shipped models were trained with (not the feed's).
FEATURE_NAMES: tuple[str, ...] = (
    "meter",
    "site_id",
    "primary_use",
    "log_square_feet",
    "year_built",
    "floor_count",
    "air_temperature",
    "dew_temperature",
    "cloud_coverage",
    "precip_depth_1_hr",
    "sea_level_pressure",
    "wind_direction",
    "wind_speed",
    "hour",
    "weekday",
    "month",
    "holiday",
)
FEATURE_INDEX: dict[str, int] = {name: i for i, name in enumerate(FEATURE_NAMES)}

_MS_PER_HOUR = 3_600_000
_MS_PER_DAY = 86_400_000

# Site tables indexed by integer site id (sites are "0".."15"; unknown sites get NaN offsets).
_N_SITES = 1 + max(int(s) for s in UTC_OFFSET_HOURS)
_SITE_OFFSET_MS = np.full(_N_SITES, np.nan)
for _site, _hours in UTC_OFFSET_HOURS.items():
    _SITE_OFFSET_MS[int(_site)] = _hours * _MS_PER_HOUR
_COUNTRIES: tuple[str, ...] = tuple(sorted(set(COUNTRY.values())))
_SITE_COUNTRY = np.full(_N_SITES, -1, dtype=np.int64)
for _site, _country in COUNTRY.items():
    _SITE_COUNTRY[int(_site)] = _COUNTRIES.index(_country)


def _float(value) -> float:
    if isinstance(value, str):
        return float(value) if value.strip() else np.nan
    return np.nan if value is None else float(value)


@dataclass(frozen=True)
class Buildings:
    """Building metadata as numpy arrays indexed by integer building id.

    ``known[b]`` tells whether building ``b`` is in the metadata; the other arrays hold
    NaN (or -1 for ``site``) for unknown ids.
    """

    known: np.ndarray  # bool
    site: np.ndarray  # int64, -1 unknown
    primary_use: np.ndarray  # float64 code, NaN unknown
    log_square_feet: np.ndarray
    year_built: np.ndarray
    floor_count: np.ndarray

    @classmethod
    def from_csv(cls, path: str | Path) -> Buildings:
        """Load the columns of ASHRAE's ``building_metadata.csv`` (extra columns are ignored)."""
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        except OSError as exc:
            raise ModelError(f"building metadata {path}: {exc}") from exc
        return cls.from_records(rows, where=str(path))

    @classmethod
    def from_records(cls, rows: list[dict], where: str = "building metadata") -> Buildings:
        """Build from dicts with ``building_id, site_id, primary_use, square_feet, year_built,
        floor_count`` (strings as read from a CSV, or numbers; empty or NaN means missing)."""
        if not rows:
            raise ModelError(f"{where}: no rows")
        missing = {"building_id", "site_id", "primary_use", "square_feet", "year_built", "floor_count"} - set(rows[0])
        if missing:
            raise ModelError(f"{where}: missing columns {', '.join(sorted(missing))}")
        try:
            ids = np.array([int(r["building_id"]) for r in rows], dtype=np.int64)
            if (ids < 0).any():
                raise ValueError("negative building_id")
            n = int(ids.max()) + 1
            out = cls(
                known=np.zeros(n, dtype=bool),
                site=np.full(n, -1, dtype=np.int64),
                primary_use=np.full(n, np.nan),
                log_square_feet=np.full(n, np.nan),
                year_built=np.full(n, np.nan),
                floor_count=np.full(n, np.nan),
            )
            out.known[ids] = True
            out.site[ids] = [int(r["site_id"]) for r in rows]
            out.primary_use[ids] = [PRIMARY_USE_CODE.get(r["primary_use"], np.nan) for r in rows]
            sqft = np.array([_float(r["square_feet"]) for r in rows])
            with np.errstate(divide="ignore", invalid="ignore"):
                out.log_square_feet[ids] = np.where(sqft > 0, np.log(sqft), np.nan)
            out.year_built[ids] = [_float(r["year_built"]) for r in rows]
            out.floor_count[ids] = [_float(r["floor_count"]) for r in rows]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{where}: {exc}") from exc
        return out

    def ids(self, building_ids) -> np.ndarray:
        """Integer ids from ints, integral floats or digit strings; anything else becomes -1."""
        arr = np.asarray(building_ids)
        if arr.dtype.kind in "iu":
            return arr.astype(np.int64, copy=False)
        out = np.full(arr.shape, -1, dtype=np.int64)
        if arr.dtype.kind == "f":
            ok = np.isfinite(arr) & (arr == np.round(arr)) & (arr >= 0)
            out[ok] = arr[ok].astype(np.int64)
            return out
        text = arr.astype(str)
        ok = np.char.isdigit(text) & (np.char.str_len(text) <= 18)
        out[ok] = text[ok].astype(np.int64)
        return out

    def is_known(self, building_ids) -> np.ndarray:
        """Boolean mask: which ids are in the metadata."""
        ids = self.ids(building_ids)
        ok = (ids >= 0) & (ids < len(self.known))
        ok[ok] = self.known[ids[ok]]
        return ok

    def site_of(self, building_ids) -> np.ndarray:
        """Site id per building (-1 when unknown)."""
        ids = self.ids(building_ids)
        ok = self.is_known(ids)
        out = np.full(ids.shape, -1, dtype=np.int64)
        out[ok] = self.site[ids[ok]]
        return out


def utc_offset_ms(site_ids: np.ndarray) -> np.ndarray:
    """UTC offset of each site in ms (NaN for a site without one)."""
    site_ids = np.asarray(site_ids, dtype=np.int64)
    ok = (site_ids >= 0) & (site_ids < _N_SITES)
    out = np.full(site_ids.shape, np.nan)
    out[ok] = _SITE_OFFSET_MS[site_ids[ok]]
    return out


@lru_cache(maxsize=256)
def _holiday_days(country: str, year: int) -> np.ndarray:
    import holidays  # imported lazily: building its tables is the slow part

    days = holidays.country_holidays(country, years=year)
    return np.array(sorted(days.keys()), dtype="datetime64[D]").astype(np.int64)


def _is_holiday(country_idx: np.ndarray, local_day: np.ndarray) -> np.ndarray:
    """Whether each local day (days since epoch) is a public holiday in its country."""
    out = np.zeros(local_day.shape, dtype=bool)
    if local_day.size == 0:
        return out
    years = local_day.astype("datetime64[D]").astype("datetime64[Y]").astype(np.int64) + 1970
    for c in np.unique(country_idx):
        if c < 0:
            continue
        sel = country_idx == c
        yrs = np.unique(years[sel])
        table = np.concatenate([_holiday_days(_COUNTRIES[c], int(y)) for y in yrs])
        out[sel] = np.isin(local_day[sel], table)
    return out


def calendar(site_ids: np.ndarray, ts_ms: np.ndarray) -> dict[str, np.ndarray]:
    """Local hour, weekday (Monday 0), month (1..12) and holiday flag of UTC ``ts_ms`` at each site."""
    site_ids = np.asarray(site_ids, dtype=np.int64)
    offset = utc_offset_ms(site_ids)
    ok = ~np.isnan(offset)
    local_ms = np.asarray(ts_ms, dtype=np.int64) + np.where(ok, offset, 0).astype(np.int64)
    day = local_ms // _MS_PER_DAY
    hour = ((local_ms // _MS_PER_HOUR) % 24).astype(np.float64)
    weekday = ((day + 3) % 7).astype(np.float64)  # 1970-01-01 was a Thursday
    month = (day.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64) % 12 + 1).astype(np.float64)
    country = np.where(ok, _SITE_COUNTRY[np.clip(site_ids, 0, _N_SITES - 1)], -1)
    holiday = _is_holiday(country, day).astype(np.float64)
    for a in (hour, weekday, month, holiday):
        a[~ok] = np.nan
    return {"hour": hour, "weekday": weekday, "month": month, "holiday": holiday}


def featurize(
    buildings: Buildings,
    building_ids,
    meter_codes,
    ts_ms,
    weather: dict[str, np.ndarray],
) -> np.ndarray:
    """The feature matrix (float32, columns :data:`FEATURE_NAMES`) of a batch of readings.

    ``building_ids``: integer ids (or digit strings); every one must be in ``buildings``
    (filter with :meth:`Buildings.is_known` first). ``meter_codes``: 0..3. ``ts_ms``: UTC epoch ms.
    ``weather``: the site's weather per reading, keyed by :data:`WEATHER_FIELDS`; a missing key
    or NaN means unknown.
    """
    ids = buildings.ids(building_ids)
    n = ids.shape[0]
    known = buildings.is_known(ids)
    if not known.all():
        bad = np.unique(np.asarray(building_ids)[~known])[:5]
        raise ModelError(f"unknown building id(s) {bad.tolist()}")
    X = np.empty((n, len(FEATURE_NAMES)), dtype=np.float32)
    site = buildings.site[ids]
    X[:, FEATURE_INDEX["meter"]] = np.asarray(meter_codes)
    X[:, FEATURE_INDEX["site_id"]] = site
    X[:, FEATURE_INDEX["primary_use"]] = buildings.primary_use[ids]
    X[:, FEATURE_INDEX["log_square_feet"]] = buildings.log_square_feet[ids]
    X[:, FEATURE_INDEX["year_built"]] = buildings.year_built[ids]
    X[:, FEATURE_INDEX["floor_count"]] = buildings.floor_count[ids]
    for name in WEATHER_FIELDS:
        values = weather.get(name)
        X[:, FEATURE_INDEX[name]] = np.nan if values is None else np.asarray(values, dtype=np.float64)
    for name, values in calendar(site, ts_ms).items():
        X[:, FEATURE_INDEX[name]] = values
    return X
