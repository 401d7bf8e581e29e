"""Make the small committed extract in data/ from the shared ASHRAE sample.

    python scripts/make_extract.py [--source /work/shared/data] [--out data]

It copies, byte for byte, every row of a few buildings from ``ashrae_2016_sample.csv.gz``
(already sorted by timestamp; a stable sort keeps it so), including the shared file's one
truncated row, which belongs to building 997; the same sites' December 2018 weather; and the
building metadata. The output is deterministic (gzip mtime 0), so re-running it changes nothing.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

#: Buildings in the extract: site 9 (UTC-6), site 14 and site 15 (UTC-5), all four meter types.
#: 997 is the building of the shared file's truncated row (line 767766), kept on purpose.
BUILDINGS: dict[str, tuple[str, ...]] = {
    "9": ("875", "997"),
    "14": ("1232", "1241", "1249"),
    "15": ("1329", "1331", "1433"),
}


def extract_readings(source: Path, out: Path, buildings: set[str]) -> tuple[int, int]:
    """Copy the rows of ``buildings`` from ``source`` to ``out``; return (rows, short rows)."""
    with gzip.open(source, "rt", encoding="utf-8", newline="") as f:
        header = f.readline()
        ncols = header.count(",") + 1
        rows = [line for line in f if line.split(",", 1)[0] in buildings]
    # Sorted by the timestamp column (third), stable: the source order within an hour is kept.
    rows.sort(key=lambda line: line.split(",", 3)[2])
    short = sum(1 for line in rows if line.count(",") + 1 != ncols)
    with open(out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(header.encode("utf-8"))
        for line in rows:
            if not line.endswith("\n"):
                line += "\n"
            gz.write(line.encode("utf-8"))
    return len(rows), short


def extract_weather(source: Path, out: Path, sites: set[str]) -> int:
    """Copy the weather messages of ``sites`` (same JSON array format); return how many."""
    messages = json.loads(source.read_text(encoding="utf-8"))
    kept = [m for m in messages if str(m["site_id"]) in sites]
    out.write_text(json.dumps(kept, separators=(",", ":")), encoding="utf-8")
    return len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Path("/work/shared/data"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data")
    args = parser.parse_args()
    sample = args.out / "sample"
    sample.mkdir(parents=True, exist_ok=True)
    buildings = {b for group in BUILDINGS.values() for b in group}
    rows, short = extract_readings(args.source / "ashrae_2016_sample.csv.gz", sample / "readings.csv.gz", buildings)
    weather = extract_weather(args.source / "weather_2018_12.json", sample / "weather.json", set(BUILDINGS))
    shutil.copyfile(args.source / "building_metadata.csv", args.out / "building_metadata.csv")
    size = (sample / "readings.csv.gz").stat().st_size
    print(f"readings.csv.gz: {rows} rows ({short} truncated), {len(buildings)} buildings, {size:,} bytes")
    print(f"weather.json: {weather} messages of sites {', '.join(sorted(BUILDINGS, key=int))}")


if __name__ == "__main__":
    main()
