"""The local nucleus's bridge to IoT Core and its spooler, against a real mosquitto with mutual TLS."""

from __future__ import annotations

import threading

import pytest

from emulator.broker import free_port
from emulator.nucleus.iotcore import (IotCoreBridge, MessageTooLarge, OfflineQos0Dropped, SpoolConfig, SpoolFull,
                                      SubscribeFailed, topic_matches)
from emulator.nucleus.spool import DEFAULT_MAX_SIZE_BYTES, Spool
from gateway.errors import ConfigError
from conftest import SUBSCRIBER, THING, publisher_for

WAIT = 10.0


class Recorder:
    """Collects callback arguments; a test waits on a condition over them."""

    def __init__(self):
        self.items: list = []
        self._cond = threading.Condition()

    def __call__(self, *args):
        with self._cond:
            self.items.append(args if len(args) > 1 else args[0])
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = WAIT):
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.items), timeout)


@pytest.fixture
def make_bridge(certs):
    made: list[IotCoreBridge] = []

    def make(port: int, *, connect: bool = True, **kwargs) -> IotCoreBridge:
        client = certs.client(THING)
        kwargs.setdefault("min_reconnect_delay", 0.05)
        kwargs.setdefault("max_reconnect_delay", 0.3)
        bridge = IotCoreBridge("localhost", port, THING, client.cert, client.key, certs.ca, **kwargs)
        made.append(bridge)
        bridge.start()
        if connect:
            assert bridge.wait_connected(WAIT), f"bridge did not connect: {bridge.last_error}"
        return bridge

    yield make
    for bridge in made:
        bridge.close()


def payloads(messages, topic):
    return [m.payload for m in messages if m.topic == topic]


def test_publish_while_online_arrives(make_bridge, broker, subscriber):
    bridge = make_bridge(broker.port)
    bridge.publish("dt/meters/s1/gw/raw", b"one", 1)
    bridge.publish("dt/meters/s1/gw/raw", b"two", 0)
    assert subscriber.wait_for(lambda ms: len(payloads(ms, "dt/meters/s1/gw/raw")) == 2, WAIT)
    assert payloads(subscriber.snapshot(), "dt/meters/s1/gw/raw") == [b"one", b"two"]
    assert bridge.wait_spool_empty(WAIT)
    assert bridge.spool_stats.dropped_qos0 == 0


def test_offline_qos0_is_dropped_and_qos1_spooled_then_delivered(make_bridge, link, subscriber):
    bridge = make_bridge(link.port)
    link.cut()
    assert bridge.wait_connected(WAIT, connected=False)
    with pytest.raises(OfflineQos0Dropped, match=r"^Device is offline\. Dropping QoS 0 message\.$"):
        bridge.publish("dt/x/q0", b"lost", 0)
    for i in range(3):
        bridge.publish("dt/x/q1", b"kept-%d" % i, 1)
    stats = bridge.spool_stats
    assert (stats.messages, stats.bytes, stats.dropped_qos0) == (3, 18, 1)
    link.restore()
    assert subscriber.wait_for(lambda ms: len(payloads(ms, "dt/x/q1")) == 3, WAIT)
    assert payloads(subscriber.snapshot(), "dt/x/q1") == [b"kept-0", b"kept-1", b"kept-2"]
    assert payloads(subscriber.snapshot(), "dt/x/q0") == []
    assert bridge.wait_spool_empty(WAIT)


def test_unacknowledged_qos1_is_sent_again_and_queued_qos0_dropped_at_disconnect(make_bridge, broker, link,
                                                                                   subscriber):
    bridge = make_bridge(link.port, max_in_flight=1)
    broker.pause()  # the QoS 1 publish gets no PUBACK, so the QoS 0 one waits behind it
    bridge.publish("dt/x/held", b"held", 1)
    bridge.publish("dt/x/q0", b"queued", 0)
    assert bridge.wait_until(lambda stats: stats.in_flight == 1, WAIT)
    link.cut()
    assert bridge.wait_connected(WAIT, connected=False)
    stats = bridge.spool_stats
    assert (stats.messages, stats.queued, stats.dropped_qos0) == (1, 1, 1)
    broker.resume()
    link.restore()
    assert subscriber.wait_for(lambda ms: payloads(ms, "dt/x/held"), WAIT)
    assert bridge.wait_spool_empty(WAIT)
    assert payloads(subscriber.snapshot(), "dt/x/q0") == []


def test_spool_full_answers_the_nucleus_text(make_bridge):
    bridge = make_bridge(free_port(), connect=False, spool=SpoolConfig(max_size_bytes=1000))
    bridge.publish("dt/x", b"a" * 600, 1)
    with pytest.raises(SpoolFull, match=r"^Message spool is full\. Message could not be added\.$"):
        bridge.publish("dt/x", b"b" * 600, 1)
    with pytest.raises(SpoolFull, match=r"^Message is larger than the size of message spool\.$"):
        bridge.publish("dt/x", b"c" * 1001, 1)
    with pytest.raises(MessageTooLarge, match=r"^The publishing message size 131073 bytes exceeds the configured "
                                              r"limit of 131072 bytes$"):
        bridge.publish("dt/x", b"d" * (128 * 1024 + 1), 1)
    bridge.publish("dt/x", b"e" * 400, 1)  # exactly full
    assert (bridge.spool_stats.messages, bridge.spool_stats.bytes) == (2, 1000)


def test_a_full_spool_evicts_the_oldest_qos0_never_qos1():
    spool = Spool(SpoolConfig(max_size_bytes=1000, keep_qos0_when_offline=True))
    spool.add("t/0a", b"x" * 300, 0)
    spool.add("t/1", b"x" * 300, 1)
    spool.add("t/0b", b"x" * 300, 0)
    spool.add("t/new", b"x" * 300, 1)  # evicts t/0a only
    assert [spool.pop().topic for _ in range(3)] == ["t/1", "t/0b", "t/new"]
    assert spool.stats().dropped_qos0 == 1
    with pytest.raises(SpoolFull, match=r"^Message spool is full\. Message could not be added\.$"):
        spool.add("t/more", b"x" * 200, 1)  # in flight is never evicted


def test_a_failed_message_goes_first_and_is_dropped_after_max_retry():
    spool = Spool(SpoolConfig())
    first = spool.add("t/a", b"a", 1)
    spool.add("t/b", b"b", 1)
    msg = spool.pop()
    assert spool.requeue(msg.id, max_retry=1)
    again = spool.pop()
    assert (again.id, again.retried) == (first, 1)
    assert not spool.requeue(again.id, max_retry=1)
    assert spool.pop().topic == "t/b"
    assert spool.stats().dropped_failed == 1


def test_disk_spool_survives_a_restart_of_the_bridge(make_bridge, broker, subscriber, tmp_path):
    config = SpoolConfig(storage_type="Disk", path=tmp_path / "spool.db")
    offline = make_bridge(free_port(), connect=False, spool=config)
    for i in range(3):
        offline.publish("dt/x/disk", b"disk-%d" % i, 1)
    offline.close()
    bridge = make_bridge(broker.port, spool=config)
    assert subscriber.wait_for(lambda ms: len(payloads(ms, "dt/x/disk")) == 3, WAIT)
    assert payloads(subscriber.snapshot(), "dt/x/disk") == [b"disk-0", b"disk-1", b"disk-2"]
    assert bridge.wait_spool_empty(WAIT)
    bridge.close()
    assert Spool(config).stats().messages == 0  # acknowledged means deleted from the file


def test_subscriptions_survive_a_broker_restart(make_bridge, broker, certs):
    bridge = make_bridge(broker.port)
    got = Recorder()
    bridge.subscribe("cmd/meters/+/receipt", 1, got)
    assert bridge.wait_subscribed(WAIT)
    sender = publisher_for(broker, certs, thing=SUBSCRIBER)
    sender.start()
    try:
        assert sender.wait_connected(WAIT)
        sender.publish(f"cmd/meters/{THING}/receipt", b"before", 1).result(WAIT)
        assert got.wait_for(lambda items: (f"cmd/meters/{THING}/receipt", b"before") in items)
        broker.stop()
        assert bridge.wait_connected(WAIT, connected=False)
        broker.start()
        assert bridge.wait_subscribed(WAIT) and sender.wait_connected(WAIT)
        sender.publish(f"cmd/meters/{THING}/receipt", b"after", 1).result(WAIT)
        assert got.wait_for(lambda items: (f"cmd/meters/{THING}/receipt", b"after") in items)
    finally:
        sender.close()


def test_unsubscribe_stops_the_callback(make_bridge, broker, certs):
    bridge = make_bridge(broker.port)
    gone, kept = Recorder(), Recorder()
    stop = bridge.subscribe("cmd/a", 1, gone)
    bridge.subscribe("cmd/#", 1, kept)
    stop()
    stop()  # idempotent
    assert bridge.subscriptions() == {"cmd/#": 1}
    sender = publisher_for(broker, certs, thing=SUBSCRIBER)
    sender.start()
    try:
        assert sender.wait_connected(WAIT)
        sender.publish("cmd/a", b"x", 1).result(WAIT)
        assert kept.wait_for(lambda items: items == [("cmd/a", b"x")])
        assert gone.items == []
    finally:
        sender.close()


def test_status_listener_sees_false_then_true_across_an_outage(make_bridge, link):
    bridge = make_bridge(link.port)
    seen = Recorder()
    bridge.add_status_listener(seen)
    link.cut()
    assert seen.wait_for(lambda items: items == [False])
    link.restore()
    assert seen.wait_for(lambda items: items == [False, True])
    assert bridge.connected


def test_topic_filters_match_as_mqtt_says():
    assert topic_matches("a/+/c", "a/b/c") and topic_matches("a/#", "a") and topic_matches("#", "a/b")
    assert not topic_matches("a/+", "a/b/c") and not topic_matches("#", "$aws/things/x")
    assert topic_matches("$aws/things/+/shadow/#", "$aws/things/gw/shadow/update")


def test_bad_settings_name_the_nucleus_key(make_bridge):
    with pytest.raises(ConfigError, match=r"^mqtt\.spooler\.storageType: 'Tape' is not one of Memory, Disk$"):
        SpoolConfig.from_nucleus({"storageType": "Tape"})
    with pytest.raises(ConfigError, match=r"^mqtt\.spooler\.maxSizeInBytes: "):
        SpoolConfig.from_nucleus({"maxSizeInBytes": 0})
    assert SpoolConfig.from_nucleus(None) == SpoolConfig()
    assert SpoolConfig().max_size_bytes == DEFAULT_MAX_SIZE_BYTES == 2_621_440
    bridge = make_bridge(free_port(), connect=False)
    with pytest.raises(SubscribeFailed, match=r"^Subscribe to topic 'a/#/b' failed: "):
        bridge.subscribe("a/#/b", 1, print)


def test_mqtt5_properties_are_spooled_with_the_message(tmp_path):
    config = SpoolConfig(storage_type="Disk", path=tmp_path / "spool.db")
    props = {"retain": True, "user_properties": [["k", "v"]], "correlation_data": b"\x00\xff",
             "payload_format": "UTF8", "content_type": "application/json"}
    spool = Spool(config)
    spool.add("dt/x", b"{}", 1, props)
    spool.close()
    again = Spool(config).pop()
    assert (again.topic, again.payload, again.properties) == ("dt/x", b"{}", props)


def test_the_mqttproxy_seam_carries_messages_with_their_properties(make_bridge, broker):
    from emulator.nucleus.iotcore import MqttProxyBridge

    # the calls MqttProxy makes (emulator/nucleus/mqttproxy.py), keywords and all
    seam = MqttProxyBridge(make_bridge(broker.port))
    assert seam.connected
    got = Recorder()
    seam.subscribe("dt/loop/#", 1, got)
    assert seam.bridge.wait_subscribed(WAIT)
    seam.publish("dt/loop/a", b"hi", 1, retain=False, user_properties=[("k", "v")], message_expiry_interval_sec=None,
                 correlation_data=b"\x01", response_topic=None, payload_format="UTF8", content_type="text/plain")
    assert got.wait_for(lambda items: items == [("dt/loop/a", b"hi")])
    with pytest.raises(SubscribeFailed, match=r"^'a/#/b' is not a valid topic filter: # must be a whole level"):
        seam.subscribe("a/#/b", 1, got)
    assert seam.bridge.subscriptions() == {"dt/loop/#": 1}
