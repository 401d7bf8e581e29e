"""Training data from the analytics store: what the fleet sent, read back as a training table.

The gateways' raw and scored messages reach the analytics store two ways, and both are read here
into the same :class:`gateway.ashrae.Table` that training reads from an ASHRAE CSV:

- **The Firehose path** (``cloud/analytics.yaml``): gzipped objects of newline-delimited JSON
  messages under ``readings/kind=<raw|scored>/dt=<UTC day received>/``, each message
  ``{"site": "15", "thing": ..., "readings": [["1433:electricity", ts, value, ...], ...]}``.
  Given as ``s3://bucket/prefix`` (boto3, imported only then: it is no device dependency, and it
  needs credentials), as a local emulation root (``<root>/s3/metergateway-data/readings/...``), as
  a bucket folder (``<dir>/readings/...``) or as any folder of such objects.
- **The IoT Analytics dataset** (``cloud/legacy-iot-analytics.yaml``'s ``highres``): a CSV with
  ``site, building, meter_type, ts, kwh``. Site 0 electricity is converted back from kWh to the
  kBTU it was recorded in, since the model learns readings as meters record them.

A reading is its ``(meter, ts)`` key: a copy sent twice (a replay after a crash) counts once,
the scored copy first, as ``cloud/athena/high_resolution.sql`` keeps it. Negative or non-finite
values are dropped, as the analytics queries drop them. Messages carry no weather nor building
metadata: the site's weather comes from a weather feed file (the feed's JSON messages, joined as
of the reading's time, as the gateway looks it up) and the metadata from ``building_metadata.csv``.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from gateway.ashrae import Table
from gateway.errors import ModelError
from gateway.readings import METER_CODE
from gateway.sources.weather import DEFAULT_MAX_AGE_MS, WEATHER_FIELDS

log = logging.getLogger(__name__)

#: The emulation's data bucket (``cloud/analytics.yaml``'s DataBucket, locally).
EMULATION_BUCKET = "metergateway-data"
READINGS_PREFIX = "readings/"
#: kWh per kBTU: the IoT Analytics pipeline's unit_factor for site 0 electricity.
KBTU_KWH = 0.29307107


@dataclass
class Readings:
    """What was read: the table, and where it came from (for the manifest's lineage)."""

    table: Table
    source: str
    kind: str  # "firehose" or "iotanalytics"
    objects: int = 0
    messages: int = 0
    copies: int = 0  # readings read, before (meter, ts) duplicates were dropped
    duplicates: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    kinds: dict[str, int] = field(default_factory=dict)  # raw/scored -> messages

    def lineage(self) -> dict:
        t = self.table
        span = (str(t.timestamp.min()), str(t.timestamp.max())) if len(t) else (None, None)
        ts = (int(t.ts_ms.min()), int(t.ts_ms.max())) if len(t) else (None, None)
        return {"source": self.source, "kind": self.kind, "objects": self.objects, "messages": self.messages,
                "message_kinds": dict(self.kinds), "readings_read": len(t), "duplicates": self.duplicates,
                "dropped": dict(self.dropped), "buildings": int(len(np.unique(t.building_id))),
                "meters": int(len(np.unique(t.building_id * 4 + t.meter))),
                "from_local": span[0], "to_local": span[1], "from_utc_ms": ts[0], "to_utc_ms": ts[1]}


# ------------------------------------------------------------------ where the objects are


def _local_objects(path: Path) -> tuple[list[Path], str]:
    """The readings objects under a local folder, and the folder they were found in."""
    for base in (path / "s3" / EMULATION_BUCKET / "readings", path / "readings", path):
        if base.is_dir():
            found = sorted(p for p in base.rglob("*") if p.is_file() and not p.name.startswith("."))
            if found or base == path:
                return found, str(base)
    raise ModelError(f"{path}: no such folder")


def _s3_objects(url: str) -> Iterator[tuple[str, bytes]]:
    """(key, body) of every object under ``s3://bucket/prefix`` (boto3 and AWS credentials)."""
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError as exc:
        raise ModelError(f"{url}: reading S3 needs boto3 (pip install boto3): {exc}") from None
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise ModelError(f"{url}: no bucket (expected s3://bucket/prefix)")
    prefix = prefix or READINGS_PREFIX
    try:
        session = boto3.Session()
        if session.get_credentials() is None:
            raise ModelError(f"{url}: no AWS credentials (set AWS_PROFILE or AWS_ACCESS_KEY_ID, or run aws configure)")
        s3 = session.client("s3")
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"], s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    except (BotoCoreError, ClientError) as exc:
        raise ModelError(f"{url}: {exc}") from exc


def _kind_of(key: str) -> str | None:
    for part in key.replace("\\", "/").split("/"):
        if part.startswith("kind="):
            return part[len("kind="):]
    return None


# ------------------------------------------------------------------ parsing


class _Collector:
    """Readings keyed by (meter, ts): the scored copy wins, then the first one read."""

    def __init__(self) -> None:
        self.best: dict[tuple[str, int], tuple[int, str, float]] = {}  # key -> (rank, site, value)
        self.copies = 0
        self.valid = 0  # copies that passed the checks
        self.dropped: dict[str, int] = {}

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def add(self, site: str, meter: str, ts, value, scored: bool) -> None:
        self.copies += 1
        try:
            ts_i, v = int(ts), float(value)
        except (TypeError, ValueError):
            self.drop("not a number")
            return
        if not math.isfinite(v) or v < 0:
            self.drop("negative or not finite")
            return
        self.valid += 1
        key = (meter, ts_i)
        rank = 0 if scored else 1
        old = self.best.get(key)
        if old is None or rank < old[0]:
            self.best[key] = (rank, site, v)

    def table(self, weather_path: str | Path | None, max_age_ms: int) -> Table:
        rows = []
        for (meter, ts), (_, site, value) in self.best.items():
            building, _, mtype = meter.partition(":")
            code = METER_CODE.get(mtype)
            if code is None or not building.isdigit() or not site.isdigit():
                self.drop("meter is not <building>:<meter type> or site is not a number")
                continue
            rows.append((int(building), code, int(site), ts, value))
        rows.sort(key=lambda r: (r[3], r[0], r[1]))  # time order, as the gateway saw them
        n = len(rows)
        cols = list(zip(*rows)) if rows else [(), (), (), (), ()]
        building_id = np.array(cols[0], dtype=np.int64)
        meter = np.array(cols[1], dtype=np.int64)
        site_id = np.array(cols[2], dtype=np.int64)
        ts_ms = np.array(cols[3], dtype=np.int64)
        value = np.array(cols[4], dtype=np.float64)
        weather = join_weather(weather_path, site_id, ts_ms, max_age_ms)
        return Table(header=["building_id", "meter", "site_id", "ts_ms", "meter_reading"], lines=[""] * n,
                     line_no=np.arange(n, dtype=np.int64), building_id=building_id, meter=meter, site_id=site_id,
                     ts_ms=ts_ms, meter_reading=value, weather=weather)


def join_weather(weather_path: str | Path | None, site_id: np.ndarray, ts_ms: np.ndarray,
                 max_age_ms: int = DEFAULT_MAX_AGE_MS) -> dict[str, np.ndarray]:
    """Each reading's site weather: the latest feed message at or before it, no older than
    ``max_age_ms`` (as :class:`gateway.sources.weather.LatestWeather` answers the gateway); NaN
    without a weather file."""
    if weather_path is None:
        return {name: np.full(len(ts_ms), np.nan) for name in WEATHER_FIELDS}
    from gateway.sources.weather import WeatherReplay

    try:
        replay = WeatherReplay(weather_path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"weather {weather_path}: {exc}") from exc
    table = replay.table(retain_ms=None)
    return table.lookup(site_id.astype(str), ts_ms, max_age_ms=max_age_ms)


def _messages(body: bytes, where: str, c: _Collector) -> Iterator[dict]:
    if body[:2] == b"\x1f\x8b":
        try:
            body = gzip.decompress(body)
        except (OSError, EOFError) as exc:
            c.drop("object not readable")
            log.warning("%s: %s (object skipped)", where, exc)
            return
    for n, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            msg = json.loads(line)
        except ValueError:
            c.drop("message not JSON")
            log.warning("%s:%d: not JSON (message skipped)", where, n)
            continue
        if isinstance(msg, dict) and isinstance(msg.get("readings"), list):
            yield msg
        else:
            c.drop("message without readings")


def read_firehose(source: str | Path, weather: str | Path | None = None,
                  max_age_ms: int = DEFAULT_MAX_AGE_MS) -> Readings:
    """The readings of the Firehose objects at ``source`` (``s3://bucket/prefix`` or a folder)."""
    c = _Collector()
    out = Readings(table=None, source=str(source), kind="firehose")  # type: ignore[arg-type]
    text = str(source)
    if text.startswith("s3://"):
        objects = _s3_objects(text)
    else:
        paths, base = _local_objects(Path(source))
        out.source = base
        objects = ((str(p), p.read_bytes()) for p in paths)
    for key, body in objects:
        kind = _kind_of(key)
        if kind not in ("raw", "scored"):
            continue
        out.objects += 1
        for msg in _messages(body, key, c):
            out.messages += 1
            out.kinds[kind] = out.kinds.get(kind, 0) + 1
            site = str(msg.get("site", ""))
            scored = kind == "scored"
            for r in msg["readings"]:
                if isinstance(r, list) and len(r) >= 3 and isinstance(r[0], str):
                    c.add(site, r[0], r[1], r[2], scored)
                else:
                    c.drop("reading is not [meter, ts, value, ...]")
    if out.objects == 0:
        raise ModelError(f"{out.source}: no readings objects (readings/kind=raw|scored/dt=.../*.gz) found")
    out.table = c.table(weather, max_age_ms)
    out.copies, out.duplicates, out.dropped = c.copies, c.valid - len(c.best), c.dropped
    return out


def read_iotanalytics(path: str | Path, weather: str | Path | None = None,
                      max_age_ms: int = DEFAULT_MAX_AGE_MS) -> Readings:
    """The readings of an IoT Analytics ``highres`` dataset CSV (site, building, meter_type, ts, kwh)."""
    path = Path(path)
    c = _Collector()
    try:
        text = (gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")).read()
    except OSError as exc:
        raise ModelError(f"{path}: {exc}") from exc
    reader = csv.DictReader(io.StringIO(text))
    missing = {"site", "building", "meter_type", "ts", "kwh"} - set(reader.fieldnames or [])
    if missing:
        raise ModelError(f"{path}: not an IoT Analytics highres dataset: missing columns {', '.join(sorted(missing))}")
    for row in reader:
        try:
            kwh = float(row["kwh"])
        except ValueError:
            c.drop("not a number")
            continue
        value = kwh / KBTU_KWH if row["site"] == "0" and row["meter_type"] == "electricity" else kwh
        c.add(row["site"], f"{row['building']}:{row['meter_type']}", row["ts"], value, scored=False)
    out = Readings(table=c.table(weather, max_age_ms), source=str(path), kind="iotanalytics", objects=1)
    out.copies, out.duplicates, out.dropped = c.copies, c.valid - len(c.best), c.dropped
    return out


def read(source: str | os.PathLike, weather: str | Path | None = None,
         max_age_ms: int = DEFAULT_MAX_AGE_MS) -> Readings:
    """Read ``source``: a ``.csv`` file is an IoT Analytics dataset; ``s3://…`` or a folder holds
    Firehose objects. ModelError names what is wrong."""
    text = str(source)
    if not text.startswith("s3://"):
        p = Path(text)
        if not p.exists():
            raise ModelError(f"{p}: no such file or folder")
        if p.is_file():
            if p.name.lower().endswith((".csv", ".csv.gz")):
                return read_iotanalytics(p, weather, max_age_ms)
            raise ModelError(f"{p}: a file must be an IoT Analytics dataset CSV; give a folder or s3:// for Firehose objects")
    got = read_firehose(source, weather, max_age_ms)
    log.info("%s: %d objects, %d messages, %d readings (%d duplicates dropped)", got.source, got.objects,
             got.messages, len(got.table), got.duplicates)
    return got
