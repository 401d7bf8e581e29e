"""Sources: file replay (CSV.GZ and JSON), the simulator, and site weather."""

from __future__ import annotations

import csv
import gzip
import json
import math
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from gateway import ashrae
from gateway.errors import ConfigError
from gateway.readings import METER_TYPES, Reading, Rejected
from gateway.sources import Batch, Source
from gateway.sites import local_to_utc_ms
from gateway.sources.replay import ReplaySource
from gateway.sources.simulator import ASHRAE_METER_COUNTS, Label, SimulatorSource
from gateway.sources.weather import WEATHER_FIELDS, LatestWeather, WeatherReplay

DATA = Path(__file__).resolve().parents[1] / "data"
SAMPLE = DATA / "sample" / "readings.csv.gz"
WEATHER = DATA / "sample" / "weather.json"
HEADER = (
    "building_id,meter,timestamp,meter_reading,site_id,primary_use,square_feet,year_built,floor_count,"
    "air_temperature,cloud_coverage,dew_temperature,precip_depth_1_hr,sea_level_pressure,wind_direction,"
    "wind_speed,city,country,state"
)
TAIL = "Education,28084,1913.0,,-1.0,,-2.0,,,340.0,2.1,Pittsburgh,USA,PA"  # columns 6..19
TRUNCATED = "997,1,2016-12-13 07:00:00,76.0695,9,Office,38173,,,12.8,,10.6,0.0,1014.5,0.0,0.0,San "
HOUR = 3_600_000
JAN1_2016 = 1_451_606_400_000  # 2016-01-01T00:00:00Z


def row(building="1433", meter="0", ts="2016-01-01 03:00:00", value="45.275", site="15", tail=TAIL) -> str:
    return ",".join([building, meter, ts, value, site, tail])


def write_csv(path: Path, lines: list[str]) -> Path:
    text = "\n".join([HEADER, *lines]) + "\n"
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def run(source, position=None, stop=None) -> list[Batch]:
    return list(source.batches(position, stop or threading.Event()))


def flat(batches: list[Batch]) -> tuple[list[Reading], list[Rejected]]:
    return [r for b in batches for r in b.readings], [r for b in batches for r in b.rejected]


class FakeClock:
    """A monotonic clock that only moves when a FakeStop waits."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeStop:
    """A stop event whose wait() returns at once: records the wait, advances the fake clock."""

    def __init__(self, clock: FakeClock, stop_after_waits: int | None = None):
        self.clock = clock
        self.waits: list[float] = []
        self.stop_after_waits = stop_after_waits
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        if self.stop_after_waits is not None and len(self.waits) >= self.stop_after_waits:
            self._set = True
            return True
        self.clock.t += timeout
        return self._set


@pytest.fixture
def no_sleep(monkeypatch):
    """Fail the test if anything paces with time.sleep instead of stop.wait."""

    def forbidden(seconds):
        raise AssertionError(f"time.sleep({seconds}) called: pace with stop.wait")

    monkeypatch.setattr("time.sleep", forbidden)


# -- replay: the committed extract -----------------------------------------------------------


@pytest.fixture(scope="module")
def sample_batches() -> list[Batch]:
    return run(ReplaySource("replay", SAMPLE, batch_size=1000))


def test_replay_is_a_source():
    assert isinstance(ReplaySource("replay", SAMPLE), Source)


def test_replay_reads_every_row_of_the_extract(sample_batches):
    readings, rejected = flat(sample_batches)
    assert len(readings) == 11_133
    assert len(rejected) == 1
    assert sample_batches[-1].position == 11_134
    assert [b.position for b in sample_batches] == sorted({b.position for b in sample_batches})
    assert {r.building for r in readings} == {"875", "997", "1232", "1241", "1249", "1329", "1331", "1433"}
    assert {r.site for r in readings} == {"9", "14", "15"}
    assert set(Counter(r.meter for r in readings)) == set(METER_TYPES)
    assert all(type(r.value) is float and type(r.ts) is int and r.source == "replay" for r in readings)


def test_replay_converts_site_local_time_to_utc(sample_batches):
    readings, _ = flat(sample_batches)
    # 1433,0,2016-01-01 03:00:00,45.275,15 — site 15 is UTC-5, so 08:00Z.
    assert Reading("15", "1433", "electricity", JAN1_2016 + 8 * HOUR, 45.275, "replay") in readings
    # 997,0,2016-01-02 02:00:00,0.0,9 — site 9 is UTC-6, so 08:00Z the same day.
    assert Reading("9", "997", "electricity", JAN1_2016 + 32 * HOUR, 0.0, "replay") in readings


def test_site_offsets_can_be_overridden(tmp_path):
    path = write_csv(tmp_path / "r.csv", [row(), row(site="77")])
    readings, rejected = flat(run(ReplaySource("r", path, site_offsets={"15": 0, "77": 5.5})))
    assert [r.ts for r in readings] == [JAN1_2016 + 3 * HOUR, JAN1_2016 + 3 * HOUR - int(5.5 * HOUR)]
    assert rejected == []


def test_local_to_utc_ms():
    assert local_to_utc_ms("2016-02-29 23:00:00", -5) == 1_456_804_800_000  # 2016-03-01T04:00Z
    with pytest.raises(ValueError):
        local_to_utc_ms("2015-02-29 00:00:00", 0)


def test_the_real_truncated_row_is_quarantined_with_its_line(sample_batches):
    readings, rejected = flat(sample_batches)
    assert rejected == [Rejected("columns: 17 instead of 19", TRUNCATED, "replay", "readings.csv.gz:10578")]
    # The rows on either side of it are read (lines 10577 and 10579 of the file).
    assert Reading("14", "1249", "chilledwater", local_to_utc_ms("2016-12-13 06:00:00", -5), 899.641, "replay") in readings
    assert Reading("15", "1331", "hotwater", local_to_utc_ms("2016-12-13 07:00:00", -5), 9007.38, "replay") in readings


def test_resume_around_the_truncated_row_yields_exactly_the_rest(sample_batches):
    readings, rejected = flat(sample_batches)
    for position in range(10_570, 10_582):
        again, again_rejected = flat(run(ReplaySource("replay", SAMPLE, batch_size=1000), position))
        # Line 10578 is data line 10577 (1-based): positions <= 10576 still include it.
        assert again_rejected == (rejected if position <= 10_576 else [])
        assert again == readings[len(readings) - len(again) :]
        assert len(again) + len(again_rejected) == 11_134 - position


def test_resume_after_each_committed_batch_loses_and_repeats_nothing(sample_batches):
    readings, _ = flat(sample_batches)
    for batch in sample_batches[::3]:
        head = [r for b in sample_batches if b.position <= batch.position for r in b.readings]
        tail, _ = flat(run(ReplaySource("replay", SAMPLE, batch_size=700), batch.position))
        assert head + tail == readings


# -- replay: bad rows ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, reason",
    [
        (row(value="abc"), "meter_reading: 'abc' is not a number"),
        (row(value=""), "meter_reading: empty"),
        (row(meter="7"), "meter: '7' is not a meter code 0..3"),
        (row(meter=""), "meter: '' is not a meter code 0..3"),
        (row(ts="2016-13-01 00:00:00"), "timestamp: '2016-13-01 00:00:00' is not a valid YYYY-MM-DD HH:MM:SS"),
        (row(ts="2016/01/01 03:00"), "timestamp: '2016/01/01 03:00' is not a valid YYYY-MM-DD HH:MM:SS"),
        (row(ts="2016-02-30 00:00:00"), "timestamp: '2016-02-30 00:00:00' is not a valid YYYY-MM-DD HH:MM:SS"),
        (row() + ",extra", "columns: 20 instead of 19"),
        ("1433,0,2016-01-01 03:00:00", "columns: 3 instead of 19"),
        (row(site="99"), "site_id: '99' has no UTC offset"),
        (row(site=""), "site_id: empty"),
        (row(building=""), "building_id: empty"),
    ],
    ids=["non-numeric", "empty-value", "meter-code", "empty-meter", "month-13", "format", "feb-30",
         "extra-column", "truncated", "unknown-site", "empty-site", "empty-building"],
)
def test_bad_rows_are_rejected_with_a_reason_and_reading_goes_on(tmp_path, bad, reason):
    path = write_csv(tmp_path / "bad.csv", [row(value="1.0"), bad, row(value="2.0")])
    batches = run(ReplaySource("bad", path))
    readings, rejected = flat(batches)
    assert [r.value for r in readings] == [1.0, 2.0]
    assert rejected == [Rejected(reason, bad, "bad", "bad.csv:3")]
    assert batches[-1].position == 3
    # The columnar face (training, gateway score) shares the row parser: same verdict, same words.
    table = ashrae.read(path)
    assert (table.meter_reading.tolist(), table.rejected) == ([1.0, 2.0], [(3, reason)])


def test_blank_lines_are_no_rows_for_either_face_but_count_in_the_position(tmp_path):
    path = write_csv(tmp_path / "b.csv", [row(value="1.0"), "", "\r", row(value="2.0")])
    batches = run(ReplaySource("b", path, batch_size=1))
    assert [(len(b.readings), b.rejected, b.position) for b in batches] == [(1, [], 1), (1, [], 4)]
    table = ashrae.read(path)
    assert (table.line_no.tolist(), table.rejected) == ([2, 5], [])


@pytest.mark.parametrize(
    "bad, reason",
    [
        (row(value="nan"), "value: nan is not finite"),
        (row(value="inf"), "value: inf is not finite"),
        (row(value="-4.5"), "value: -4.5 is negative"),
        (row(ts="1999-12-31 12:00:00"), "ts: 946659600000 is before 2000-01-01 (seconds instead of milliseconds?)"),
        (row(ts="2099-01-01 00:00:00"), "ts: 4070926800000 is more than 24 h in the future"),
    ],
    ids=["nan", "inf", "negative", "before-2000", "future"],
)
def test_the_source_checks_what_it_parses_and_quarantines_with_file_and_line(tmp_path, bad, reason):
    """A parsed row that readings.check refuses is rejected by the source itself, with its raw
    line and file:line (not by the buffer's net, as source@ts with a tuple)."""
    path = write_csv(tmp_path / "v.csv", [row(value="1.0"), bad, row(value="2.0")])
    readings, rejected = flat(run(ReplaySource("v", path)))
    assert [r.value for r in readings] == [1.0, 2.0]
    assert rejected == [Rejected(reason, bad, "v", "v.csv:3")]
    assert ashrae.read(path).rejected == [(3, reason)]


def test_a_file_without_the_required_columns_is_a_config_error(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("building_id,meter,timestamp\n1,0,2016-01-01 00:00:00\n")
    with pytest.raises(ConfigError, match=r"^path: .*x\.csv: no column meter_reading, site_id in the header$"):
        run(ReplaySource("x", path))


# -- replay: input that must never kill a source ------------------------------------------------


def replay_all(source: ReplaySource) -> tuple[list[Reading], list[Rejected]]:
    """Read ``source`` to its end, then restart it from every committed position: no restart may
    raise, and each gives exactly the rest. Returns what the first full read gave."""
    batches = run(source)
    readings, rejected = flat(batches)
    items = [(b.position, b.readings + b.rejected) for b in batches]
    for k, (position, _) in enumerate(items):
        rest = [i for _, chunk in items[k + 1 :] for i in chunk]
        again = run(ReplaySource(source.name, source.path, batch_size=source.batch_size), position)
        assert [i for b in again for i in b.readings + b.rejected] == rest
    return readings, rejected


def test_a_10_mb_line_is_rejected_cut_to_1_kb_and_its_batch_survives(tmp_path):
    huge = row(tail="Education," + "9" * 10_000_000)
    good = [row(value=f"{k}.5", ts=f"2016-01-01 0{k}:00:00") for k in range(6)]
    path = write_csv(tmp_path / "big.csv.gz", [*good[:3], huge, *good[3:]])
    readings, rejected = replay_all(ReplaySource("r", path, batch_size=5))
    assert [r.value for r in readings] == [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]  # the good rows of its batch too
    reason = f"line: {len(huge):,} characters, more than 131,072"
    assert [(r.reason, r.where) for r in rejected] == [(reason, "big.csv.gz:5")]
    assert rejected[0].raw == huge[:1024] + f"… [truncated: {len(huge):,} characters]"


@pytest.mark.parametrize(
    "field, reason",
    [
        ("\n".join(["x" * 1000] * 200), "csv: field larger than field limit (131072)"),  # 200 kB over 200 lines
        ("x\n" + "y" * 200_000, f"csv: a line of {200_002 + len(TAIL) - len('Education,'):,} characters inside a quoted field"),
    ],
    ids=["many-lines", "one-huge-line"],
)
def test_a_quoted_field_over_csv_s_field_limit_is_rejected_and_reading_goes_on(tmp_path, field, reason):
    bad = row(tail=f'"{field}",' + TAIL.split(",", 1)[1])
    path = write_csv(tmp_path / "q.csv", [row(value="1.0"), bad, row(value="2.0")])
    readings, rejected = replay_all(ReplaySource("q", path, batch_size=2))
    assert [r.value for r in readings] == [1.0, 2.0]
    assert (rejected[0].reason, rejected[0].where) == (reason, "q.csv:3")
    assert len(rejected[0].raw) < 1100
    # The rest of the broken field is rejected line by line; nothing of it becomes a reading.
    assert all(r.reason.startswith("columns: ") for r in rejected[1:])


def test_a_gzip_file_cut_short_gives_its_rows_and_stops_before_the_cut(tmp_path):
    whole = write_csv(tmp_path / "w.csv.gz", [row(building=str(k), value=f"{k}.0") for k in range(3000)])
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(whole.read_bytes()[:-500])
    batches = run(ReplaySource("c", path, batch_size=1000))
    readings, rejected = flat(batches)
    n = batches[-1].position
    assert 0 < n < 3000 and [r.value for r in readings] == [float(k) for k in range(n)]
    assert [(r.reason, r.where) for r in rejected] == [
        ("file: Compressed file ended before the end-of-stream marker was reached", f"cut.csv.gz:{n + 2}")
    ]
    again = run(ReplaySource("c", path), n)  # a restart meets the cut again, and does not die
    assert [(b.readings, [r.reason for r in b.rejected], b.position) for b in again] == [([], [rejected[0].reason], n)]


def test_bytes_that_are_not_utf_8_cost_their_row_only(tmp_path):
    path = tmp_path / "u.csv"
    lines = [row(value="1.0"), row(building="14\udcff3"), row(tail=TAIL.replace("Pittsburgh", "Pitt\udcffsburgh")), row(value="2.0")]
    path.write_bytes("\n".join([HEADER, *lines]).encode("utf-8", "surrogateescape") + b"\n")
    readings, rejected = replay_all(ReplaySource("u", path))
    assert [r.value for r in readings] == [1.0, 45.275, 2.0]  # a bad byte in the city column does no harm
    assert [(r.reason, r.where) for r in rejected] == [("building_id: '14\ufffd3' is not an integer", "u.csv:3")]


def write_json_lines(path: Path, messages: list[str]) -> Path:
    """A JSON array written one message per line, as text (so it may hold what json.dumps cannot)."""
    path.write_text("[\n" + ",\n".join(messages) + "\n]\n", encoding="utf-8")
    return path


def msg(value: str = "1.0", ts: str = str(JAN1_2016), building: str = "1433") -> str:
    return f'{{"building_id": {building}, "meter": 0, "site_id": 15, "timestamp": {ts}, "meter_reading": {value}}}'


BIG = "9" * 400  # a 400-digit integer: float() raises OverflowError on it


@pytest.mark.parametrize(
    "bad, reason",
    [
        (msg(value=BIG), f"meter_reading: {BIG[:20]}… [400 characters] is too large for a number"),
        (msg(ts=BIG), f"timestamp: {BIG[:20]}… [400 characters] is out of range"),
        (msg(building=BIG), f"building_id: {BIG[:20]}… [400 characters] is not an integer"),
        ("[" * 100_000 + "]" * 100_000, "json: nested too deeply to decode"),  # RecursionError
        (msg(value="9" * 5000), "json: Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits; use sys.set_int_max_str_digits() to increase the limit"),
        ('{"building_id": 1433,, "meter": 0}', "json: Expecting property name enclosed in double quotes at line 3"),
        (msg(value="-2.5"), "value: -2.5 is negative"),
        (msg(value="NaN"), "value: nan is not finite"),
    ],
    ids=["400-digit-value", "400-digit-ts", "400-digit-building", "nested-100000", "5000-digit-int", "syntax",
         "negative", "nan"],
)
def test_a_json_message_that_cannot_be_a_reading_costs_only_itself(tmp_path, bad, reason):
    good = [msg(value=f"{k}.5", ts=str(JAN1_2016 + k * HOUR)) for k in range(4)]
    path = write_json_lines(tmp_path / "r.json", [*good[:1], bad, *good[1:]])
    readings, rejected = replay_all(ReplaySource("j", path, batch_size=2))
    assert [r.value for r in readings] == [0.5, 1.5, 2.5, 3.5]
    assert [(r.reason, r.where) for r in rejected] == [(reason, "r.json:3[1]")]
    assert rejected[0].raw == ashrae.raw_text(bad) and len(rejected[0].raw) <= 1024 + 40


def test_the_fast_check_agrees_with_readings_check(tmp_path):
    """The row parser accepts a parsed row with one comparison; check() must agree on the edges."""
    from gateway.readings import check

    values = ["0", "-0.0", "1e-300", "-1e-300", "1.7e308", "1e309", "-inf", "nan", "12.5"]
    stamps = ["1999-12-31 23:59:59", "2000-01-01 00:00:00", "2016-06-01 12:00:00"]  # site 1: UTC
    lines = [row(value=v, ts=t, site="1") for v in values for t in stamps]
    readings, rejected = flat(run(ReplaySource("e", write_csv(tmp_path / "e.csv", lines))))
    got = {(r.value if not math.isnan(r.value) else "nan", r.ts) for r in readings}
    for v in values:
        for t in stamps:
            r = Reading("1", "1433", "electricity", local_to_utc_ms(t, 0), float(v), "e")
            key = (r.value if not math.isnan(r.value) else "nan", r.ts)
            assert (check(r) is None) == (key in got), (v, t, check(r))
    assert len(readings) + len(rejected) == len(lines)


@pytest.mark.parametrize("speed", [0, -3.0])
def test_speed_must_be_positive(speed):
    with pytest.raises(ConfigError, match=r"^speed: .* must be > 0"):
        ReplaySource("x", SAMPLE, speed=speed)


# -- replay: resume from every position --------------------------------------------------------


def _corpus(tmp_path: Path, name: str) -> Path:
    lines = []
    for h in range(12):
        ts = f"2016-01-01 {h:02d}:00:00"
        lines.append(row(ts=ts, value=f"{h}.5"))
        lines.append(row(building="1434", meter="2", ts=ts, value=f"{h}.25"))
        if h == 4:
            lines.append(row(ts=ts, value="oops"))
        if h == 7:
            lines.append(TRUNCATED)
    return write_csv(tmp_path / name, lines)


@pytest.mark.parametrize("name", ["corpus.csv", "corpus.csv.gz"])
@pytest.mark.parametrize("speed", [None, 3600.0])
def test_resume_from_every_position_gives_exactly_the_remainder(tmp_path, name, speed, no_sleep):
    path = _corpus(tmp_path, name)
    # One batch per line: line i (1-based data line) is the i-th item.
    per_line = run(ReplaySource("c", path, batch_size=1))
    items = [(b.readings + b.rejected)[0] for b in per_line]
    assert [b.position for b in per_line] == list(range(1, 27))
    assert len(items) == 26 and sum(isinstance(i, Rejected) for i in items) == 2
    for position in range(0, 27):
        clock = FakeClock()
        batches = run(ReplaySource("c", path, batch_size=5, speed=speed, clock=clock), position, FakeStop(clock))
        readings, rejected = flat(batches)
        rest = items[position:]
        assert readings == [i for i in rest if isinstance(i, Reading)]
        assert rejected == [i for i in rest if isinstance(i, Rejected)]
        sizes = [len(b.readings) + len(b.rejected) for b in batches]
        assert [b.position for b in batches] == [position + sum(sizes[: k + 1]) for k in range(len(batches))]


# -- replay: pacing ----------------------------------------------------------------------------


def test_pacing_groups_by_timestamp_and_waits_on_stop(tmp_path, no_sleep):
    path = write_csv(
        tmp_path / "p.csv",
        [row(ts="2016-01-01 00:00:00"), row(building="2", ts="2016-01-01 00:00:00"),
         row(ts="2016-01-01 01:00:00"), row(ts="2016-01-01 03:00:00")],
    )
    clock = FakeClock()
    stop = FakeStop(clock)
    batches = run(ReplaySource("p", path, speed=3600.0, clock=clock), None, stop)  # an hour a second
    assert [len(b.readings) for b in batches] == [2, 1, 1]
    assert [b.position for b in batches] == [2, 3, 4]
    assert stop.waits == pytest.approx([1.0, 2.0])


def test_pacing_with_a_slow_consumer_does_not_wait(tmp_path, no_sleep):
    path = write_csv(tmp_path / "p.csv", [row(ts=f"2016-01-01 0{h}:00:00") for h in range(3)])
    clock = FakeClock()
    stop = FakeStop(clock)
    for _ in ReplaySource("p", path, speed=3600.0, clock=clock).batches(None, stop):
        clock.t += 5.0  # the consumer takes 5 s per batch, longer than the 1 s pace
    assert stop.waits == []


def test_stop_during_a_pacing_wait_ends_promptly(tmp_path, no_sleep):
    path = write_csv(tmp_path / "p.csv", [row(ts=f"2016-01-01 0{h}:00:00") for h in range(5)])
    clock = FakeClock()
    stop = FakeStop(clock, stop_after_waits=1)
    batches = run(ReplaySource("p", path, speed=60.0, clock=clock), None, stop)
    assert [b.position for b in batches] == [1]  # the second batch was never released
    assert stop.waits == pytest.approx([60.0])


def test_backfill_never_waits_and_honours_stop(tmp_path, no_sleep):
    path = _corpus(tmp_path, "c.csv")
    clock = FakeClock()
    stop = FakeStop(clock)
    gen = ReplaySource("c", path, batch_size=4, clock=clock).batches(None, stop)
    first = next(gen)
    stop.set()
    assert list(gen) == []
    assert first.position == 4 and stop.waits == []


# -- replay: JSON ------------------------------------------------------------------------------


def _messages() -> list:
    return [
        {"building_id": 1433, "meter": 0, "site_id": 15, "timestamp": JAN1_2016, "meter_reading": 45.275},
        {"building_id": "1433", "meter": "2", "site_id": "15", "timestamp": JAN1_2016, "meter_reading": "3.5"},
        {"building_id": 1433, "meter": 9, "site_id": 15, "timestamp": JAN1_2016, "meter_reading": 1.0},
        {"building_id": 1433, "meter": 0, "site_id": 15, "timestamp": JAN1_2016 + HOUR, "meter_reading": None},
        "not a message",
        {"building_id": 997, "meter": 1, "site_id": 9, "timestamp": "2016-01-01 03:00:00", "meter_reading": 7},
        {"building_id": 997, "meter": 1, "site_id": 9, "timestamp": "yesterday", "meter_reading": 7},
        {"building_id": 997, "meter": 1, "site_id": 9, "meter_reading": 7},
        {"building_id": 997, "meter": 1, "site_id": 9, "timestamp": JAN1_2016 + 2 * HOUR, "meter_reading": "x"},
        {"building_id": 997, "meter": "steam", "site_id": 9, "timestamp": JAN1_2016 + 3 * HOUR, "meter_reading": 2.0},
    ]


def test_replay_json_array(tmp_path):
    path = tmp_path / "readings.json"
    path.write_text(json.dumps(_messages()))
    batches = run(ReplaySource("j", path, batch_size=4))
    readings, rejected = flat(batches)
    assert readings == [
        Reading("15", "1433", "electricity", JAN1_2016, 45.275, "j"),
        Reading("15", "1433", "steam", JAN1_2016, 3.5, "j"),
        Reading("9", "997", "chilledwater", JAN1_2016 + 9 * HOUR, 7.0, "j"),  # site-local text, UTC-6
        Reading("9", "997", "steam", JAN1_2016 + 3 * HOUR, 2.0, "j"),
    ]
    assert [(r.reason, r.where) for r in rejected] == [
        ("meter: 9 is not a meter code 0..3", "readings.json:1[2]"),
        ("meter_reading: empty", "readings.json:1[3]"),
        ("message: not a JSON object", "readings.json:1[4]"),
        ("timestamp: 'yesterday' is not a valid YYYY-MM-DD HH:MM:SS", "readings.json:1[6]"),
        ("timestamp: missing", "readings.json:1[7]"),
        ("meter_reading: 'x' is not a number", "readings.json:1[8]"),
    ]
    assert json.loads(rejected[0].raw) == _messages()[2]
    assert [b.position for b in batches] == [4, 8, 10]


def test_replay_json_resumes_from_every_position(tmp_path):
    path = tmp_path / "readings.json"
    path.write_text(json.dumps(_messages()))
    items = [(b.readings + b.rejected)[0] for b in run(ReplaySource("j", path, batch_size=1))]
    for position in range(len(items) + 1):
        readings, rejected = flat(run(ReplaySource("j", path, batch_size=3), position))
        rest = items[position:]
        assert readings == [i for i in rest if isinstance(i, Reading)]
        assert rejected == [i for i in rest if isinstance(i, Rejected)]


def test_a_json_file_cut_short_gives_what_precedes_the_cut_and_stops_before_it(tmp_path):
    text = json.dumps(_messages(), indent=1)
    whole = run(ReplaySource("j", _write(tmp_path / "cut.json", text)))
    path = _write(tmp_path / "cut.json", text[:-40])  # the last message (index 9) is cut short
    batches = run(ReplaySource("j", path, batch_size=100), 0)
    readings, rejected = flat(batches)
    assert readings == flat(whole)[0][:3] and rejected[:-1] == flat(whole)[1]
    cut_line = text.count("\n", 0, text.rindex("{")) + 1
    assert (rejected[-1].reason, rejected[-1].where) == ("json: the array is cut short", f"cut.json:{cut_line}[9]")
    assert batches[-1].position == 9  # the position stays before the cut ...
    again = run(ReplaySource("j", path), 9)  # ... so a restart meets it again, and does not die
    assert [([r.reason for r in b.rejected], b.readings, b.position) for b in again] == [(["json: the array is cut short"], [], 9)]
    _write(path, text)  # and once the file is whole, it reads on from there
    assert flat(run(ReplaySource("j", path), 9))[0] == flat(whole)[0][3:]


@pytest.mark.parametrize("text", ["[", "[1,", '[{"a": [1, 2', '[{"a": "b', "[1 2]", "[,]", "{}", ""])
def test_a_json_array_broken_anywhere_never_raises(tmp_path, text):
    batches = run(ReplaySource("j", _write(tmp_path / "b.json", text)))
    readings, rejected = flat(batches)
    assert readings == [] and rejected and all(r.reason.startswith(("json: ", "message: ")) for r in rejected)
    assert all(r.where.startswith("b.json:1[") for r in rejected)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_json_pacing_follows_utc_timestamps(tmp_path, no_sleep):
    path = tmp_path / "p.json"
    msgs = [{"building_id": 1, "meter": 0, "site_id": 0, "timestamp": JAN1_2016 + k * 60_000, "meter_reading": 1.0}
            for k in (0, 0, 1, 3)]
    path.write_text(json.dumps(msgs))
    clock = FakeClock()
    stop = FakeStop(clock)
    batches = run(ReplaySource("p", path, speed=60.0, clock=clock), None, stop)
    assert [b.position for b in batches] == [2, 3, 4]
    assert stop.waits == pytest.approx([1.0, 2.0])


# -- simulator ---------------------------------------------------------------------------------

T0 = 1_700_006_400_000  # 2023-11-15T00:00:00Z, a Wednesday


def sim(**kw) -> SimulatorSource:
    kw.setdefault("start_ms", T0)
    kw.setdefault("speed", None)
    return SimulatorSource("sim", **kw)


def test_simulator_fleet_is_shaped_like_ashrae():
    s = sim(count=1)
    assert isinstance(s, Source)
    assert len(s.meter_ids) == 2380 == len(set(s.meter_ids))
    assert [Counter(s.meter_types)[m] for m in METER_TYPES] == list(ASHRAE_METER_COUNTS)
    with open(DATA / "building_metadata.csv", newline="") as f:
        site_of = {r["building_id"]: r["site_id"] for r in csv.DictReader(f)}
    assert all(site_of[b] == site for b, site in zip(s.buildings, s.sites))
    assert len(set(s.sites)) == 16


def test_simulator_without_metadata_is_synthetic_and_scales(tmp_path):
    s = sim(meters=40, metadata_path=tmp_path / "absent.csv", count=3)
    readings, _ = flat(run(s))
    assert len(readings) == 120 and len(set(s.meter_ids)) == 40
    assert all(r.value >= 0 and r.source == "sim" for r in readings)


def test_simulator_is_deterministic_given_the_seed():
    a, _ = flat(run(sim(seed=7, count=3, anomaly_rate=0.01)))
    b, _ = flat(run(sim(seed=7, count=3, anomaly_rate=0.01)))
    c, _ = flat(run(sim(seed=8, count=3, anomaly_rate=0.01)))
    assert a == b
    assert [r.value for r in a] != [r.value for r in c]


def test_simulator_ticks_and_positions():
    batches = run(sim(meters=50, count=5, interval_s=60))
    assert [b.position for b in batches] == [T0 + 60_000 * 5]  # backfill packs ticks into a batch
    readings, _ = flat(batches)
    assert sorted({r.ts for r in readings}) == [T0 + 60_000 * k for k in range(5)]
    per_tick = run(sim(meters=50, count=5, batch_size=50))
    assert [b.position for b in per_tick] == [T0 + 60_000 * (k + 1) for k in range(5)]


def test_simulator_daily_and_weekly_shapes():
    s = sim(anomaly_rate=0.0)
    elec = np.array([m == "electricity" for m in s.meter_types])
    site15 = elec & np.array([site == "15" for site in s.sites])  # UTC-5
    # Wednesday 2023-11-15, site-local 14:00 vs 03:00.
    afternoon = s.values_at(T0 + 19 * HOUR)[0][site15].sum()
    night = s.values_at(T0 + 8 * HOUR)[0][site15].sum()
    assert afternoon > 1.5 * night
    # Saturday 2023-11-18 14:00 local is lower than the Wednesday.
    saturday = s.values_at(T0 + 3 * 24 * HOUR + 19 * HOUR)[0][site15].sum()
    assert saturday < 0.9 * afternoon


def test_simulator_injects_and_labels_anomalies(tmp_path):
    labels_csv = tmp_path / "labels.csv"
    s = sim(seed=3, anomaly_rate=0.01, count=10, labels_path=labels_csv)
    clean = sim(seed=3, anomaly_rate=0.0, count=10)
    readings, _ = flat(run(s))
    expected, _ = flat(run(clean))
    n = len(readings)
    assert 0.005 * n < len(s.labels) < 0.02 * n
    kinds = Counter(label.kind for label in s.labels)
    assert kinds["spike"] > 0 and kinds["dropout"] > 0
    labelled = {(label.meter_id, label.ts): label for label in s.labels}
    for r, e in zip(readings, expected):
        label = labelled.get((r.meter_id, r.ts))
        if label is None:
            assert r.value == e.value
        elif label.kind == "dropout":
            assert r.value == 0.0 and label.factor == 0.0
        else:
            assert 3.0 <= label.factor <= 10.0 and r.value == pytest.approx(e.value * label.factor)
    with open(labels_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["meter_id"], int(r["ts"]), r["kind"]) for r in rows] == [(x.meter_id, x.ts, x.kind) for x in s.labels]
    assert s.labels_between(T0, T0 + 10 * 60_000) == s.labels
    one = s.labels[0].meter_id
    assert s.labels_between(T0, T0 + 10 * 60_000, meter_id=one) == [x for x in s.labels if x.meter_id == one]
    assert s.labels_between(T0 + 10 * 60_000, T0 + 20 * 60_000)  # ticks not generated yet are labelled too
    assert all(isinstance(x, Label) for x in s.labels)


def test_simulator_labels_as_jsonl(tmp_path):
    path = tmp_path / "labels.jsonl"
    s = sim(seed=3, anomaly_rate=0.01, count=2, labels_path=path)
    run(s)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [x._asdict() for x in s.labels] and lines


def test_simulator_resume_reproduces_readings_and_labels():
    full = sim(seed=5, meters=300, anomaly_rate=0.02, count=8, batch_size=300)
    batches = run(full)
    readings, _ = flat(batches)
    cut = batches[3].position
    first = sim(seed=5, meters=300, anomaly_rate=0.02, count=8, batch_size=300)
    head = []
    for b in first.batches(None, threading.Event()):
        head.extend(b.readings)
        if b.position == cut:
            break  # the gateway "crashes" after committing this batch
    second = sim(seed=5, meters=300, anomaly_rate=0.02, count=8, batch_size=300)
    tail, _ = flat(run(second, cut))
    assert head + tail == readings
    assert first.labels + second.labels == full.labels


@pytest.mark.parametrize(
    "kw",
    [
        dict(count=3),  # the reference fleet from the bundled metadata
        dict(count=3, anomaly_rate=1.0),  # every reading a spike or a dropout
        dict(count=2, meters=5000, seed=9),  # more meters of a type than buildings: synthetic ones
        dict(count=2, meters=40, metadata_path="absent.csv"),  # no metadata at all
        dict(count=2, start_ms=946_684_800_000),  # the earliest start the config allows
        dict(count=2, interval_s=0.001),  # the shortest interval
    ],
    ids=["fleet", "all-anomalies", "synthetic-buildings", "no-metadata", "start-2000", "1-ms-ticks"],
)
def test_the_simulator_makes_only_readings_the_buffer_accepts(tmp_path, kw):
    """Nothing the simulator makes may end in the buffer's source@ts quarantine net."""
    from gateway.readings import check

    if "metadata_path" in kw:
        kw["metadata_path"] = tmp_path / kw["metadata_path"]
    readings, rejected = flat(run(sim(**kw)))
    assert readings and rejected == []
    assert [(r, check(r)) for r in readings if check(r) is not None] == []


def test_the_simulator_with_odd_metadata_still_makes_valid_readings(tmp_path):
    meta = tmp_path / "meta.csv"
    meta.write_text("building_id,site_id,square_feet\n1,15,1e308\n2,3,-5\n3,,100\n,4,100\n4,99,abc\n5,0,nan\n")
    readings, _ = flat(run(sim(count=2, meters=12, metadata_path=meta, anomaly_rate=0.5)))
    from gateway.readings import check

    assert {r.building for r in readings} <= {"1", "2", "4", "5", "sim-0", "sim-1", "sim-2", "sim-3"}
    assert [(r, check(r)) for r in readings if check(r) is not None] == []


def test_a_simulator_backfill_never_runs_more_than_24_h_ahead():
    """With speed null and a start at now, 1,500 minute ticks would end 25 h ahead, and the buffer
    would quarantine the last hour as sim@ts. The simulator waits at the horizon instead."""
    from gateway.readings import MAX_FUTURE_MS, check

    now = 1_700_000_000_000

    class StopAtTheFirstWait(threading.Event):
        def wait(self, timeout=None):
            self.waited = timeout
            return True  # the caller stops: what came before the wait is what we check

    stop = StopAtTheFirstWait()
    src = SimulatorSource("sim", meters=2, speed=None, start_ms=now, count=1500, wall=lambda: now / 1000)
    readings = [r for b in src.batches(None, stop) for r in b.readings]
    assert readings and [check(r, now) for r in readings if check(r, now) is not None] == []
    assert max(r.ts for r in readings) <= now + MAX_FUTURE_MS and stop.waited > 0


def test_simulator_real_time_paces_with_stop_wait(no_sleep):
    clock = FakeClock()
    stop = FakeStop(clock, stop_after_waits=3)
    s = SimulatorSource("sim", meters=10, start_ms=T0, speed=1.0, clock=clock)
    batches = run(s, None, stop)
    assert [b.position for b in batches] == [T0 + 60_000, T0 + 120_000, T0 + 180_000]
    assert stop.waits == pytest.approx([60.0, 60.0, 60.0])


def test_simulator_default_start_is_the_last_whole_interval():
    s = SimulatorSource("sim", meters=10, speed=1.0, wall=lambda: 1_700_000_059.9)
    assert s.start_ms == 1_700_000_040_000


def test_simulator_rejects_bad_config():
    with pytest.raises(ConfigError, match=r"^anomaly_rate: 2 must be within 0\.\.1$"):
        SimulatorSource("sim", anomaly_rate=2)
    with pytest.raises(ConfigError, match=r"^speed: "):
        SimulatorSource("sim", speed=0)


# -- weather -----------------------------------------------------------------------------------


def test_weather_replay_reads_the_extract():
    w = WeatherReplay(WEATHER)
    assert len(w) == 926 and w.rejected == []
    assert w.sites() == ["9", "14", "15"]
    ts = [m["timestamp"] for m in w]
    assert ts == sorted(ts)
    first15 = next(m for m in w if m["site_id"] == "15")
    assert first15["timestamp"] == 1_543_798_800_000 and first15["air_temperature"] == 8.296875
    assert math.isnan(first15["cloud_coverage"])  # null in the feed


def test_a_weather_message_that_cannot_be_decoded_costs_only_itself(tmp_path):
    good = [json.dumps(_weather(15, T0 + k * HOUR, float(k))) for k in range(3)]
    path = write_json_lines(tmp_path / "w.json", [good[0], "[" * 100_000 + "]" * 100_000, *good[1:], '{"site_id": 9, "timest'])
    w = WeatherReplay(path)
    assert [m["air_temperature"] for m in w] == [0.0, 1.0, 2.0]
    assert w.rejected == [(1, "json: nested too deeply to decode"), (4, "json: the array is cut short")]
    (tmp_path / "x.json").write_text('{"site_id": 9}')
    with pytest.raises(ValueError, match=r"x\.json: not a JSON array of weather messages$"):
        WeatherReplay(tmp_path / "x.json")


def test_a_400_digit_integer_in_a_weather_message_costs_that_message_or_field(tmp_path):
    big = "9" * 400
    path = write_json_lines(tmp_path / "w.json", [
        json.dumps(_weather(15, T0, 1.0)),
        f'{{"site_id": 15, "timestamp": {big}, "air_temperature": 2.0}}',
        f'{{"site_id": 15, "timestamp": {T0 + HOUR}, "air_temperature": {big}, "wind_speed": 3.0}}',
    ])  # fmt: skip
    w = WeatherReplay(path)
    assert w.rejected == [(1, f"timestamp: {big[:20]}… [400 characters] is not epoch milliseconds")]
    out = w.table().lookup(["15", "15"], [T0, T0 + HOUR])
    assert out["air_temperature"][0] == 1.0 and math.isnan(out["air_temperature"][1]) and out["wind_speed"][1] == 3.0


def _weather(site, ts, temp, **fields):
    return {"site_id": site, "timestamp": ts, "air_temperature": temp, **fields}


def test_latest_weather_lookup_with_staleness():
    table = LatestWeather()
    table.update([_weather(15, T0, 1.0, wind_speed=3.0), _weather(15, T0 + HOUR, 2.0), _weather(9, T0, 20.0)])
    sites = ["15", "15", "15", "15", "15", "9", "9", "3"]
    ts = [T0 - 1, T0, T0 + 30 * 60_000, T0 + HOUR, T0 + 4 * HOUR + 1, T0 + 3 * HOUR, T0 + 3 * HOUR + 1, T0]
    out = table.lookup(np.array(sites), np.array(ts))
    assert set(out) == set(WEATHER_FIELDS)
    np.testing.assert_array_equal(out["air_temperature"], [np.nan, 1.0, 1.0, 2.0, np.nan, 20.0, np.nan, np.nan])
    np.testing.assert_array_equal(out["wind_speed"], [np.nan, 3.0, 3.0, np.nan, np.nan, np.nan, np.nan, np.nan])
    tight = table.lookup(["15"], [T0 + 30 * 60_000], max_age_ms=10 * 60_000)
    assert math.isnan(tight["air_temperature"][0])


def test_latest_weather_replaces_a_repeated_hour_and_retains_a_window():
    table = LatestWeather(retain_ms=2 * HOUR)
    table.update([_weather(15, T0, 1.0)])
    table.update([_weather(15, T0, 5.0), _weather(15, T0 + 3 * HOUR, 7.0)])
    assert len(table) == 1  # T0 fell out of the 2 h window behind T0 + 3 h
    table2 = LatestWeather()
    table2.update([_weather(15, T0, 1.0)])
    table2.update([_weather(15, T0, 5.0)])
    assert len(table2) == 1 and table2.lookup(["15"], [T0])["air_temperature"][0] == 5.0


def test_weather_replay_feeds_the_table_as_time_advances():
    w = WeatherReplay(WEATHER)
    table = LatestWeather()
    first = w.messages[0]["timestamp"]
    fed = w.advance(table, first + HOUR)
    assert fed == len(w.between(first, first + HOUR + 1)) and fed > 0
    before = table.lookup(["15"], [first + 5 * HOUR])["air_temperature"]
    assert math.isnan(before[0])  # the newest known is 4 h old: stale
    w.advance(table, first + 5 * HOUR)
    after = table.lookup(["15"], [first + 5 * HOUR])["air_temperature"]
    expected = next(m for m in w if m["site_id"] == "15" and m["timestamp"] == first + 5 * HOUR)
    assert after[0] == expected["air_temperature"]
    full = w.table()
    assert len(full) == 926


def test_an_interval_of_a_whole_number_of_ms_that_floats_cannot_spell_is_accepted():
    assert SimulatorSource("sim", meters=1, interval_s=1.001).interval_ms == 1001
