"""The emulated IoT Analytics (emulator/iotanalytics.py): each pipeline activity on known
messages, the expression language, the channel's retention, the datastore's ``__dt``, the
datasets' SQL against known data with the exact CSV, their cron schedules on an injected clock,
content delivery keys, and the whole legacy template fed with messages shaped as its header says.
"""

from __future__ import annotations

import csv
from datetime import datetime, timezone
from pathlib import Path

import pytest

from emulator.iotanalytics import (
    BatchPutMessageError, InvalidRequest, LocalIoTAnalytics, Pipeline, ResourceNotFound, Schedule,
)
from emulator.iotanalytics_expr import UNDEFINED, ExpressionError, compile_expression

LEGACY = Path(__file__).resolve().parent.parent / "cloud" / "legacy-iot-analytics.yaml"
CHANNEL, DATASTORE = "metergateway_channel", "metergateway_datastore"
HIGHRES, DAILY = "metergateway_highres", "metergateway_daily"
KBTU = 0.29307107
DAY = 86400


def utc(*args) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def pipeline(*activities) -> Pipeline:
    """A pipeline in the API's shape: channel -> activities... -> datastore."""
    names = [f"a{i}" for i in range(len(activities))] + ["store"]
    acts = [{"channel": {"name": "in", "channelName": "ch", "next": names[0]}}]
    for i, (kind, spec) in enumerate(activities):
        acts.append({kind: {"name": names[i], **spec, "next": names[i + 1]}})
    acts.append({"datastore": {"name": "store", "datastoreName": "ds"}})
    return Pipeline("p", acts)


# ------------------------------------------------------------------ activities


def test_filter_keeps_only_messages_whose_expression_is_true():
    p = pipeline(("filter", {"filter": "value >= 0"}))
    assert p.run({"value": 3}) == {"value": 3}
    assert p.run({"value": 0.0}) == {"value": 0.0}
    assert p.run({"value": -1}) is None
    assert p.run({"other": 1}) is None           # Undefined is not true
    assert p.run({"value": "abc"}) is None       # a type that does not compare is Undefined
    assert p.run({"value": None}) is None


def test_math_computes_an_attribute_and_leaves_undefined_out():
    p = pipeline(("math", {"attribute": "kwh", "math": "value * unit_factor"}))
    assert p.run({"value": 100, "unit_factor": KBTU}) == {"value": 100, "unit_factor": KBTU, "kwh": 100 * KBTU}
    assert p.run({"value": 7, "unit_factor": 1}) == {"value": 7, "unit_factor": 1, "kwh": 7}
    assert p.run({"value": 7}) == {"value": 7}   # Undefined: no attribute added
    f = pipeline(("math", {"attribute": "c", "math": "(f - 32) * 5.0 / 9"}))
    assert f.run({"f": 212})["c"] == pytest.approx(100.0)
    i = pipeline(("math", {"attribute": "q", "math": "a / b"}))
    assert i.run({"a": 7, "b": 2})["q"] == 3     # Int / Int is Int, as in IoT SQL
    assert i.run({"a": -7, "b": 2})["q"] == -3   # truncated toward zero
    assert "q" not in i.run({"a": 1, "b": 0})    # division by zero is Undefined


def test_add_remove_and_select_attributes():
    msg = {"site": "15", "value": 2, "device": {"id": "m1", "fw": "1.2"}}
    add = pipeline(("addAttributes", {"attributes": {"value": "reading", "device.id": "meter"}}))
    assert add.run(msg) == {**msg, "reading": 2, "meter": "m1"}
    remove = pipeline(("removeAttributes", {"attributes": ["site", "device.fw", "missing"]}))
    assert remove.run(msg) == {"value": 2, "device": {"id": "m1"}}
    select = pipeline(("selectAttributes", {"attributes": ["value", "device.id", "missing"]}))
    assert select.run(msg) == {"value": 2, "device": {"id": "m1"}}
    assert msg == {"site": "15", "value": 2, "device": {"id": "m1", "fw": "1.2"}}  # the input is untouched


def test_activities_run_in_the_order_of_next_not_of_the_list():
    acts = [
        {"Datastore": {"Name": "store", "DatastoreName": "ds"}},
        {"Math": {"Name": "double", "Attribute": "v", "Math": "v * 2", "Next": "store"}},
        {"Channel": {"Name": "in", "ChannelName": "ch", "Next": "plus"}},
        {"Math": {"Name": "plus", "Attribute": "v", "Math": "v + 1", "Next": "double"}},
    ]
    p = Pipeline("p", acts)                      # CloudFormation's shape reads the same
    assert [name for _, name, _ in p.steps] == ["in", "plus", "double", "store"]
    assert p.run({"v": 1}) == {"v": 4}


@pytest.mark.parametrize("acts,message", [
    ([{"channel": {"name": "in", "channelName": "ch", "next": "nowhere"}},
      {"datastore": {"name": "store", "datastoreName": "ds"}}], r"'next' names 'nowhere'"),
    ([{"channel": {"name": "in", "channelName": "ch", "next": "l"}},
      {"lambda": {"name": "l", "lambdaName": "f", "batchSize": 1, "next": "store"}},
      {"datastore": {"name": "store", "datastoreName": "ds"}}], r"the lambda activity is not emulated"),
    ([{"channel": {"name": "in", "channelName": "ch", "next": "f"}},
      {"filter": {"name": "f", "filter": "value >=", "next": "store"}},
      {"datastore": {"name": "store", "datastoreName": "ds"}}], r"activity f: expected a value.* of 'value >='"),
    ([{"channel": {"name": "in", "channelName": "ch"}},
      {"datastore": {"name": "store", "datastoreName": "ds"}}], r"'in' has no next"),
])
def test_bad_pipelines_are_refused_naming_the_activity(acts, message):
    with pytest.raises(InvalidRequest, match=message):
        Pipeline("p", acts)


@pytest.mark.parametrize("expression,message,expected", [
    ("value >= 0 AND NOT meter_type = 'steam'", {"value": 1, "meter_type": "electricity"}, True),
    ("value >= 0 AND NOT meter_type = 'steam'", {"value": 1, "meter_type": "steam"}, False),
    ("a = 1 OR b = 1", {"a": 1}, True),            # true OR Undefined is true
    ("a = 1 AND b = 1", {"a": 2}, False),          # false AND Undefined is false
    ("a = 1 AND b = 1", {"a": 1}, UNDEFINED),
    ("a <> 'x'", {"a": "y"}, True),
    ("a != 2", {"a": 2}, False),
    ("a < '10'", {"a": 9}, True),                  # a numeric string compares as a number
    ("flag = true", {"flag": True}, True),
    ("a IS NULL", {"a": None}, True),
    ("a IS NOT NULL", {"a": 0}, True),
    ("x.y > 1", {"x": {"y": 2}}, True),
    ("7 % 3 + -2 * 2", {}, -3),
    ("round(2.5) + floor(-1.5) + ceil(0.1) + abs(-4)", {}, 3 - 2 + 1 + 4),
    ("power(2, 10) + sqrt(16) + mod(10, 4)", {}, 1024.0 + 4.0 + 2),
    ("ln(-1)", {}, UNDEFINED),
    ("'it''s' = s", {"s": "it's"}, True),
])
def test_expression_language(expression, message, expected):
    assert compile_expression(expression)(message) == expected if expected is not UNDEFINED \
        else compile_expression(expression)(message) is UNDEFINED


@pytest.mark.parametrize("expression,message", [
    ("", r"^empty expression at position 0"),
    ("a >= ", r"^expected a value, an attribute or '\(' at position 5 of 'a >= '$"),
    ("nope(1)", r"^unknown function 'nope'"),
    ("a # 1", r"^unexpected character '#' at position 2"),
    ("(a = 1", r"^expected \) at position 6"),
])
def test_expression_errors_say_where(expression, message):
    with pytest.raises(ExpressionError, match=message):
        compile_expression(expression)


# ------------------------------------------------------------------ the legacy template's resources


def reading_message(site: str, reading: list) -> dict:
    """A gateway reading ``["<building>:<meter type>", ts, value]`` of ``site`` as the channel
    receives it (the template's header): the thing <prefix>-<meter type> publishes
    {"building", "ts", "value"} on dt/meters/<site>/<thing>/raw and the meter type's rule adds
    site (topic level 3), meter_type and unit_factor (kBTU -> kWh for site 0 electricity)."""
    building, meter_type = reading[0].split(":")
    unit_factor = KBTU if (meter_type == "electricity" and site == "0") else 1
    return {"site": site, "building": building, "meter_type": meter_type, "ts": reading[1],
            "value": reading[2], "unit_factor": unit_factor}


@pytest.fixture
def clock():
    return Clock(utc(2017, 1, 1, 0, 30))


@pytest.fixture
def ia(tmp_path, clock):
    service = LocalIoTAnalytics(tmp_path, LEGACY, clock=clock)
    yield service
    service.close()


def test_the_template_declares_what_the_emulation_runs(ia):
    assert set(ia.channels) == {CHANNEL}
    assert set(ia.datastores) == {DATASTORE}
    assert [name for _, name, _ in ia.pipelines["metergateway_pipeline"].steps] == \
        ["from_channel", "drop_negative", "to_kwh", "to_datastore"]
    assert set(ia.datasets) == {HIGHRES, DAILY}
    assert ia.channels[CHANNEL].retention_s == 30 * DAY
    assert "FROM metergateway_datastore" in ia.datasets[DAILY].duck_sql


def test_batch_put_message_limits_and_refusals(ia):
    with pytest.raises(ResourceNotFound, match=r"^channel 'nope' does not exist \(channels: metergateway_channel\)$"):
        ia.batch_put_message("nope", [{"value": 1}])
    with pytest.raises(InvalidRequest, match=r"^BatchPutMessage takes 1 to 100 messages, got 101$"):
        ia.batch_put_message(CHANNEL, [{"value": 1}] * 101)
    good = reading_message("15", ["1433:electricity", 1483246800000, 1.5])
    with pytest.raises(BatchPutMessageError) as err:
        ia.batch_put_message(CHANNEL, [good, {"bad-name": 1}, b"not json",
                                       {"messageId": "m9", "payload": b'{"value": 2}'}])
    assert [(e["messageId"], e["errorCode"]) for e in err.value.entries] == \
        [("1", "InvalidRequestException"), ("2", "InvalidRequestException")]
    assert "'bad-name'" in err.value.entries[0]["errorMessage"]
    # the others were taken: the channel keeps them, the pipeline ran them
    assert ia.channel_messages(CHANNEL) == [good, {"value": 2}]
    assert ia.datastore_query(f"SELECT building, kwh FROM {DATASTORE} WHERE building IS NOT NULL").rows == [("1433", 1.5)]


def test_channel_keeps_raw_messages_for_its_retention_period(ia, clock):
    first = reading_message("15", ["1433:electricity", 1483246800000, -2.0])   # the filter drops it
    ia.batch_put_message(CHANNEL, [first])
    assert ia.channel_messages(CHANNEL) == [first]        # the channel keeps it raw all the same
    assert ia.datastore_query(f"SELECT count(*) FROM {DATASTORE}").rows == [(0,)]
    clock.t += 20 * DAY
    second = reading_message("15", ["1433:electricity", 1483250400000, 3.0])
    ia.batch_put_message(CHANNEL, [second])
    clock.t += 10 * DAY + 1                               # 30 days and a second after the first
    assert ia.channel_messages(CHANNEL) == [second]
    clock.t += 20 * DAY
    assert ia.channel_messages(CHANNEL) == []
    # the datastore has its own retention (3650 days): the reading it took is still there
    assert ia.datastore_query(f"SELECT ts FROM {DATASTORE}").rows == [(1483250400000,)]


def test_reprocessing_runs_the_kept_messages_again(ia):
    ia.batch_put_message(CHANNEL, [reading_message("15", ["1433:steam", 1483246800000, 5])])
    assert ia.start_pipeline_reprocessing("metergateway_pipeline") == 1
    assert ia.datastore_query(f"SELECT count(*), count(DISTINCT ts) FROM {DATASTORE}").rows == [(2, 1)]
    with pytest.raises(ResourceNotFound, match=r"^pipeline 'x' does not exist"):
        ia.start_pipeline_reprocessing("x")


def test_datastore_has_dt_the_day_each_message_arrived(ia, clock):
    clock.t = utc(2017, 1, 1, 23, 59, 59)
    ia.batch_put_message(CHANNEL, [reading_message("15", ["1433:electricity", 1483228800000, 1.0])])
    clock.t = utc(2017, 1, 2, 0, 0, 1)
    ia.batch_put_message(CHANNEL, [reading_message("15", ["1433:electricity", 1483232400000, 2.0])])
    result = ia.datastore_query(f"SELECT ts, __dt FROM {DATASTORE} ORDER BY ts")
    assert result.columns == ["ts", "__dt"]
    assert result.rows == [(1483228800000, datetime(2017, 1, 1)), (1483232400000, datetime(2017, 1, 2))]
    columns = ia.datastore_query(f"SELECT * FROM {DATASTORE} LIMIT 0").columns
    assert columns == ["site", "building", "meter_type", "ts", "value", "unit_factor", "kwh", "__dt"]
    # Presto date arithmetic on the partition column, as datasets filtered it
    one_day = ia.datastore_query(
        f"SELECT ts FROM {DATASTORE} WHERE __dt >= date_add('day', -1, TIMESTAMP '2017-01-03 00:00:00')")
    assert one_day.rows == [(1483232400000,)]
    ia.expire(utc(2017, 1, 1) + 3651 * DAY)               # the datastore's 3650 days
    assert ia.datastore_query(f"SELECT ts FROM {DATASTORE}").rows == [(1483232400000,)]


def test_datastore_columns_widen_when_types_change(ia):
    ia.batch_put_message(CHANNEL, [{"value": 1, "unit_factor": 1, "tag": 5}])
    ia.batch_put_message(CHANNEL, [{"value": 2.5, "unit_factor": 1, "tag": "x", "extra": {"a": [1]}}])
    rows = ia.datastore_query(f"SELECT value, kwh, tag, extra FROM {DATASTORE} ORDER BY value").rows
    assert rows == [(1.0, 1.0, "5", None), (2.5, 2.5, "x", '{"a":[1]}')]


DAILY_CSV = (
    '"site","building","meter_type","day","readings","kwh","mean_kwh","min_kwh","max_kwh"\n'
    '"15","1433","chilledwater","2017-01-01","1","4.0","4.0","4.0","4.0"\n'
    '"15","1433","electricity","2017-01-01","2","30.0","15.0","10.0","20.0"\n'
    '"15","1433","electricity","2017-01-02","1","5.5","5.5","5.5","5.5"\n'
    '"0","7","electricity","2017-01-01","2","0.29307107","0.146535535","0.0","0.29307107"\n'
)  # building is a string: '1433' sorts before '7'

HIGHRES_CSV = (
    '"site","building","meter_type","ts","kwh"\n'
    '"15","1433","chilledwater","1483228800000","4.0"\n'
    '"15","1433","electricity","1483228800000","10.0"\n'
    '"15","1433","electricity","1483232400000","20.0"\n'
    '"15","1433","electricity","1483315200000","5.5"\n'
    '"0","7","electricity","1483228800000","0.0"\n'
    '"0","7","electricity","1483232400000","0.29307107"\n'
)


def feed_known_readings(ia: LocalIoTAnalytics) -> None:
    readings = [
        ("15", ["1433:electricity", 1483228800000, 10.0]),   # 2017-01-01 00:00 UTC
        ("15", ["1433:electricity", 1483232400000, 20.0]),
        ("15", ["1433:electricity", 1483232400000, 20.0]),   # resent: DISTINCT keeps one
        ("15", ["1433:electricity", 1483315200000, 5.5]),    # 2017-01-02
        ("15", ["1433:electricity", 1483318800000, -1.0]),   # negative: the filter drops it
        ("15", ["1433:chilledwater", 1483228800000, 4.0]),
        ("0", ["7:electricity", 1483228800000, 0.0]),        # kBTU
        ("0", ["7:electricity", 1483232400000, 1.0]),
    ]
    ia.batch_put_message(CHANNEL, [reading_message(site, r) for site, r in readings])


def test_dataset_queries_give_the_expected_csv(ia):
    feed_known_readings(ia)
    assert ia.run_dataset(DAILY).read_text() == DAILY_CSV
    assert ia.run_dataset(HIGHRES).read_text() == HIGHRES_CSV
    assert ia.dataset_content(DAILY).read_text() == DAILY_CSV
    rows = list(csv.DictReader(ia.dataset_content(HIGHRES).open()))
    assert len(rows) == 6 and rows[5]["kwh"] == str(KBTU)


def test_cron_expressions():
    s = Schedule("cron(5 * * * ? *)")
    at = datetime(2017, 1, 1, 0, 5, tzinfo=timezone.utc)
    assert s.next_after(at) == datetime(2017, 1, 1, 1, 5, tzinfo=timezone.utc)
    assert s.next_after(datetime(2017, 1, 1, 0, 4, 59, tzinfo=timezone.utc)) == at
    daily = Schedule("cron(15 0 * * ? *)")
    assert daily.next_after(datetime(2017, 12, 31, 0, 15, tzinfo=timezone.utc)) == \
        datetime(2018, 1, 1, 0, 15, tzinfo=timezone.utc)
    weekdays = Schedule("cron(0/30 8-9 ? * MON-FRI *)")   # 2017-01-06 is a Friday
    assert weekdays.next_after(datetime(2017, 1, 6, 9, 30, tzinfo=timezone.utc)) == \
        datetime(2017, 1, 9, 8, 0, tzinfo=timezone.utc)
    last = Schedule("cron(0 12 L * ? 2017)")
    assert last.next_after(datetime(2017, 2, 1, tzinfo=timezone.utc)) == datetime(2017, 2, 28, 12, tzinfo=timezone.utc)
    assert last.next_after(datetime(2017, 12, 31, 12, tzinfo=timezone.utc)) is None
    second_tuesday = Schedule("cron(0 0 ? JAN 3#2 *)")
    assert second_tuesday.next_after(datetime(2017, 1, 1, tzinfo=timezone.utc)) == \
        datetime(2017, 1, 10, tzinfo=timezone.utc)
    sunday = Schedule("cron(0 0 ? * 1 *)")                 # 1 is Sunday in AWS's cron
    assert sunday.next_after(datetime(2017, 1, 2, tzinfo=timezone.utc)) == datetime(2017, 1, 8, tzinfo=timezone.utc)
    rate = Schedule("rate(2 hours)")
    origin = datetime(2017, 1, 1, tzinfo=timezone.utc)
    assert rate.next_after(datetime(2017, 1, 1, 3, tzinfo=timezone.utc), origin) == \
        datetime(2017, 1, 1, 4, tzinfo=timezone.utc)


@pytest.mark.parametrize("expression,message", [
    ("cron(5 * * * *)", r"cron needs 6 fields .*got 5"),
    ("cron(5 * * * * *)", r"exactly one of day-of-month and day-of-week must be '\?'"),
    ("cron(61 * * * ? *)", r"minutes: 61 is out of range 0\.\.59"),
    ("cron(0 0 ? * FOO *)", r"day-of-week: 'FOO' is not a value"),
    ("rate(1 hours)", r"use the singular unit for 1"),
    ("every hour", r"must be cron\(\.\.\.\) or rate\(\.\.\.\)"),
])
def test_bad_schedules_say_what_is_wrong(expression, message):
    with pytest.raises(InvalidRequest, match=message):
        Schedule(expression)


def test_run_due_runs_each_dataset_on_its_schedule(ia, clock):
    feed_known_readings(ia)                                # clock: 2017-01-01 00:30
    assert ia.run_due(utc(2017, 1, 1, 1, 4)) == []          # not due yet
    assert ia.run_due(utc(2017, 1, 1, 1, 5)) == [HIGHRES]
    assert ia.run_due(utc(2017, 1, 1, 1, 6)) == []          # ran once for 01:05
    assert ia.run_due(utc(2017, 1, 1, 5, 0)) == [HIGHRES]   # 02:05..04:05 missed: one run
    assert ia.run_due(utc(2017, 1, 2, 0, 14)) == [HIGHRES]
    assert ia.run_due(utc(2017, 1, 2, 0, 15)) == [DAILY]
    assert ia.dataset_content(DAILY).read_text() == DAILY_CSV
    clock.t = utc(2017, 1, 2, 1, 5)
    assert ia.run_due() == [HIGHRES]                        # now from the injected clock
    # no VersioningConfiguration: only the latest content is kept
    assert len(list((ia.home / "datasets" / HIGHRES).glob("*.csv"))) == 1


def test_schedule_state_and_data_survive_a_restart(tmp_path, clock):
    with LocalIoTAnalytics(tmp_path, LEGACY, clock=clock) as ia:
        feed_known_readings(ia)
        assert ia.run_due(utc(2017, 1, 1, 1, 5)) == [HIGHRES]
    with LocalIoTAnalytics(tmp_path, LEGACY, clock=clock) as ia:
        assert ia.run_due(utc(2017, 1, 1, 1, 30)) == []
        assert ia.datastore_query(f"SELECT count(*) FROM {DATASTORE}").rows == [(7,)]
        assert ia.dataset_content(HIGHRES).read_text() == HIGHRES_CSV


DELIVERING = """\
Parameters:
  Bucket: {Type: String, Default: metergateway-data}
Resources:
  Channel:
    Type: AWS::IoTAnalytics::Channel
    Properties: {ChannelName: in_channel, RetentionPeriod: {Unlimited: true}}
  Store:
    Type: AWS::IoTAnalytics::Datastore
    Properties: {DatastoreName: store}
  Pipeline:
    Type: AWS::IoTAnalytics::Pipeline
    Properties:
      PipelineName: p
      PipelineActivities:
        - Channel: {Name: c, ChannelName: !Ref Channel, Next: rename}
        - AddAttributes: {Name: rename, Attributes: {temp_f: fahrenheit}, Next: celsius}
        - Math: {Name: celsius, Attribute: celsius, Math: (fahrenheit - 32) / 1.8, Next: keep}
        - SelectAttributes: {Name: keep, Attributes: [device, celsius], Next: s}
        - Datastore: {Name: s, DatastoreName: !Ref Store}
  Report:
    Type: AWS::IoTAnalytics::Dataset
    Properties:
      DatasetName: report
      Actions:
        - ActionName: q
          QueryAction: {SqlQuery: !Sub "SELECT device, round(avg(celsius), 1) AS c FROM ${Store} GROUP BY device ORDER BY device"}
      Triggers:
        - Schedule: {ScheduleExpression: "cron(0 * * * ? *)"}
      ContentDeliveryRules:
        - Destination:
            S3DestinationConfiguration:
              Bucket: !Ref Bucket
              Key: dataset/report/!{iotanalytics:scheduleTime}/!{iotanalytics:versionId}.csv
              RoleArn: arn:aws:iam::000000000000:role/x
      VersioningConfiguration: {MaxVersions: 2}
  Follower:
    Type: AWS::IoTAnalytics::Dataset
    Properties:
      DatasetName: follower
      Actions:
        - ActionName: q
          QueryAction: {SqlQuery: SELECT count(*) AS n FROM store}
      Triggers:
        - TriggeringDataset: {DatasetName: report}
"""


def test_content_is_delivered_under_the_rules_keys(tmp_path):
    template = tmp_path / "t.yaml"
    template.write_text(DELIVERING)
    clock = Clock(utc(2024, 3, 1, 10, 20))
    with LocalIoTAnalytics(tmp_path / "root", template, clock=clock) as ia:
        ia.batch_put_message("in_channel", [{"device": "a", "temp_f": 212}, {"device": "a", "temp_f": 32},
                                            {"device": "b", "temp_f": 50, "noise": 1}])
        assert ia.run_due(utc(2024, 3, 1, 11, 0, 30)) == ["report", "follower"]
        bucket = tmp_path / "root" / "s3" / "metergateway-data"
        (delivered,) = bucket.glob("dataset/report/*/*.csv")
        schedule_dir, version = delivered.parent.name, delivered.stem
        assert schedule_dir == "2024-03-01T11:00:00.000Z"
        assert len(version) == 32
        assert delivered.read_text() == '"device","c"\n"a","50.0"\n"b","10.0"\n'
        assert ia.dataset_content("follower").read_text() == '"n"\n"3"\n'
        assert ia.run_due(utc(2024, 3, 1, 12, 0)) == ["report", "follower"]
        assert ia.run_due(utc(2024, 3, 1, 13, 0)) == ["report", "follower"]
        assert len(list(bucket.glob("dataset/report/*/*.csv"))) == 3     # delivered objects stay
        assert len(list((ia.home / "datasets" / "report").glob("*.csv"))) == 2  # MaxVersions: 2


def test_whole_legacy_template_fed_as_its_header_says(ia, clock):
    """A day of gateway readings of three buildings, as the template's rules put them into the
    channel, in batches of at most 100; both datasets run on their schedules."""
    start = 1483228800000  # 2017-01-01 00:00 UTC
    readings = []
    for hour in range(24):
        ts = start + hour * 3600000
        readings.append(("15", ["1433:electricity", ts, 10.0 + hour]))
        readings.append(("15", ["1433:chilledwater", ts, -1.0 if hour == 3 else 2.0]))
        readings.append(("0", ["7:electricity", ts, 100.0]))
        readings.append(("2", ["88:steam", ts, 1.5]))
        readings.append(("2", ["88:hotwater", ts, 0.5]))
    messages = [reading_message(site, r) for site, r in readings]
    for i in range(0, len(messages), 100):
        ia.batch_put_message(CHANNEL, messages[i:i + 100])
    assert len(ia.channel_messages(CHANNEL)) == 120
    assert ia.run_due(utc(2017, 1, 2, 0, 15)) == [HIGHRES, DAILY]
    daily = list(csv.DictReader(ia.dataset_content(DAILY).open()))
    by_meter = {(r["site"], r["building"], r["meter_type"]): r for r in daily}
    assert set(by_meter) == {("15", "1433", "electricity"), ("15", "1433", "chilledwater"),
                             ("0", "7", "electricity"), ("2", "88", "steam"), ("2", "88", "hotwater")}
    assert {r["day"] for r in daily} == {"2017-01-01"}
    assert by_meter["15", "1433", "electricity"]["kwh"] == str(sum(10.0 + h for h in range(24)))
    assert by_meter["15", "1433", "chilledwater"]["readings"] == "23"        # the negative one dropped
    assert float(by_meter["0", "7", "electricity"]["kwh"]) == pytest.approx(24 * 100 * KBTU)
    highres = list(csv.DictReader(ia.dataset_content(HIGHRES).open()))
    assert len(highres) == 119
    assert [r["building"] for r in highres] == sorted(r["building"] for r in highres)


def test_the_templates_rules_feed_the_channel(ia, tmp_path):
    """The legacy template's own topic rules (emulator.rules) put each meter thing's message into
    the channel: the same pipeline and datasets, fed through IoT Core's path."""
    import json

    from emulator.rules.engine import Actions, RulesEngine

    engine = RulesEngine([LEGACY], Actions(iotanalytics=ia, logs=tmp_path / "logs"))
    sent = [("15", "electricity", {"building": "1433", "ts": 1483228800000, "value": 41.35}),
            ("0", "electricity", {"building": "7", "ts": 1483228800000, "value": 100.0}),
            ("15", "steam", {"building": "1433", "ts": 1483228800000, "value": -3.0})]
    for site, meter, body in sent:
        engine.handle(f"dt/meters/{site}/metergateway-{meter}/raw", json.dumps(body).encode(),
                      client_id=f"metergateway-{meter}")
    assert ia.channel_messages(CHANNEL)[0] == {"site": "15", "building": "1433", "meter_type": "electricity",
                                               "ts": 1483228800000, "value": 41.35, "unit_factor": 1}
    rows = ia.datastore_query(f"SELECT site, meter_type, kwh FROM {DATASTORE} ORDER BY site").rows
    assert rows == [("0", "electricity", pytest.approx(100 * KBTU)), ("15", "electricity", 41.35)]
