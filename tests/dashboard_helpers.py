"""Test helpers for the dashboard: Firehose-shaped objects in a local bucket, a small stand-in for
LocalAthena over them, health log lines, and a synthetic fleet-day.

FakeAthena reads ``<root>/s3/<bucket>/readings/kind=*/dt=*/*.gz`` (gzip JSON lines, one message a
line, as the template's Firehose writes them) as the Glue table ``readings`` with DuckDB, and runs
Athena (Trino) SQL transpiled by sqlglot: the interface of emulator/athena.py's LocalAthena
(``query(sql) -> Result(columns, rows)``, ``root``, ``bucket``) and nothing more.

``year_and_today`` writes what ``gateway demo`` leaves in the bucket: a year of 2016 and a few
readings from now, two periods a decade apart.
"""

from __future__ import annotations

import gzip
import json
import random
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

BUCKET = "metergateway-data"
COLUMNS = {"batch": "VARCHAR", "thing": "VARCHAR", "site": "VARCHAR", "n": "INTEGER", "model": "VARCHAR",
           "readings": "VARCHAR[][]", "topic": "VARCHAR", "received_ms": "BIGINT"}


@dataclass
class Result:
    columns: list[str]
    rows: list[tuple]


class FakeAthena:
    def __init__(self, root: Path, bucket: str = BUCKET):
        import duckdb

        self.root, self.bucket = Path(root), bucket
        self.queries = 0
        self._db = duckdb.connect()
        self._lock = threading.Lock()

    def query(self, sql: str) -> Result:
        import sqlglot

        glob = str(self.root / "s3" / self.bucket / "readings" / "kind=*" / "dt=*" / "*.gz")
        cols = ", ".join(f"{k}: '{v}'" for k, v in COLUMNS.items())
        view = (f"CREATE OR REPLACE VIEW readings AS SELECT * FROM read_json('{glob}', "
                f"format='newline_delimited', compression='gzip', hive_partitioning=true, columns={{{cols}}})")
        with self._lock:
            self.queries += 1
            self._db.execute(view)
            cur = self._db.execute(sqlglot.transpile(sql, read="trino", write="duckdb")[0])
            return Result([d[0] for d in cur.description], cur.fetchall())


def message(thing: str, site: str, readings: list[list], kind: str, model: str | None, received_ms: int) -> dict:
    """A message as the rule hands it to Firehose (the gateway's JSON plus kind, topic, received_ms)."""
    msg = {"batch": uuid.uuid4().hex[:16], "thing": thing, "site": site, "n": len(readings)}
    if model is not None:
        msg["model"] = model
    msg.update(readings=readings, kind=kind, topic=f"dt/meters/{site}/{thing}/{kind}", received_ms=received_ms)
    return msg


def write_object(root: Path, kind: str, day: str, messages: list[dict], bucket: str = BUCKET) -> Path:
    """One Firehose object: gzip JSON lines under readings/kind=<kind>/dt=<day>/."""
    folder = root / "s3" / bucket / "readings" / f"kind={kind}" / f"dt={day}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{bucket}-readings-1-{uuid.uuid4()}.gz"
    with gzip.open(path, "wt") as f:
        for m in messages:
            f.write(json.dumps(m, separators=(",", ":")) + "\n")
    return path


def health_message(thing: str, ts: int, *, pending: int, lag: float | None, ingest: float, delivered: float,
                   autonomy: float | None, model: str | None, connected: bool = True) -> dict:
    """A health message shaped as gateway/greengrass.py's health() (the fields the dashboard reads)."""
    return {
        "thing": thing, "component": "org.metergateway.Gateway", "ts": ts, "uptime_s": 60.0,
        "state": "running", "restarts": 0,
        "buffer": {"pending": pending, "oldest_pending_age_s": lag, "ingest_per_h": ingest,
                   "delivered_per_h": delivered, "autonomy_hours": autonomy, "used_bytes": 4096,
                   "budget_bytes": 1 << 30, "evicted_oldest": 0},
        "forwarder": {"in_flight_messages": 0, "published": 10, "failures": 0, "blocked": None,
                      "connected": connected},
        "stages": {"forwarder": {"state": "running", "error": None, "since": ts, "retries": 0}},
        "model": None if model is None else {"version": model, "path": "/m", "swaps": 0, "last_error": None},
        "weather": {"received": 0, "used": 0, "rejected": 0, "last_error": None, "sites": 0},
        "received_ms": ts + 5,
    }


def write_health(health_dir: Path, thing: str, messages: list[dict]) -> Path:
    """Health messages as the rules engine's CloudWatch Logs action writes them: JSON lines, a
    file per log stream."""
    health_dir.mkdir(parents=True, exist_ok=True)
    path = health_dir / f"{thing}.jsonl"
    with path.open("a") as f:
        for m in messages:
            f.write(json.dumps(m) + "\n")
    return path


Y2016 = 1451606400000  # 2016-01-01T00:00:00Z
HOUR = 3_600_000


def year_and_today(root: Path, now_ms: int, *, site: str = "3", building: str = "42") -> tuple[int, list[int]]:
    """What ``gateway demo`` leaves: a building's electricity read every hour of 2016 (1 kWh each,
    scored by model m-2016, as the replayed sample is) and three raw readings of 5 kWh in the
    three hours before ``now_ms`` (as the live Modbus polls are). Returns the number of 2016
    readings and the hours of today's."""
    meter = f"{building}:electricity"
    hours = range(366 * 24)
    rows = [[meter, Y2016 + h * HOUR, 1.0, 0.9, 0.1, False] for h in hours]
    write_object(root, "scored", "2016-01-01", [
        message("gw-sample", site, rows[i:i + 100], "scored", "m-2016", rows[i][1] + 2000)
        for i in range(0, len(rows), 100)])
    now_hour = now_ms - now_ms % HOUR
    today = [now_hour - k * HOUR for k in (2, 1, 0)]
    write_object(root, "raw", time.strftime("%Y-%m-%d", time.gmtime(now_ms / 1000)), [
        message("gw-live", site, [[meter, ts + 60_000, 5.0] for ts in today], "raw", None, now_ms)])
    return len(rows), today


def fleet_day(root: Path, *, meters: int = 2380, per_meter: int = 1440, buildings: int = 1449,
              sites: int = 16, things: int = 16, day: str = "2024-06-01", flag_rate: float = 0.002,
              seed: int = 7) -> int:
    """A synthetic fleet-day: ``meters`` meters (ASHRAE's 2,380 on 1,449 buildings in 16 sites)
    read once a minute, scored, in messages of 100 readings; a model switch at noon. Returns the
    number of readings written (3,427,200 by default)."""
    rnd = random.Random(seed)
    t0 = 1717200000000  # 2024-06-01T00:00:00Z
    types = ["electricity", "chilledwater", "steam", "hotwater"]
    plan = []
    for i in range(meters):
        b = i % buildings
        plan.append((str(b % sites), f"{b}:{types[i // buildings % len(types)]}", f"gw-{b % things:02d}"))
    total, objects = 0, 0
    by_site: dict[tuple[str, str], list] = {}
    for site, meter, thing in plan:
        by_site.setdefault((site, thing), []).append(meter)
    batch: list[dict] = []
    for (site, thing), ms in by_site.items():
        for k in range(per_meter):
            ts = t0 + k * 60000
            model = "model-a" if k < per_meter // 2 else "model-b"
            rows = []
            for meter in ms:
                v = 10 + 5 * rnd.random()
                flag = rnd.random() < flag_rate
                rows.append([meter, ts, round(v, 3), round(v * 0.97, 3), round(rnd.random(), 3), flag])
            for j in range(0, len(rows), 100):
                part = rows[j:j + 100]
                batch.append(message(thing, site, part, "scored", model, ts + 1500))
                total += len(part)
            if len(batch) >= 4000:
                write_object(root, "scored", day, batch)
                objects += 1
                batch = []
    if batch:
        write_object(root, "scored", day, batch)
    return total


def measure(root: Path, athena) -> list[tuple[str, float, int]]:
    """Time the page's data endpoints over ``athena`` (first request: the query; then the cache)."""
    import urllib.request

    from emulator.dashboard import Dashboard

    out = []
    with Dashboard(athena, root / "logs" / "metergateway" / "health") as board:
        for path in ["api/buildings", "api/buildings", "api/consumption?site=3&building=3",
                     "api/consumption?site=3", "api/consumption?site=5&building=1445", "api/health"]:
            t = time.perf_counter()
            with urllib.request.urlopen(board.url + path, timeout=600) as r:
                body = r.read()
            out.append((path, (time.perf_counter() - t) * 1000, len(body)))
    return out


if __name__ == "__main__":
    # python tests/dashboard_helpers.py DIR [--fake]: a fleet-day in DIR (made once), then the
    # endpoints' times through LocalAthena (or FakeAthena)
    import sys

    root = Path(sys.argv[1])
    if not (root / "s3").exists():
        t = time.perf_counter()
        print(f"wrote {fleet_day(root)} readings in {time.perf_counter() - t:.0f} s", flush=True)
    if "--fake" in sys.argv:
        athena = FakeAthena(root)
    else:
        from emulator.athena import LocalAthena

        athena = LocalAthena(root, template_path=Path(__file__).resolve().parents[1] / "cloud" / "analytics.yaml")
    for path, ms, size in measure(root, athena):
        print(f"{path}: {ms:.0f} ms, {size} bytes", flush=True)
