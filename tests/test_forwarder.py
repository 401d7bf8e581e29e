"""The forwarder: batching, topics, PUBACK-gated acks, retries, quarantine, and a real broker."""

from __future__ import annotations

import json
import random
import threading
from concurrent.futures import Future

import pytest

from gateway.buffer import Buffer
from gateway.errors import RetryableError, UndeliverableError
from gateway.forwarder import Backoff, Forwarder
from gateway.messages import decode
from gateway.publishers import MemoryPublisher
from gateway.readings import Reading
from gateway.topics import MAX_PAYLOAD_BYTES

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


def test_puback_refusal_is_quarantined(buf):
    buf.put(fleet(2))
    pub = MemoryPublisher()
    real = pub.publish

    def refuse_site_1(topic, payload, qos=1):
        if "/1/" in topic:
            f: Future = Future()
            f.set_exception(UndeliverableError(f"PUBACK NOT_AUTHORIZED (135) for {topic!r}"))
            return f
        return real(topic, payload, qos)

    pub.publish = refuse_site_1
    Forwarder(buf, pub, THING).drain()
    [q] = buf.quarantined(kind="message")
    assert q["reason"] == "PUBACK NOT_AUTHORIZED (135) for 'dt/meters/1/meter-gw-1/raw'"
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
    fwd = Forwarder(buf, pub, THING, ack_timeout_s=5, clock=lambda: now[0], backoff=Backoff(0.001, 0.001))
    fwd.step()
    assert fwd.messages_in_flight == 3
    now[0] += 6
    fwd.step()
    assert fwd.failures == 1 and fwd.messages_in_flight == 0
    pub.hold = False
    fwd.drain()
    assert buf.pending() == 0


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
