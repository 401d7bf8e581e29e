"""The shared feature module: metadata, calendar, time conversion, and training/inference parity."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
from pathlib import Path

import holidays
import numpy as np
import pytest

from gateway import ashrae
from gateway.errors import ModelError
from gateway.model.features import (
    FEATURE_INDEX,
    FEATURE_NAMES,
    PRIMARY_USE_CODE,
    Buildings,
    calendar,
    featurize,
)
from gateway.readings import METER_CODE, METER_TYPES
from gateway.sites import COUNTRY, UTC_OFFSET_HOURS, local_to_utc_ms
from gateway.sources.weather import WEATHER_FIELDS

DATA = Path(__file__).resolve().parent.parent / "data"
METADATA = DATA / "building_metadata.csv"
SAMPLE = DATA / "sample" / "readings.csv.gz"


@pytest.fixture(scope="module")
def buildings() -> Buildings:
    return Buildings.from_csv(METADATA)


def test_building_id_is_never_a_feature():
    assert not any("building" in name for name in FEATURE_NAMES)
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert set(WEATHER_FIELDS) <= set(FEATURE_NAMES)


def test_buildings_from_csv_matches_the_file(buildings):
    with open(METADATA, newline="") as f:
        rows = list(csv.DictReader(f))
    assert int(buildings.known.sum()) == len(rows)
    first = rows[0]  # 0,0,Education,7432,2008.0,,...
    b = int(first["building_id"])
    assert buildings.site[b] == int(first["site_id"])
    assert buildings.primary_use[b] == PRIMARY_USE_CODE[first["primary_use"]]
    assert buildings.log_square_feet[b] == pytest.approx(np.log(float(first["square_feet"])))
    assert buildings.year_built[b] == float(first["year_built"])
    assert np.isnan(buildings.floor_count[b])
    assert buildings.is_known(["0", "x", "99999", 5]).tolist() == [True, False, False, True]


def test_buildings_from_csv_names_missing_columns(tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text("building_id,site_id\n1,0\n")
    with pytest.raises(ModelError, match=r"missing columns floor_count, primary_use, square_feet, year_built$"):
        Buildings.from_csv(path)


def test_local_to_utc_uses_the_site_offset():
    got = [local_to_utc_ms("2016-01-01 00:00:00", UTC_OFFSET_HOURS[site]) for site in ("0", "1", "4")]
    midnight_utc = 1_451_606_400_000
    assert got == [midnight_utc + 5 * 3_600_000, midnight_utc, midnight_utc + 8 * 3_600_000]


def test_calendar_local_hour_weekday_month_holiday():
    # 2016-07-04 17:00 UTC: noon on Independence Day in Jacksonville (site 0, UTC-5), 17:00 in London
    ts = np.array([1_467_651_600_000, 1_467_651_600_000])
    cal = calendar(np.array([0, 1]), ts)
    assert cal["hour"].tolist() == [12.0, 17.0]
    assert cal["weekday"].tolist() == [0.0, 0.0]  # a Monday
    assert cal["month"].tolist() == [7.0, 7.0]
    assert cal["holiday"].tolist() == [1.0, 0.0]


def test_calendar_matches_datetime_and_holidays_row_by_row():
    rng = np.random.default_rng(3)
    sites = rng.choice(sorted(int(s) for s in UTC_OFFSET_HOURS), size=300)
    ts = 1_451_606_400_000 + rng.integers(0, 3 * 365 * 24, size=300) * 3_600_000
    cal = calendar(sites, ts)
    for i, (site, t) in enumerate(zip(sites.tolist(), ts.tolist())):
        local = dt.datetime.fromtimestamp(t / 1000, dt.UTC) + dt.timedelta(hours=UTC_OFFSET_HOURS[str(site)])
        assert cal["hour"][i] == local.hour
        assert cal["weekday"][i] == local.weekday()
        assert cal["month"][i] == local.month
        assert cal["holiday"][i] == (local.date() in holidays.country_holidays(COUNTRY[str(site)], years=local.year))


def test_featurize_rejects_unknown_buildings(buildings):
    with pytest.raises(ModelError, match=r"^unknown building id\(s\) \[99999\]$"):
        featurize(buildings, np.array([0, 99999]), np.array([0, 0]), np.array([1_451_606_400_000] * 2), {})


def test_missing_weather_stays_nan(buildings):
    X = featurize(buildings, np.array([0]), np.array([2]), np.array([1_451_606_400_000]), {"air_temperature": np.array([21.5])})
    assert X.dtype == np.float32
    assert X[0, FEATURE_INDEX["air_temperature"]] == 21.5
    assert X[0, FEATURE_INDEX["meter"]] == 2
    assert np.isnan(X[0, FEATURE_INDEX["wind_speed"]])


def _inference_inputs(path: Path):
    """The gateway's path: each row as a reading (string ids, meter names, UTC ms) plus its weather."""
    building, meter, ts, weather = [], [], [], {name: [] for name in WEATHER_FIELDS}
    with gzip.open(path, "rt", newline="") as f:
        for row in csv.DictReader(f):
            if None in row.values():  # the truncated row
                continue
            offset = dt.timezone(dt.timedelta(hours=UTC_OFFSET_HOURS[row["site_id"]]))
            local = dt.datetime.strptime(row["timestamp"], "%Y-%m-%d %H:%M:%S").replace(tzinfo=offset)
            building.append(row["building_id"])
            meter.append(METER_CODE[METER_TYPES[int(row["meter"])]])
            ts.append(int(local.timestamp() * 1000))
            for name in WEATHER_FIELDS:
                weather[name].append(float(row[name]) if row[name] else np.nan)
    return np.array(building), np.array(meter), np.array(ts), {k: np.array(v) for k, v in weather.items()}


def test_training_and_inference_features_are_identical(buildings):
    from gateway.model.train import load_training_data

    table, train_buildings, X_train, ly = load_training_data(SAMPLE, METADATA)
    building, meter, ts, weather = _inference_inputs(SAMPLE)
    X_infer = featurize(buildings, building, meter, ts, weather)
    assert X_train.shape == X_infer.shape == (11_133, len(FEATURE_NAMES))
    np.testing.assert_array_equal(X_train, X_infer)  # NaN == NaN here
    # training without a metadata file takes the same metadata from the readings' own columns
    _, _, X_own, _ = load_training_data(SAMPLE)
    np.testing.assert_array_equal(X_own, X_infer)
    assert np.isnan(X_train).any()  # the sample has weather gaps, and they survive as NaN
    assert np.array_equal(ly, np.log1p(table.meter_reading))


def test_reader_rejects_the_truncated_row_and_bad_values(tmp_path):
    header = ",".join(ashrae.COLUMNS)
    good = "1232,0,2016-01-01 00:00:00,5.5,14,Office,100,,,1.0,,0.5,,,,,Philadelphia,USA,PA"
    path = tmp_path / "in.csv"
    path.write_text(
        "\n".join([
            header,
            good,
            good.replace(",5.5,", ",-1,"),
            good.replace(",5.5,", ",abc,"),
            good.rsplit(",", 2)[0],
            good.replace(",0,2016", ",7,2016"),
            good.replace(",1.0,", ",warm,"),
        ]) + "\n"
    )  # fmt: skip
    table = ashrae.read(path)
    assert len(table) == 1
    assert table.rejected == [
        (3, "value: -1.0 is negative"),  # gateway.readings.check's words, as the replay says it
        (4, "meter_reading: 'abc' is not a number"),
        (5, "columns: 17 instead of 19"),
        (6, "meter: '7' is not a meter code 0..3"),
        (7, "air_temperature: 'warm' is not a number"),
    ]
