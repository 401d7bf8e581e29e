"""Write data/sample/weather_2016.json.gz: the weather of the sample's sites, from the sample itself.

The ASHRAE readings carry their site's weather in each row. This turns the committed extract's
rows into the weather feed's message format (one JSON array of
``{"site_id", "timestamp" (UTC epoch ms), <fields>}``), one message per site and hour, so the
demo can replay 2016 weather beside 2016 readings. Re-running gives the same bytes.

    .venv/bin/python scripts/make_weather_2016.py
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

from gateway.sites import UTC_OFFSET_HOURS, local_to_utc_ms
from gateway.sources.weather import WEATHER_FIELDS

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "data" / "sample" / "readings.csv.gz"
TARGET = REPO / "data" / "sample" / "weather_2016.json.gz"
FIELDS = WEATHER_FIELDS


def main() -> None:
    seen: dict[tuple[str, int], dict] = {}
    with gzip.open(SOURCE, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if None in row or any(row.get(k) is None for k in FIELDS):
                continue  # the truncated row
            site = row["site_id"]
            ts = local_to_utc_ms(row["timestamp"], UTC_OFFSET_HOURS[site])
            msg = {"site_id": int(site), "timestamp": ts}
            for k in FIELDS:
                msg[k] = float(row[k]) if row[k] else None
            seen.setdefault((site, ts), msg)
    messages = [seen[k] for k in sorted(seen, key=lambda k: (k[1], int(k[0])))]
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write(json.dumps(messages, separators=(",", ":")).encode())
    TARGET.write_bytes(buf.getvalue())
    print(f"{TARGET.relative_to(REPO)}: {len(messages)} messages, {TARGET.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
