"""The forwarder: batching, topics, PUBACK-gated acks, retries, quarantine, and a real broker."""

from __future__ import annotations

import json
import logging
import random
import threading
from concurrent.futures import Future

import pytest

from emulator.broker import Mosquitto
from gateway.buffer import Buffer
from gateway.errors import NotAuthorizedError, RetryableError, UndeliverableError
from gateway.forwarder import Backoff, Forwarder
from gateway.messages import decode
from gateway.publishers import MemoryPublisher
from gateway.publishers.mqtt import MqttSubscriber
from gateway.readings import Reading
from gateway.topics import MAX_PAYLOAD_BYTES

from conftest import SUBSCRIBER, publisher_for

T0 = 1_451_606_400_000
MIN = 60_000
THING = "meter-gw-1"


def fleet(n_ticks: int, sites: int = 3, per_site: int = 5) -> list[Reading]:
    return [
        Reading(str(s), f"{s}{b:02d}", "electricity", T0 + t * MIN, float(t + b), "test")
        for t in range(n_ticks) for s in range(sites) for b in range(per_site)
    ]


@pytest.fixture
def buf(tmp_path):
    b = Buffer(tmp_path / "buffer.db", live_window_ms=10**12)
    yield b
    b.close()


def keys_of(messages) -> list[tuple[str, int]]:
    return [(r[0], r[1]) for m in messages for r in decode(m.payload)["readings"]]


def test_messages_are_batches_of_one_site_on_whitepaper_topics(buf):
    buf.put(fleet(40))  # 600 readings on 3 sites
    pub = MemoryPublisher()
    Forwarder(buf, pub, THING, claim_size=1000).drain()
    assert sum(decode(m.payload)["n"] for m in pub.messages) == 600
    for m in pub.messages:
        body = decode(m.payload)
        assert m.topic == f"dt/meters/{body['site']}/{THING}/raw"
        assert m.qos == 1
        assert 1 <= body["n"] == len(body["readings"]) <= 100
        assert len(m.payload) <= MAX_PAYLOAD_BYTES
        assert len(body["batch"]) == 16 and body["thing"] == THING
        assert all(r[0].startswith(body["site"]) for r in body["readings"])
    keys = keys_of(pub.messages)
    assert len(keys) == len(set(keys)) == 600
    assert buf.pending() == 0


def test_batch_id_is_derived_from_content(buf, tmp_path):
    buf.put(fleet(10))
    a, b = MemoryPublisher(), MemoryPublisher()
    Forwarder(buf, a, THING).drain()
    other = Buffer(tmp_path / "other.db", live_window_ms=10**12)
    other.put(fleet(10))
    Forwarder(other, b, THING).drain()
    other.close()
    assert [decode(m.payload)["batch"] for m in a.messages] == [decode(m.payload)["batch"] for m in b.messages]


def test_claim_is_acknowledged_only_after_every_puback(buf):
    buf.put(fleet(10))  # 150 readings: messages for three sites
    pub = MemoryPublisher()
    pub.hold = True
    fwd = Forwarder(buf, pub, THING)
    while fwd.step():
        pass
    assert fwd.messages_in_flight == 3 and not pub.messages
    assert buf.pending() == 150  # nothing acknowledged without a PUBACK
    pub.release()
    fwd.step()
    assert buf.pending() == 0 and buf.stats["delivered"] == 150


def test_window_bounds_messages_in_flight(buf):
    buf.put(fleet(100))  # 1,500 readings
    pub = MemoryPublisher()
    pub.hold = True
    fwd = Forwarder(buf, pub, THING, window=4, claim_size=100)
    for _ in range(50):
        fwd.step()
    assert 4 <= fwd.messages_in_flight <= 4 + 3  # one claim may straddle the limit by its sites


def test_retryable_failure_backs_off_and_resends_everything(buf):
    buf.put(fleet(20))
    pub = MemoryPublisher()
    pub.online = True
    fwd = Forwarder(buf, pub, THING, backoff=Backoff(0.001, 0.002))
    fails = [3]
    real = pub.publish

    def flaky(topic, payload, qos=1):
        if fails[0] > 0 and "/0/" in topic:  # the first message of each of three attempts
            fails[0] -= 1
            f: Future = Future()
            f.set_exception(RetryableError("connection lost"))
            return f
        return real(topic, payload, qos)

    pub.publish = flaky
    fwd.drain()
    keys = keys_of(pub.messages)
    assert set(keys) == {(r.meter_id, r.ts) for r in fleet(20)}
    assert fwd.failures == 3
    assert buf.pending() == 0


def test_undeliverable_message_is_quarantined_not_retried(buf):
    buf.put([Reading("a+b", "7", "steam", T0, 1.0, "test"), Reading("1", "8", "steam", T0, 2.0, "test")])
    pub = MemoryPublisher()
    fwd = Forwarder(buf, pub, THING)
    fwd.drain()
    assert [decode(m.payload)["site"] for m in pub.messages] == ["1"]
    [q] = buf.quarantined(kind="message")
    assert q["reason"] == "topic 'dt/meters/a+b/meter-gw-1/raw' contains a wildcard (+ or #)"
    assert q["location"] == "dt/meters/a+b/meter-gw-1/raw"
    assert json.loads(q["raw"])["readings"] == [["7:steam", T0, 1.0]]
    assert buf.pending() == 0 and buf.stats["undeliverable"] == 1


def test_puback_refusal_of_the_message_is_quarantined(buf):
    buf.put(fleet(2))
    pub = MemoryPublisher()
    real = pub.publish

    def refuse_site_1(topic, payload, qos=1):
        if "/1/" in topic:
            f: Future = Future()
            f.set_exception(UndeliverableError(f"PUBACK TOPIC_NAME_INVALID (144) for {topic!r}"))
            return f
        return real(topic, payload, qos)

    pub.publish = refuse_site_1
    Forwarder(buf, pub, THING).drain()
    [q] = buf.quarantined(kind="message")
    assert q["reason"] == "PUBACK TOPIC_NAME_INVALID (144) for 'dt/meters/1/meter-gw-1/raw'"
    assert buf.pending() == 0


def test_oversize_batches_are_split_under_128_kb(buf):
    long_building = "b" * 2000  # absurd, but legal: each reading is ~2 KB on the wire
    buf.put([Reading("0", f"{long_building}{i}", "electricity", T0, 1.0, "test") for i in range(100)])
    pub = MemoryPublisher()
    Forwarder(buf, pub, THING).drain()
    assert len(pub.messages) > 1
    assert all(len(m.payload) <= MAX_PAYLOAD_BYTES for m in pub.messages)
    assert sum(decode(m.payload)["n"] for m in pub.messages) == 100


def test_backoff_is_exponential_with_full_jitter():
    b = Backoff(0.5, 8.0, rng=random.Random(1))
    ceilings = [0.5, 1, 2, 4, 8, 8, 8]
    delays = [b.next() for _ in ceilings]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings))
    assert len(set(delays)) == len(delays)  # jittered, not fixed
    b.reset()
    assert b.next() <= 0.5


def test_ack_timeout_while_connected_is_a_retry(buf):
    buf.put(fleet(1))
    now = [0.0]
    pub = MemoryPublisher()
    pub.hold = True
    fwd = Forwarder(buf, pub, THING, ack_timeout_s=5, window=8, clock=lambda: now[0], backoff=Backoff(0.001, 0.001))
    assert fwd.claim_timeout_s == 5 + 8 * 0.25  # the client's timeout, then a full window's queue at 512 KB/s
    fwd.step()
    assert fwd.messages_in_flight == 3
    now[0] += 6  # past the client's own timeout, not the forwarder's: the client fails it first
    fwd.step()
    assert fwd.failures == 0 and fwd.messages_in_flight == 3
    now[0] += 2
    fwd.step()
    assert fwd.failures == 1 and fwd.messages_in_flight == 0
    pub.hold = False
    fwd.drain()
    assert buf.pending() == 0


class StuckFirst(MemoryPublisher):
    """Acknowledges at once, except the first publish, whose future stays pending."""

    def __init__(self):
        super().__init__()
        self.stuck: Future | None = None

    def publish(self, topic, payload, qos=1):
        if self.stuck is None:
            self.stuck = Future()
            return self.stuck
        return super().publish(topic, payload, qos)


def test_a_stuck_claim_times_out_while_other_claims_complete(buf):
    """The timeout is the oldest claim's age, not the time since any progress."""
    buf.put(fleet(100))  # 1,500 readings: 100 claims of one tick (3 messages each)
    now = [0.0]
    pub = StuckFirst()
    fwd = Forwarder(buf, pub, THING, claim_size=15, window=4, ack_timeout_s=30, clock=lambda: now[0],
                    backoff=Backoff(0.001, 0.001))
    steps = 0
    while fwd.failures == 0 and steps < 60:  # one claim a second completes meanwhile
        now[0] += 1
        fwd.step()
        steps += 1
    assert fwd.failures == 1
    assert steps == 33  # sent at 1 s; its age passed 31 s (30 + 4 × 0.25) at 33 s
    fwd.drain()
    assert buf.pending() == 0
    assert set(keys_of(pub.messages)) == {(r.meter_id, r.ts) for r in fleet(100)}


def test_a_late_completion_of_a_handed_back_claim_is_neither_acked_nor_counted(buf):
    buf.put(fleet(1))
    now = [0.0]
    pub = StuckFirst()
    fwd = Forwarder(buf, pub, THING, ack_timeout_s=1, window=4, clock=lambda: now[0], backoff=Backoff(0.001, 0.001))
    fwd.step()  # claim 1: three messages, the first stuck
    now[0] += 10
    fwd.step()  # it times out and goes back to the buffer
    fwd.drain()  # sent again as a new claim, delivered
    assert buf.pending() == 0
    delivered, failures = buf.stats["delivered"], fwd.failures
    pub.stuck.set_result(None)  # the original PUBACK finally arrives
    fwd.step()
    assert buf.stats["delivered"] == delivered == 15
    assert fwd.failures == failures and fwd.status()["in_flight_claims"] == 0


class RefusingPublisher(MemoryPublisher):
    """Answers NOT_AUTHORIZED for site 1's topics while ``refuse`` is set, as IoT Core does for
    a topic the thing's policy does not allow."""

    def __init__(self):
        super().__init__()
        self.refuse = True
        self.refused = 0

    def publish(self, topic, payload, qos=1):
        if self.refuse and "/1/" in topic:
            self.refused += 1
            f: Future = Future()
            f.set_exception(NotAuthorizedError(f"PUBACK NOT_AUTHORIZED (135) for {topic!r}"))
            return f
        return super().publish(topic, payload, qos)


def test_not_authorized_keeps_the_readings_and_retries_slowly(buf, caplog):
    buf.put(fleet(40))  # 600 readings on 3 sites
    pub = RefusingPublisher()
    fwd = Forwarder(buf, pub, THING, claim_size=100, auth_retry_s=300, backoff=Backoff(0.001, 0.001))
    fwd.stop_event = RecordingStop()
    caplog.set_level(logging.INFO, logger="gateway.forwarder")
    for _ in range(20):
        fwd.step()
    reason = "PUBACK NOT_AUTHORIZED (135) for 'dt/meters/1/meter-gw-1/raw'"
    assert fwd.blocked == reason and fwd.status()["blocked"] == reason
    assert buf.quarantined(kind="message") == [] and buf.stats["undeliverable"] == 0
    assert buf.pending() == 600 and buf.stats["delivered"] == 0  # nothing acked, nothing lost
    waits = fwd.stop_event.waits
    assert len(waits) >= 3 and set(waits) == {300}  # slowly, and
    assert pub.refused == len(waits)  # one claim a try: a single message refused each time
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        f"delivery stopped: the broker refused a topic ({reason}). The readings are kept; "
        "fix the thing's policy (or the topic). Trying again every 300 s."]  # once

    pub.refuse = False  # the policy is fixed
    fwd.drain()
    assert fwd.blocked is None
    assert buf.pending() == 0 and buf.quarantined(kind="message") == []
    assert set(keys_of(pub.messages)) == {(r.meter_id, r.ts) for r in fleet(40)}
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"delivery authorized again: forwarding resumes (was: {reason})"]


def test_an_allowed_claim_does_not_clear_a_refusal_it_did_not_retry(buf, caplog):
    """Blocked means "these topics are refused": only their acceptance clears it."""
    buf.put([Reading("0", f"0{b}", "steam", T0, 1.0, "test") for b in range(5)]
            + [Reading("1", f"1{b}", "steam", T0 + MIN, 1.0, "test") for b in range(5)])
    pub = RefusingPublisher()
    pub.hold = True  # site 0's claim waits for its PUBACK; site 1's is refused at once
    fwd = Forwarder(buf, pub, THING, claim_size=5, auth_retry_s=300, backoff=Backoff(0.001, 0.001))
    fwd.stop_event = RecordingStop()
    caplog.set_level(logging.INFO, logger="gateway.forwarder")
    fwd.step()
    fwd.step()
    assert fwd.status()["in_flight_claims"] == 2
    pub.release()  # site 0 accepted after site 1 was refused
    for _ in range(5):
        fwd.step()
    assert fwd.blocked == "PUBACK NOT_AUTHORIZED (135) for 'dt/meters/1/meter-gw-1/raw'"
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    pub.hold, pub.refuse = False, False
    fwd.drain()
    assert fwd.blocked is None and buf.pending() == 0


def test_basic_ingest_rule_prefixes_every_topic(buf):
    buf.put(fleet(2))
    pub = MemoryPublisher()
    Forwarder(buf, pub, THING, basic_ingest_rule="meters_ingest").drain()
    assert {m.topic for m in pub.messages} == {f"$aws/rules/meters_ingest/dt/meters/{s}/{THING}/raw" for s in "012"}
    assert buf.pending() == 0 and buf.quarantined(kind="message") == []


def test_delivery_through_a_real_broker(buf, make_publisher, subscriber):
    readings = fleet(200)  # 3,000 readings
    buf.put(readings)
    pub = make_publisher()
    Forwarder(buf, pub, THING).drain()
    expected = {(r.meter_id, r.ts) for r in readings}
    assert subscriber.wait_for(lambda msgs: set(keys_of(msgs)) >= expected, timeout=30)
    assert all(m.topic.startswith("dt/meters/") and m.topic.endswith(f"/{THING}/raw") for m in subscriber.snapshot())
    assert buf.pending() == 0


class RecordingStop(threading.Event):
    """A stop event that records how long it was asked to wait, and does not wait."""

    def __init__(self):
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return self.is_set()


def test_new_readings_do_not_cut_a_backoff_short(buf):
    buf.put(fleet(2))
    pub = MemoryPublisher()
    fwd = Forwarder(buf, pub, THING, backoff=Backoff(30, 60, rng=random.Random(3)))
    real = pub.publish

    def failing(topic, payload, qos=1):
        f: Future = Future()
        f.set_exception(RetryableError("connection lost"))
        return f

    pub.publish = failing
    fwd.stop_event = RecordingStop()
    fwd.step()  # publish, fail
    buf.put(fleet(1))  # new readings arrive: wake is set
    assert fwd.wake.is_set()
    fwd.step()  # settles the failure and backs off
    assert len(fwd.stop_event.waits) == 1 and 0 <= fwd.stop_event.waits[0] <= 30
    pub.publish = real
    fwd.drain()
    assert buf.pending() == 0


def test_not_authorized_by_a_real_broker_then_everything_arrives_once_the_acl_is_fixed(tmp_path, certs):
    """mosquitto answers an ACL-denied QoS 1 publish with PUBACK NOT_AUTHORIZED, as IoT Core
    does for a topic the policy refuses: nothing is quarantined, and after the fix all arrives."""
    refuse_site_1 = (f"user {SUBSCRIBER}\ntopic read dt/#\n"
                     f"user {THING}\ntopic write dt/meters/0/#\ntopic write dt/meters/2/#\n")
    readings = fleet(40)  # 600 readings on sites 0, 1 and 2
    expected = {(r.meter_id, r.ts) for r in readings}
    buf = Buffer(tmp_path / "acl.db", live_window_ms=10**12)
    buf.put(readings)
    with Mosquitto(tmp_path / "acl-broker", certs, acl=refuse_site_1) as broker:
        c = certs.client(SUBSCRIBER)
        sub = MqttSubscriber("localhost", SUBSCRIBER, c.cert, c.key, certs.ca, port=broker.port).start()
        pub = publisher_for(broker, certs).start()
        try:
            assert pub.wait_connected(10)
            fwd = Forwarder(buf, pub, THING, claim_size=100, auth_retry_s=0.05, backoff=Backoff(0.01, 0.05))
            tries = 0
            while tries < 3:  # three slow retries, each refused
                fwd.step()
                if fwd.blocked is not None and not fwd.status()["in_flight_claims"]:
                    tries += 1
                fwd.wake.wait(0.05)
                fwd.wake.clear()
            assert fwd.blocked == "PUBACK NOT_AUTHORIZED (135) for 'dt/meters/1/meter-gw-1/raw'"
            assert buf.pending() == 600 and buf.quarantined(kind="message") == []

            broker.acl = f"user {SUBSCRIBER}\ntopic read dt/#\nuser {THING}\ntopic write dt/meters/#\n"
            broker.stop()
            broker.start()  # the fixed ACL
            assert pub.wait_connected(10) and sub.wait_subscribed(10)
            fwd.drain(timeout_s=30)
            assert fwd.blocked is None
            assert sub.wait_for(lambda msgs: set(keys_of(msgs)) >= expected, timeout=30)
            assert buf.pending() == 0 and buf.quarantined(kind="message") == []
        finally:
            pub.close()
            sub.close()
            buf.close()
