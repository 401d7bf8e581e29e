"""Site weather: replay the weather feed's messages and look up the weather a reading saw.

A weather message is one site's hour (the format of ``data/sample/weather.json``, a JSON array)::

    {"site_id": 15, "timestamp": 1543798800000, "air_temperature": -1.0, "cloud_coverage": null,
     "dew_temperature": -2.0, "precip_depth_1_hr": 0.0, "sea_level_pressure": 1021.5,
     "wind_direction": 340.0, "wind_speed": 2.1}

``timestamp`` is UTC epoch milliseconds; a missing or null field is NaN.

**From IoT Core** (under Greengrass): the same messages arrive on ``dt/weather/<site>/observations``,
one object or a JSON array of them per MQTT message, UTF-8, at most 128 KB.
:func:`parse_observations` checks them: ``site_id`` may be left out (the topic's ``<site>`` is
used) but, when given, must equal the topic's site; each unusable message is rejected with its
reason, and the others of the same payload are kept.

:class:`LatestWeather` keeps each site's recent messages as sorted numpy arrays and answers, for
many readings at once, "the site's latest weather at or before this time", NaN when there is none
or it is older than ``max_age_ms``. Its output feeds :func:`gateway.model.features`' ``weather``
argument (same field names).
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

__all__ = ["WEATHER_FIELDS", "WeatherReplay", "LatestWeather", "DEFAULT_MAX_AGE_MS", "parse_observations"]

#: The weather fields of a message, in the feed's order. The one list of them: the ASHRAE readings'
#: weather columns (:mod:`gateway.ashrae`) and the model's weather features are these.
WEATHER_FIELDS: tuple[str, ...] = (
    "air_temperature",
    "cloud_coverage",
    "dew_temperature",
    "precip_depth_1_hr",
    "sea_level_pressure",
    "wind_direction",
    "wind_speed",
)
#: Weather older than this (3 h) is treated as missing.
DEFAULT_MAX_AGE_MS = 3 * 3600 * 1000
_DAY_MS = 86_400_000


class WeatherReplay:
    """The messages of a weather JSON array file, in time order.

    ``messages`` holds the valid ones (``site_id`` as text, fields as float or NaN); ``rejected``
    holds ``(index, reason)`` for those without a usable site or timestamp, and for a message that
    cannot be decoded (nested too deeply, say): it costs that message, not the file. A file cut
    short keeps the messages before the cut (the cut is the last rejection). A file that is not a
    JSON array raises ValueError.
    """

    def __init__(self, path: str | Path):
        from gateway.ashrae import json_items  # here: gateway.ashrae imports this module

        self.path = Path(path)
        opener = gzip.open if self.path.name.lower().endswith(".gz") else open
        with opener(self.path, "rt", encoding="utf-8", errors="replace") as f:
            text = f.read()
        self.messages: list[dict[str, Any]] = []
        self.rejected: list[tuple[int, str]] = []
        for i, (_, _, msg, reason, broken) in enumerate(json_items(text)):
            if broken and i == 0 and reason == "json: the file is not a JSON array":
                raise ValueError(f"{self.path}: not a JSON array of weather messages")
            parsed = reason if reason is not None else parse_message(msg)
            if isinstance(parsed, str):
                self.rejected.append((i, parsed))
            else:
                self.messages.append(parsed)
        self.messages.sort(key=lambda m: m["timestamp"])  # stable: feed order within a timestamp
        self._cursor = 0

    def __len__(self) -> int:
        return len(self.messages)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.messages)

    def sites(self) -> list[str]:
        return sorted({m["site_id"] for m in self.messages}, key=lambda s: (len(s), s))

    def between(self, start_ms: int, end_ms: int) -> list[dict[str, Any]]:
        """Messages with ``start_ms <= timestamp < end_ms``."""
        return [m for m in self.messages if start_ms <= m["timestamp"] < end_ms]

    def advance(self, table: LatestWeather, until_ms: int) -> int:
        """Feed ``table`` the messages up to and including ``until_ms`` not fed yet; return how many.

        Call it before scoring each replayed batch with the batch's newest timestamp, and the
        table knows exactly the weather that had been published by then.
        """
        start = self._cursor
        end = start
        while end < len(self.messages) and self.messages[end]["timestamp"] <= until_ms:
            end += 1
        if end > start:
            table.update(self.messages[start:end])
        self._cursor = end
        return end - start

    def table(self, retain_ms: int | None = None) -> LatestWeather:
        """A :class:`LatestWeather` holding every message of the file."""
        table = LatestWeather(retain_ms=retain_ms)
        table.update(self.messages)
        return table


def parse_message(msg: Any) -> dict[str, Any] | str:
    """A weather message with ``site_id`` as text and float fields, or why it is unusable."""
    if not isinstance(msg, dict):
        return "message: not a JSON object"
    site = msg.get("site_id")
    if isinstance(site, bool) or site is None or site == "":
        return "site_id: missing"
    if isinstance(site, float) and site.is_integer():
        site = int(site)
    ts = msg.get("timestamp")
    if isinstance(ts, float) and ts.is_integer():
        ts = int(ts)
    if isinstance(ts, bool) or not isinstance(ts, int) or not -(2**63) <= ts < 2**63:
        shown = repr(ts) if len(repr(ts)) <= 40 else f"{repr(ts)[:20]}… [{len(repr(ts)):,} characters]"
        return f"timestamp: {shown} is not epoch milliseconds"
    out: dict[str, Any] = {"site_id": str(site), "timestamp": ts}
    for field in WEATHER_FIELDS:
        out[field] = _float(msg.get(field))
    return out


#: The largest weather payload read from IoT Core, in bytes (IoT Core's own limit).
MAX_OBSERVATIONS_BYTES = 128 * 1024


def parse_observations(topic: str, payload: bytes | str) -> tuple[list[dict[str, Any]], list[str]]:
    """The usable weather messages of one MQTT message on ``dt/weather/<site>/observations``,
    and the reason for each one refused (a payload refused as a whole gives no messages and one
    reason)."""
    import json

    parts = topic.split("/") if isinstance(topic, str) else []
    if len(parts) != 4 or parts[0] != "dt" or parts[1] != "weather" or parts[3] != "observations" or not parts[2]:
        return [], [f"topic {topic!r} is not dt/weather/<site>/observations"]
    site = parts[2]
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    if len(payload) > MAX_OBSERVATIONS_BYTES:
        return [], [f"payload: {len(payload):,} bytes is more than {MAX_OBSERVATIONS_BYTES:,}"]
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return [], [f"payload: not JSON: {exc}"]
    items = data if isinstance(data, list) else [data]
    good: list[dict[str, Any]] = []
    bad: list[str] = []
    for i, msg in enumerate(items):
        where = f"[{i}] " if isinstance(data, list) else ""
        if isinstance(msg, dict) and msg.get("site_id") is None:
            msg = {**msg, "site_id": site}
        parsed = parse_message(msg)
        if isinstance(parsed, str):
            bad.append(where + parsed)
        elif parsed["site_id"] != site:
            bad.append(f"{where}site_id: {parsed['site_id']!r} is not the topic's site {site!r}")
        else:
            good.append(parsed)
    return good, bad


def _float(v: Any) -> float:
    if v is None or isinstance(v, bool):
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError, OverflowError):  # OverflowError: an integer of 400 digits
        return math.nan


class LatestWeather:
    """Each site's weather history, for vectorised "latest at or before" look-ups.

    ``retain_ms`` bounds the memory on a long-running gateway: messages older than a site's newest
    by more than that are dropped (default 35 days; None keeps everything). A message for a
    (site, timestamp) already held replaces it.
    """

    def __init__(self, retain_ms: int | None = 35 * _DAY_MS):
        self.retain_ms = retain_ms
        # site → (timestamps int64 sorted ascending, values float64 of shape (n, len(WEATHER_FIELDS)))
        self._sites: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return sum(len(ts) for ts, _ in self._sites.values())

    def sites(self) -> list[str]:
        return sorted(self._sites, key=lambda s: (len(s), s))

    def newest(self, site: str) -> int | None:
        """The newest timestamp held for ``site``, or None."""
        entry = self._sites.get(str(site))
        return int(entry[0][-1]) if entry is not None and len(entry[0]) else None

    def update(self, messages: Iterable[dict[str, Any]]) -> int:
        """Add weather messages (raw feed messages or parsed ones); return how many were usable."""
        by_site: dict[str, tuple[list[int], list[list[float]]]] = {}
        used = 0
        for msg in messages:
            parsed = parse_message(msg)
            if isinstance(parsed, str):
                continue
            ts_list, rows = by_site.setdefault(parsed["site_id"], ([], []))
            ts_list.append(parsed["timestamp"])
            rows.append([parsed[f] for f in WEATHER_FIELDS])
            used += 1
        for site, (ts_list, rows) in by_site.items():
            new_ts = np.asarray(ts_list, dtype=np.int64)
            new_vals = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(WEATHER_FIELDS))
            old = self._sites.get(site)
            if old is not None:
                # New messages after the old ones so that, on equal timestamps, the newer wins.
                new_ts = np.concatenate([old[0], new_ts])
                new_vals = np.concatenate([old[1], new_vals])
            order = np.argsort(new_ts, kind="stable")
            ts_sorted, vals_sorted = new_ts[order], new_vals[order]
            # Keep the last of each run of equal timestamps.
            keep = np.ones(len(ts_sorted), dtype=bool)
            keep[:-1] = ts_sorted[1:] != ts_sorted[:-1]
            ts_sorted, vals_sorted = ts_sorted[keep], vals_sorted[keep]
            if self.retain_ms is not None and len(ts_sorted):
                recent = ts_sorted >= ts_sorted[-1] - self.retain_ms
                ts_sorted, vals_sorted = ts_sorted[recent], vals_sorted[recent]
            self._sites[site] = (ts_sorted, vals_sorted)
        return used

    def lookup(
        self,
        site_ids: np.ndarray | list[str],
        ts_ms: np.ndarray | list[int],
        max_age_ms: int = DEFAULT_MAX_AGE_MS,
    ) -> dict[str, np.ndarray]:
        """The latest weather at or before ``ts_ms[i]`` at site ``site_ids[i]``, per field.

        Returns ``{field: float64 array of len(ts_ms)}`` for every field of
        :data:`WEATHER_FIELDS`; an entry is NaN when the site has no weather at or before that
        time, when the latest is more than ``max_age_ms`` older, or when that message lacked the
        field. One ``searchsorted`` per distinct site.
        """
        sites = np.asarray(site_ids).astype(str)
        ts = np.asarray(ts_ms, dtype=np.int64)
        if sites.shape != ts.shape or sites.ndim != 1:
            raise ValueError(f"site_ids and ts_ms must be 1-d and of one length, got {sites.shape} and {ts.shape}")
        out = np.full((len(ts), len(WEATHER_FIELDS)), np.nan)
        if len(ts):
            unique, inverse = np.unique(sites, return_inverse=True)
            for k, site in enumerate(unique):
                entry = self._sites.get(str(site))
                if entry is None or not len(entry[0]):
                    continue
                site_ts, site_vals = entry
                rows = np.flatnonzero(inverse == k)
                q = ts[rows]
                idx = np.searchsorted(site_ts, q, side="right") - 1
                ok = idx >= 0
                ok[ok] &= (q[ok] - site_ts[idx[ok]]) <= max_age_ms
                out[rows[ok]] = site_vals[idx[ok]]
        return {field: out[:, j].copy() for j, field in enumerate(WEATHER_FIELDS)}
