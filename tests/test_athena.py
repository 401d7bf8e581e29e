"""The local Athena: the template's named queries over objects the local Firehose wrote, against
hand-computed rows (duplicates dropped with the scored copy preferred, negatives dropped, site 0
electricity from kBTU to kWh), partition projection, the result CSV, and an ad-hoc query."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from pathlib import Path

import pytest

from emulator.athena import AthenaError, LocalAthena, athena_csv
from emulator.firehose import LocalFirehose
from emulator.s3 import LocalBucket
from gateway import messages

CLOUD = Path(__file__).resolve().parent.parent / "cloud"
STREAM = "metergateway-readings"
ARRIVAL = 1740787200.0  # 2025-03-01T00:00:00Z, the day Firehose receives the messages
R = int(ARRIVAL * 1000)
T0 = 1483246800000  # 2017-01-01T05:00:00Z
H = 3600_000
D1 = T0 + 24 * H
KBTU = 0.29307107
UTC = dt.timezone.utc


def forwarded(kind: str, site: str, thing: str, rows: list, received_ms: int, model: str | None = None) -> bytes:
    """A gateway message as the raw/scored rule forwards it (SELECT *, kind, topic, received_ms)."""
    msg = json.loads(messages.encode(thing, site, rows, model))
    msg.update(kind=kind, topic=f"dt/meters/{site}/{thing}/{kind}", received_ms=received_ms)
    return json.dumps(msg).encode()


KNOWN = [
    forwarded("raw", "0", "gw-1", [["10:electricity", T0, 10.0], ["10:electricity", T0 + H, -5.0],
                                   ["11:chilledwater", T0, 4.0]], R),
    # the scored copy of a reading the raw message also carries: preferred
    forwarded("scored", "0", "gw-1", [["10:electricity", T0, 10.0, 9.5, 0.25, True]], R + 1000, model="m1"),
    # a replay of a raw reading, received later (from another thing, to tell the copies apart)
    forwarded("raw", "0", "gw-2", [["11:chilledwater", T0, 4.0]], R + 2000),
    forwarded("raw", "5", "gw-3", [["500:electricity", T0, 2.0], ["500:electricity", D1, 3.0],
                                   ["500:electricity", D1 + H, 1.5]], R + 3000),
]


@pytest.fixture
def root(tmp_path):
    with LocalFirehose(tmp_path, clock=lambda: ARRIVAL, timer=False) as hose:
        hose.put_record_batch(STREAM, KNOWN)
    return tmp_path


@pytest.fixture
def athena(root):
    with LocalAthena(root, clock=lambda: ARRIVAL + 86400) as a:
        yield a


def test_named_queries_are_the_templates_and_the_files(athena):
    queries = athena.named_queries()
    assert set(queries) == {p.stem for p in (CLOUD / "athena").glob("*.sql")}
    for name, sql in queries.items():
        assert sql == (CLOUD / "athena" / f"{name}.sql").read_text()
    assert athena.workgroups == {"metergateway": "s3://metergateway-data/athena-results/"}
    assert (athena.database, athena.tables[0].name) == ("metergateway", "readings")


def test_daily_by_meter_against_known_data(athena, root):
    result = athena.run_named("daily_by_meter")
    assert result.columns == ["site", "building", "meter_type", "day", "readings", "kwh", "mean_kwh",
                              "min_kwh", "max_kwh", "flagged"]
    e = 10.0 * KBTU
    assert result.rows == [
        ("0", "10", "electricity", dt.date(2017, 1, 1), 1, pytest.approx(e), pytest.approx(e),
         pytest.approx(e), pytest.approx(e), 1),
        ("0", "11", "chilledwater", dt.date(2017, 1, 1), 1, 4.0, 4.0, 4.0, 4.0, 0),
        ("5", "500", "electricity", dt.date(2017, 1, 1), 1, 2.0, 2.0, 2.0, 2.0, 0),
        ("5", "500", "electricity", dt.date(2017, 1, 2), 2, 4.5, 2.25, 1.5, 3.0, 0),
    ]
    assert result.output_key == f"athena-results/{result.query_execution_id}.csv"
    csv = (root / "s3" / "metergateway-data" / result.output_key).read_text().splitlines()
    assert csv[0] == '"site","building","meter_type","day","readings","kwh","mean_kwh","min_kwh","max_kwh","flagged"'
    assert csv[2] == '"0","11","chilledwater","2017-01-01","1","4.0","4.0","4.0","4.0","0"'
    assert csv[4] == '"5","500","electricity","2017-01-02","2","4.5","2.25","1.5","3.0","0"'
    assert len(csv) == 5


def test_high_resolution_against_known_data(athena):
    result = athena.run_named("high_resolution")
    assert result.columns == ["site", "building", "meter_type", "reading_time", "ts", "kwh", "expected",
                              "score", "flag", "model", "thing"]
    at = lambda ms: dt.datetime.fromtimestamp(ms / 1000, tz=UTC)  # noqa: E731
    assert result.rows == [
        ("0", "10", "electricity", at(T0), T0, pytest.approx(10.0 * KBTU), 9.5, 0.25, True, "m1", "gw-1"),
        ("0", "11", "chilledwater", at(T0), T0, 4.0, None, None, None, None, "gw-1"),
        ("5", "500", "electricity", at(T0), T0, 2.0, None, None, None, None, "gw-3"),
        ("5", "500", "electricity", at(D1), D1, 3.0, None, None, None, None, "gw-3"),
        ("5", "500", "electricity", at(D1 + H), D1 + H, 1.5, None, None, None, None, "gw-3"),
    ]
    csv = result.output_path.read_text().splitlines()
    assert csv[2] == '"0","11","chilledwater","2017-01-01 05:00:00.000 UTC","1483246800000","4.0",,,,,"gw-1"'


def test_an_adhoc_query_with_partition_columns(athena):
    result = athena.query("SELECT kind, dt, count(*) AS messages, sum(n) AS readings "
                          "FROM metergateway.readings GROUP BY kind, dt ORDER BY kind")
    assert result.columns == ["kind", "dt", "messages", "readings"]
    assert result.rows == [("raw", "2025-03-01", 3, 7), ("scored", "2025-03-01", 1, 1)]
    assert result.output_path.read_text() == (
        '"kind","dt","messages","readings"\n"raw","2025-03-01","3","7"\n"scored","2025-03-01","1","1"\n')


def test_only_projected_partitions_are_read(root):
    bucket = LocalBucket(root, "metergateway-data")
    body = gzip.compress(KNOWN[0] + b"\n")
    for folder in ("kind=other/dt=2025-03-01", "kind=raw/dt=2023-12-31", "kind=raw/dt=2025-03-03"):
        bucket.put(f"readings/{folder}/x.gz", body)
    with LocalAthena(root, clock=lambda: ARRIVAL + 86400) as athena:  # NOW is 2025-03-02
        assert athena.query("SELECT count(*) FROM readings").rows == [(4,)]


def test_new_and_removed_objects_are_seen_by_the_next_query(root):
    bucket = LocalBucket(root, "metergateway-data")
    with LocalAthena(root, clock=lambda: ARRIVAL) as athena:
        assert athena.query("SELECT count(*) FROM readings").rows == [(4,)]
        with LocalFirehose(root, clock=lambda: ARRIVAL, timer=False) as hose:
            hose.put_record_batch(STREAM, [KNOWN[1]])
        assert athena.query("SELECT count(*) FROM readings").rows == [(5,)]
        scored = bucket.keys("readings/kind=scored/")
        for key in scored:
            bucket.object_path(key).unlink()
        assert athena.query("SELECT count(*) FROM readings WHERE kind = 'scored'").rows == [(0,)]


def test_an_empty_bucket_is_an_empty_table(tmp_path):
    with LocalAthena(tmp_path) as athena:
        result = athena.run_named("daily_by_meter")
        assert result.rows == []
        assert result.output_path.read_text().startswith('"site","building"')


def test_malformed_json_fails_the_query_as_the_serde_says(tmp_path):
    LocalBucket(tmp_path, "metergateway-data").put("readings/kind=raw/dt=2025-03-01/bad.gz",
                                                   gzip.compress(b"{not json\n"))
    with LocalAthena(tmp_path, clock=lambda: ARRIVAL) as athena:
        with pytest.raises(AthenaError, match=r"^query [0-9a-f-]{36} failed: .*JSON"):
            athena.query("SELECT count(*) FROM readings")


def test_unknown_names_are_refused(athena):
    with pytest.raises(AthenaError, match=r"^named query 'nope' not found \(the template has "
                                          r"\['daily_by_meter', 'high_resolution'\]\)$"):
        athena.run_named("nope")
    with pytest.raises(AthenaError, match=r"^workgroup 'other' not found"):
        athena.query("SELECT 1", workgroup="other")
    with pytest.raises(AthenaError, match=r"^SYNTAX_ERROR"):
        athena.query("SELEC 1 FROM")


def test_csv_quotes_and_nulls_as_athena_writes_them():
    assert athena_csv(["a", 'b"c'], [('x"y', None), (True, 1.5e-7)]) == (
        b'"a","b""c"\n"x""y",\n"true","1.5E-7"\n')
