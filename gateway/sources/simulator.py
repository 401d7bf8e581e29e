"""A simulated fleet of meters: realistic shapes, labelled anomalies, deterministic.

``SimulatorSource`` produces one reading per meter per ``interval_s`` (default a minute) for a fleet
shaped like the ASHRAE one: by default 2,380 meters on the buildings of
``data/building_metadata.csv`` (electricity in most buildings, then chilled water, steam and hot
water in ASHRAE's proportions), or on synthetic buildings spread over the 16 sites when that file
is absent.

A meter's value is its base load (from the building's floor area) × a daily shape (by meter type,
in the site's local time) × a weekend factor × (1 + noise). Anomalies are injected at
``anomaly_rate`` per reading: a spike (× 3..10) or a dropout (0.0), and labelled
(:class:`Label`: meter id, ts, kind, factor).

Everything random is drawn from a generator seeded by ``(seed, tick number)``, so a tick's values
and labels depend only on the seed and the tick's timestamp: a restart from any position
reproduces the same data, and :meth:`SimulatorSource.labels_between` can answer for any period,
generated or not.

Position is the next tick's timestamp (epoch ms, UTC; a reading's ``ts`` is the end of its
interval). ``speed=None`` generates as fast as possible up to ``end_ms`` (or ``count`` ticks after
``start_ms``); ``speed=1.0`` is real time, ``speed=60.0`` a minute of data per second; waits are
on ``stop.wait``. Pacing counts from the position it starts at: after a restart from an old
position the data clock keeps that lag (it does not rush to catch up with the wall clock). At any
speed it never runs more than 24 h ahead of the wall clock (the most a reading may be ahead of
it): there it waits for the clock.
"""

from __future__ import annotations

import csv
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from gateway.errors import ConfigError
from gateway.readings import MAX_FUTURE_MS, METER_TYPES, Reading
from gateway.sites import UTC_OFFSET_HOURS
from gateway.sources import Batch

__all__ = ["SimulatorSource", "Label", "ASHRAE_METER_COUNTS", "DEFAULT_METADATA"]

#: Meters per type in the ASHRAE fleet (2,380 in all), in METER_TYPES order.
ASHRAE_METER_COUNTS: tuple[int, ...] = (1413, 498, 324, 145)
#: Where the fleet's buildings come from when present.
DEFAULT_METADATA = Path(__file__).resolve().parents[2] / "data" / "building_metadata.csv"

_MS_PER_HOUR = 3_600_000
_MS_PER_DAY = 86_400_000
# Typical energy per square foot per hour by meter type (kWh-ish, ASHRAE-like magnitudes).
_INTENSITY = np.array([0.0025, 0.004, 0.006, 0.003])
# Daily shapes by meter type, 24 hourly factors around 1.0 (local time).
_HOURS = np.arange(24)
_OCCUPIED = 1.0 / (1.0 + np.exp(-(_HOURS - 7.5) * 1.5)) * 1.0 / (1.0 + np.exp((_HOURS - 18.5) * 1.5))
_DAILY = np.stack(
    [
        0.6 + 0.8 * _OCCUPIED,  # electricity: office hours
        0.4 + 1.2 * np.clip(np.sin((_HOURS - 8) / 12 * np.pi), 0, None),  # chilled water: afternoon
        0.8 + 0.5 * np.exp(-((_HOURS - 7.0) ** 2) / 8.0),  # steam: morning warm-up
        0.7 + 0.5 * np.exp(-((_HOURS - 7.0) ** 2) / 6.0) + 0.3 * np.exp(-((_HOURS - 19.0) ** 2) / 6.0),
    ]
)
_DAILY = _DAILY / _DAILY.mean(axis=1, keepdims=True)
_WEEKEND = np.array([0.65, 0.8, 0.9, 0.85])  # weekend level by meter type
_NOISE = 0.05


class Label(NamedTuple):
    """One injected anomaly."""

    meter_id: str  # "<building>:<meter type>", as Reading.meter_id
    ts: int
    kind: str  # "spike" or "dropout"
    factor: float  # what the true value was multiplied by (0.0 for a dropout)


class SimulatorSource:
    """A :class:`~gateway.sources.Source` of simulated meters; see the module docstring."""

    def __init__(
        self,
        name: str,
        meters: int = 2380,
        seed: int = 0,
        start_ms: int | None = None,
        interval_s: float = 60,
        speed: float | None = 1.0,
        anomaly_rate: float = 0.0,
        end_ms: int | None = None,
        count: int | None = None,
        batch_size: int = 2_500,
        labels_path: str | Path | None = None,
        metadata_path: str | Path | None = DEFAULT_METADATA,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        if meters < 1:
            raise ConfigError("meters", f"{meters!r} must be >= 1")
        if not interval_s > 0 or abs(interval_s * 1000 - round(interval_s * 1000)) > 1e-6:
            raise ConfigError("interval_s", f"{interval_s!r} must be > 0 and a whole number of ms")
        if speed is not None and not speed > 0:
            raise ConfigError("speed", f"{speed!r} must be > 0 (or null for as fast as possible)")
        if not 0.0 <= anomaly_rate <= 1.0:
            raise ConfigError("anomaly_rate", f"{anomaly_rate!r} must be within 0..1")
        if end_ms is not None and count is not None:
            raise ConfigError("count", "give end_ms or count, not both")
        self.name = name
        self.seed = int(seed)
        self.interval_ms = round(interval_s * 1000)
        self.speed = speed
        self.anomaly_rate = float(anomaly_rate)
        self.batch_size = batch_size
        self.clock = clock
        self.wall = wall
        if start_ms is None:
            # The end of the last whole interval: that reading is due now.
            start_ms = int(wall() * 1000) // self.interval_ms * self.interval_ms
        self.start_ms = int(start_ms)
        self.end_ms = self.start_ms + count * self.interval_ms if count is not None else end_ms
        self.labels_path = Path(labels_path) if labels_path is not None else None
        #: Labels of the anomalies this instance has produced, in order.
        self.labels: list[Label] = []
        self._fleet(meters, metadata_path)

    def __repr__(self) -> str:
        return f"SimulatorSource({self.name!r}, meters={len(self.buildings)}, seed={self.seed}, speed={self.speed!r})"

    # -- the fleet -------------------------------------------------------------------------

    def _fleet(self, n: int, metadata_path: str | Path | None) -> None:
        """Pick ``n`` (building, meter type) pairs and each meter's fixed parameters."""
        rng = np.random.default_rng([self.seed, 0xF1EE7])
        buildings, sites, sqft = _load_buildings(metadata_path)
        b = len(buildings)
        # Meters per type in ASHRAE's proportions (largest remainder, so they sum to n).
        share = np.array(ASHRAE_METER_COUNTS, dtype=float) / sum(ASHRAE_METER_COUNTS) * n
        per_type = np.floor(share).astype(int)
        per_type[np.argsort(-(share - per_type))[: n - per_type.sum()]] += 1
        # More meters of a type than buildings: add synthetic buildings ("sim-<k>").
        extra = int(max(0, per_type.max() - b))
        if extra:
            buildings = buildings + [f"sim-{k}" for k in range(extra)]
            sites = sites + [str(k % 16) for k in range(extra)]
            sqft = np.concatenate([sqft, rng.lognormal(11.0, 1.0, extra)])
            b += extra
        order_b, order_t = [], []
        for code, k in enumerate(per_type):
            chosen = np.sort(rng.permutation(b)[:k])
            order_b.extend(chosen.tolist())
            order_t.extend([code] * int(k))
        bi = np.asarray(order_b, dtype=np.int64)
        ti = np.asarray(order_t, dtype=np.int64)
        # Sort by building then type, so a building's meters are together.
        order = np.lexsort((ti, bi))
        bi, ti = bi[order], ti[order]
        self.buildings: list[str] = [buildings[i] for i in bi]
        self.sites: list[str] = [sites[i] for i in bi]
        self.meter_types: list[str] = [METER_TYPES[t] for t in ti]
        self.meter_ids: list[str] = [f"{bld}:{m}" for bld, m in zip(self.buildings, self.meter_types)]
        self._type = ti
        offsets = np.array([UTC_OFFSET_HOURS.get(s, 0.0) for s in self.sites], dtype=float)
        self._offset_ms = np.round(offsets * _MS_PER_HOUR).astype(np.int64)
        area = np.asarray(sqft, dtype=float)[bi]
        area = np.where(np.isfinite(area) & (area > 0), area, 50_000.0)
        # Energy per interval at the average level.
        self._base = area * _INTENSITY[ti] * rng.lognormal(0.0, 0.3, n) * (self.interval_ms / _MS_PER_HOUR)
        self._weekend = np.clip(_WEEKEND[ti] + rng.normal(0.0, 0.05, n), 0.3, 1.0)

    # -- values ----------------------------------------------------------------------------

    def values_at(self, ts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The fleet's values at tick ``ts`` with anomalies applied, their anomaly mask, and factors.

        ``factors`` is 1.0 where there is no anomaly, 0.0 for a dropout and 3..10 for a spike.
        """
        tick = ts // self.interval_ms
        rng = np.random.default_rng([self.seed, 1, tick])
        n = len(self._base)
        noise = rng.standard_normal(n)
        u = rng.random(n)
        spike = rng.random(n) < 0.5
        size = rng.uniform(3.0, 10.0, n)
        local = ts + self._offset_ms
        hour = (local // _MS_PER_HOUR) % 24
        weekday = (local // _MS_PER_DAY + 3) % 7  # 1970-01-01 was a Thursday; Monday = 0
        level = _DAILY[self._type, hour] * np.where(weekday >= 5, self._weekend, 1.0)
        values = np.maximum(self._base * level * (1.0 + _NOISE * noise), 0.0)
        anomalous = u < self.anomaly_rate
        factors = np.where(anomalous, np.where(spike, size, 0.0), 1.0)
        return values * factors, anomalous, factors

    def labels_between(self, start_ms: int, end_ms: int, meter_id: str | None = None) -> list[Label]:
        """The anomalies of the ticks in ``[start_ms, end_ms)``, whether produced yet or not.

        ``meter_id`` (``"<building>:<meter type>"``) keeps only that meter's.
        """
        out: list[Label] = []
        if self.anomaly_rate <= 0:
            return out
        ts = self._first_tick(start_ms)
        while ts < end_ms:
            out.extend(self._labels_of(ts, *self.values_at(ts)[1:]))
            ts += self.interval_ms
        return out if meter_id is None else [label for label in out if label.meter_id == meter_id]

    def _labels_of(self, ts: int, anomalous: np.ndarray, factors: np.ndarray) -> list[Label]:
        return [
            Label(self.meter_ids[i], ts, "spike" if factors[i] > 0 else "dropout", float(factors[i]))
            for i in np.flatnonzero(anomalous)
        ]

    def _first_tick(self, ts: int) -> int:
        """The first tick at or after ``ts`` on this source's grid."""
        phase = self.start_ms % self.interval_ms
        return ts + (phase - ts) % self.interval_ms

    # -- the Source seam -------------------------------------------------------------------

    def batches(self, position: Any, stop: threading.Event) -> Iterator[Batch]:
        """Yield ticks from ``position`` (the next tick's ts; None = ``start_ms``) on."""
        ts = self.start_ms if position is None else int(position)
        ticks_per_batch = 1 if self.speed is not None else max(1, self.batch_size // len(self._base))
        wall0 = self.clock()
        ts0 = ts
        sites, buildings, types, name = self.sites, self.buildings, self.meter_types, self.name
        while self.end_ms is None or ts < self.end_ms:
            if stop.is_set():
                return
            if self.speed is not None:
                delay = wall0 + (ts - ts0) / 1000.0 / self.speed - self.clock()
                if delay > 0 and stop.wait(delay):
                    return
            horizon = int(self.wall() * 1000) + MAX_FUTURE_MS  # never a reading the buffer must refuse
            if ts > horizon and stop.wait((ts - horizon) / 1000):
                return
            readings: list[Reading] = []
            labels: list[Label] = []
            for _ in range(ticks_per_batch):
                if (self.end_ms is not None and ts >= self.end_ms) or (readings and ts > horizon):
                    break
                values, anomalous, factors = self.values_at(ts)
                readings.extend(map(Reading, sites, buildings, types, [ts] * len(sites), values.tolist(), [name] * len(sites)))
                if anomalous.any():
                    labels.extend(self._labels_of(ts, anomalous, factors))
                ts += self.interval_ms
            if labels:
                self.labels.extend(labels)
                self._write_labels(labels)
            yield Batch(readings, [], ts)

    def _write_labels(self, labels: list[Label]) -> None:
        """Append ``labels`` to ``labels_path``: CSV with a header when it ends in .csv, else JSONL."""
        if self.labels_path is None:
            return
        self.labels_path.parent.mkdir(parents=True, exist_ok=True)
        is_csv = self.labels_path.suffix.lower() == ".csv"
        new = not self.labels_path.exists() or self.labels_path.stat().st_size == 0
        with open(self.labels_path, "a", encoding="utf-8", newline="") as f:
            if is_csv:
                w = csv.writer(f)
                if new:
                    w.writerow(Label._fields)
                w.writerows(labels)
            else:
                f.writelines(json.dumps(label._asdict()) + "\n" for label in labels)


def _load_buildings(path: str | Path | None) -> tuple[list[str], list[str], np.ndarray]:
    """(building ids, their sites, their floor areas) from building metadata, else synthetic."""
    if path is not None and Path(path).is_file():
        with open(path, encoding="utf-8", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("building_id") and r.get("site_id")]
        if rows:
            area = np.array([_num(r.get("square_feet")) for r in rows])
            return [r["building_id"] for r in rows], [r["site_id"] for r in rows], area
    # Synthetic: 1,449 buildings over the 16 sites, as many per site as ASHRAE roughly has.
    rng = np.random.default_rng(1449)
    n = 1449
    return [str(i) for i in range(n)], [str(i * 16 // n) for i in range(n)], rng.lognormal(11.0, 1.0, n)


def _num(text: str | None) -> float:
    try:
        return float(text) if text else np.nan
    except ValueError:
        return np.nan
