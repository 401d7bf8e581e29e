"""The rules engine running the topic rules of cloud/*.yaml: actions, batch modes, Basic Ingest,
the error action, refused rules, and the receipt rule on a real mosquitto."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from emulator.rules.actions import Actions
from emulator.rules.engine import ANALYTICS, LEGACY, RuleError, RulesEngine
from emulator.rules.bench import make_messages, measure
from gateway.messages import decode, encode

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
ROWS = [["1433:electricity", 1483246800000, 41.35], ["1433:steam", 1483246800000, 2.0]]


class RecordingFirehose:
    def __init__(self, fail: str | None = None):
        self.calls: list[tuple[str, list[bytes]]] = []
        self.fail = fail

    def put_record_batch(self, stream_name, records):
        if self.fail:
            raise RuntimeError(self.fail)
        self.calls.append((stream_name, list(records)))


class RecordingAnalytics:
    def __init__(self):
        self.calls: list[tuple[str, list]] = []

    def batch_put_message(self, channel_name, messages):
        self.calls.append((channel_name, list(messages)))


class Republished(list):
    def __call__(self, topic, payload, qos):
        self.append((topic, payload, qos))


@pytest.fixture
def fakes(tmp_path):
    return Actions(firehose=RecordingFirehose(), iotanalytics=RecordingAnalytics(), republish=Republished(),
                   s3=tmp_path / "s3", logs=tmp_path / "logs")


def engine_for(fakes, *templates, **kw) -> RulesEngine:
    return RulesEngine(templates or (ANALYTICS,), fakes, clock=lambda: NOW, **kw)


def write_template(tmp_path: Path, sql: str, action: dict, version: str = "2016-03-23", error_action=None) -> Path:
    payload = {"AwsIotSqlVersion": version, "Sql": sql, "Actions": [action]}
    if error_action:
        payload["ErrorAction"] = error_action
    path = tmp_path / "rules.yaml"
    path.write_text(json.dumps({"Resources": {"TestRule": {"Type": "AWS::IoT::TopicRule", "Properties": {
        "RuleName": "test_rule", "TopicRulePayload": payload}}}}))
    return path


# ---------------------------------------------------------------- analytics.yaml on gateway messages

def test_raw_message_goes_to_firehose_with_kind_topic_and_received_ms(fakes):
    payload = encode("gw-1", "15", ROWS)
    assert engine_for(fakes).handle("dt/meters/15/gw-1/raw", payload, "gw-1") == 2  # raw + receipt rules
    [(stream, [record])] = fakes.firehose.calls
    assert stream == "metergateway-readings"
    assert json.loads(record) == decode(payload) | {"kind": "raw", "topic": "dt/meters/15/gw-1/raw",
                                                    "received_ms": int(NOW * 1000)}


def test_receipt_for_a_real_gateway_message(fakes):
    payload = encode("gw-1", "15", [r + [40.0, 0.7, False] for r in ROWS], model="m-3")
    engine_for(fakes).handle("dt/meters/15/gw-1/scored", payload, "gw-1")
    assert fakes.republish == [("cmd/meters/gw-1/receipt",
                                b'{"batch":"%s","topic":"dt/meters/15/gw-1/scored"}' % decode(payload)["batch"].encode(),
                                1)]
    assert len(fakes.firehose.calls) == 1  # the scored rule


def test_health_goes_to_its_log_group_as_json_lines(fakes, tmp_path):
    engine = engine_for(fakes)
    for depth in (3, 4):
        engine.handle("dt/meters/gateway/gw-1/health", json.dumps({"buffer": {"depth": depth}}).encode(), "gw-1")
    lines = (tmp_path / "logs" / "metergateway" / "health" / "gw-1.log").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"buffer": {"depth": d}, "thing": "gw-1", "received_ms": int(NOW * 1000)}
                                              for d in (3, 4)]
    assert fakes.republish == [] and fakes.firehose.calls == []  # no receipt for health


def test_basic_ingest_reaches_only_its_rule_with_the_topic_stripped(fakes):
    payload = encode("gw-1", "15", ROWS)
    engine = engine_for(fakes)
    assert engine.handle("$aws/rules/metergateway_raw/dt/meters/15/gw-1/scored", payload, "gw-1") == 1
    [(_, [record])] = fakes.firehose.calls
    assert json.loads(record)["kind"] == "scored" and json.loads(record)["topic"] == "dt/meters/15/gw-1/scored"
    assert fakes.republish == []  # no receipt through Basic Ingest
    assert engine.handle("$aws/rules/no_such_rule/dt/x", payload) == 0 and engine.stats.dropped == 1


# ---------------------------------------------------------------- the legacy template

def test_legacy_rules_put_readings_into_the_channel_with_the_unit_factor(fakes):
    engine = engine_for(fakes, LEGACY)
    reading = json.dumps({"building": "1433", "ts": 1483246800000, "value": 41.35}).encode()
    engine.handle("dt/meters/0/metergateway-electricity/raw", reading)
    engine.handle("dt/meters/15/metergateway-electricity/raw", reading)
    engine.handle("dt/meters/15/metergateway-steam/raw", reading)
    assert fakes.iotanalytics.calls == [
        ("metergateway_channel", [{"site": "0", "building": "1433", "meter_type": "electricity", "ts": 1483246800000,
                                   "value": 41.35, "unit_factor": 0.29307107}]),
        ("metergateway_channel", [{"site": "15", "building": "1433", "meter_type": "electricity",
                                   "ts": 1483246800000, "value": 41.35, "unit_factor": 1}]),
        ("metergateway_channel", [{"site": "15", "building": "1433", "meter_type": "steam", "ts": 1483246800000,
                                   "value": 41.35, "unit_factor": 1}]),
    ]


def test_both_templates_load_every_rule():
    names = {r.name for r in RulesEngine([ANALYTICS, LEGACY]).rules}
    assert names == {"metergateway_raw", "metergateway_scored", "metergateway_receipt", "metergateway_health",
                     *(f"metergateway_legacy_{k}" for k in ("electricity", "chilledwater", "steam", "hotwater"))}


# ---------------------------------------------------------------- batch modes

def test_firehose_batch_mode_splits_an_array_into_batches_of_at_most_500(fakes, tmp_path):
    path = write_template(tmp_path, "SELECT VALUE readings FROM 'dt/#'",
                          {"Firehose": {"DeliveryStreamName": "s", "BatchMode": True, "Separator": "\n"}})
    readings = [{"i": i} for i in range(1200)]
    RulesEngine([path], fakes).handle("dt/x", json.dumps({"readings": readings}).encode())
    assert [len(records) for _, records in fakes.firehose.calls] == [500, 500, 200]
    records = [r for _, batch in fakes.firehose.calls for r in batch]
    assert records[0] == b'{"i":0}\n' and [json.loads(r) for r in records] == readings


def test_firehose_without_batch_mode_sends_the_array_as_one_record(fakes, tmp_path):
    path = write_template(tmp_path, "SELECT VALUE readings FROM 'dt/#'",
                          {"Firehose": {"DeliveryStreamName": "s", "BatchMode": False}})
    RulesEngine([path], fakes).handle("dt/x", b'{"readings": [1, 2, 3]}')
    assert fakes.firehose.calls == [("s", [b"[1,2,3]"])]


def test_iot_analytics_batch_mode_sends_at_most_100_messages_a_call(fakes, tmp_path):
    path = write_template(tmp_path, "SELECT VALUE readings FROM 'dt/#'",
                          {"IotAnalytics": {"ChannelName": "ch", "BatchMode": True}})
    RulesEngine([path], fakes).handle("dt/x", json.dumps({"readings": [{"i": i} for i in range(250)]}).encode())
    assert [(ch, len(m)) for ch, m in fakes.iotanalytics.calls] == [("ch", 100), ("ch", 100), ("ch", 50)]


# ---------------------------------------------------------------- the error action

def test_a_failing_action_gives_the_error_action_the_documented_message(fakes, tmp_path):
    fakes.firehose.fail = "ServiceUnavailableException: slow down"
    payload = encode("gw-1", "15", ROWS)
    engine = engine_for(fakes)
    engine.handle("dt/meters/15/gw-1/raw", payload, "gw-1")
    [obj] = list((tmp_path / "s3" / "metergateway-data" / "errors" / "iot" / "raw").rglob("*.json"))
    assert re.fullmatch(r"2023-11-14/[0-9a-f-]{36}\.json",
                        obj.relative_to(tmp_path / "s3/metergateway-data/errors/iot/raw").as_posix())
    message = json.loads(obj.read_bytes())
    assert list(message) == ["ruleName", "topic", "cloudwatchTraceId", "clientId", "base64OriginalPayload", "failures"]
    assert message["ruleName"] == "metergateway_raw" and message["topic"] == "dt/meters/15/gw-1/raw"
    assert message["clientId"] == "gw-1" and re.fullmatch(r"[0-9a-f-]{36}", message["cloudwatchTraceId"])
    assert base64.b64decode(message["base64OriginalPayload"]) == payload  # nothing is lost
    [failure] = message["failures"]
    assert failure["failedAction"] == "FirehoseAction" and failure["failedResource"] == "metergateway-readings"
    assert "ServiceUnavailableException: slow down" in failure["errorMessage"]
    assert engine.stats.action_failures == 1 and engine.stats.error_action_failures == 0
    assert len(fakes.republish) == 1  # the receipt rule is another rule: it still answers


def test_an_unconfigured_service_fails_into_the_legacy_error_log(tmp_path):
    engine = RulesEngine([LEGACY], Actions(logs=tmp_path / "logs"))  # no IoT Analytics in this emulation
    engine.handle("dt/meters/15/metergateway-steam/raw", b'{"building": "1", "ts": 1, "value": 2}', "m-1")
    [line] = (tmp_path / "logs" / "metergateway" / "legacy-rule-errors" / "m-1.log").read_text().splitlines()
    failure = json.loads(line)["failures"][0]
    assert failure["failedAction"] == "IotAnalyticsAction" and failure["failedResource"] == "metergateway_channel"
    assert "not part of this emulation" in failure["errorMessage"]


# ---------------------------------------------------------------- refused rules

def test_a_rule_of_another_sql_version_is_refused_by_name(tmp_path):
    path = write_template(tmp_path, "SELECT * FROM 'a'", {"Republish": {"Topic": "b"}}, version="2015-10-08")
    with pytest.raises(RuleError, match=r"^rule test_rule \(rules.yaml:TestRule\): AwsIotSqlVersion is '2015-10-08'"):
        RulesEngine([path])


def test_an_unquoted_from_is_refused_by_name(tmp_path):
    path = write_template(tmp_path, "SELECT * FROM a/b", {"Republish": {"Topic": "b"}})
    with pytest.raises(RuleError, match=r"^rule test_rule \(rules.yaml:TestRule\): FROM takes a topic filter in single"):
        RulesEngine([path])


def test_an_action_the_emulation_lacks_is_refused_by_name(tmp_path):
    path = write_template(tmp_path, "SELECT * FROM 'a'", {"Lambda": {"FunctionArn": "x"}})
    with pytest.raises(RuleError, match=r"^rule test_rule .*: the Lambda action is not emulated"):
        RulesEngine([path])


# ---------------------------------------------------------------- the real Firehose emulation

def test_with_the_local_firehose_the_raw_message_lands_in_s3(tmp_path):
    from emulator.firehose import LocalFirehose

    firehose = LocalFirehose(tmp_path, clock=lambda: NOW, timer=False)
    try:
        engine = RulesEngine([ANALYTICS], Actions(firehose=firehose, republish=Republished()), clock=lambda: NOW)
        payload = encode("gw-1", "15", ROWS)
        engine.handle("dt/meters/15/gw-1/raw", payload, "gw-1")
        keys = firehose.flush()
    finally:
        firehose.close()
    assert len(keys) == 1 and keys[0].startswith("readings/kind=raw/dt=2023-11-14/")
    assert engine.stats.action_failures == 0


# ---------------------------------------------------------------- performance

def test_measure_gives_a_rate_over_messages_as_the_gateway_makes_them():
    messages = make_messages(5)
    assert all(71 <= n <= 100 and decode(p)["n"] == n for _, p, n in messages)
    assert measure(50) > 1000


# ---------------------------------------------------------------- on the real broker

def test_the_broker_binding_republishes_the_receipt(broker, certs, make_publisher):
    from conftest import SUBSCRIBER
    from emulator.rules.binding import BrokerBinding
    from gateway.publishers.mqtt import MqttSubscriber

    client = certs.client(SUBSCRIBER)
    firehose = RecordingFirehose()
    engine = RulesEngine([ANALYTICS], Actions(firehose=firehose))
    receipts = MqttSubscriber("localhost", "receipt-watcher", client.cert, client.key, certs.ca, port=broker.port,
                              topic_filter="cmd/meters/+/receipt").start()
    try:
        with BrokerBinding(engine, "localhost", broker.port, client.cert, client.key, certs.ca) as rules:
            assert rules.wait_subscribed(10)
            payload = encode("gw-1", "15", ROWS)
            make_publisher().publish("dt/meters/15/gw-1/raw", payload).result(10)
            assert receipts.wait_for(lambda msgs: len(msgs) >= 1, 10)
            assert rules.wait_for(lambda r: r.republished == 1, 10)
    finally:
        receipts.close()
    [msg] = receipts.snapshot()
    assert msg.topic == "cmd/meters/gw-1/receipt"
    assert json.loads(msg.payload) == {"batch": decode(payload)["batch"], "topic": "dt/meters/15/gw-1/raw"}
    assert [json.loads(r)["batch"] for _, [r] in firehose.calls] == [decode(payload)["batch"]]


def test_the_binding_subscribes_so_that_each_message_arrives_once():
    from emulator.rules.binding import subscription_filters

    assert subscription_filters(RulesEngine([ANALYTICS, LEGACY]).filters()) == ["dt/meters/+/+/+"]
    assert subscription_filters(["a/+/c", "a/b/+"]) == ["#"]  # overlapping, neither covers the other
    assert subscription_filters(["a/b", "c/#", "a/b"]) == ["a/b", "c/#"]
