"""The IPC publisher over an autospec'd GreengrassCoreIPCClientV2: the test plays the nucleus.

Every future the client returns is completed by the test (accepted, or failed with the error the
nucleus sends), and every stream event is delivered through the callbacks the publisher gave
the client. Waits are on conditions; receipt clocks run on an injected clock.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from concurrent.futures import Future
from unittest.mock import create_autospec

import pytest
from awsiot import eventstreamrpc as rpc
from awsiot.greengrasscoreipc import client as ipc_client
from awsiot.greengrasscoreipc import model
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

from gateway.buffer import Buffer
from gateway.errors import ConfigError, NotAuthorizedError, RetryableError, UndeliverableError
from gateway.forwarder import Backoff, Forwarder
from gateway.messages import decode, encode
from gateway.publishers import Publisher
from gateway.publishers.ipc import IpcPublisher, batch_of, map_ipc_error
from gateway.readings import Reading
from gateway.topics import MAX_BYTES_PER_S, MAX_PAYLOAD_BYTES

THING = "gw-1"
TOPIC = f"dt/meters/15/{THING}/raw"
RECEIPTS = f"cmd/meters/{THING}/receipt"
SPOOL_FULL = f"Publish to topic {TOPIC} failed: Message spool is full. Message could not be added."
T0 = 1_451_606_400_000


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Nucleus:
    """An autospec'd V2 client; publishes are recorded with their futures for the test to complete.

    ``answer``, when set, completes each publish at once: it returns None (accepted) or the
    exception the nucleus sends.
    """

    def __init__(self) -> None:
        self.client = create_autospec(GreengrassCoreIPCClientV2, instance=True)
        self.publishes: list[tuple[dict, Future]] = []
        self.cond = threading.Condition()
        self.answer = None
        self.client.publish_to_iot_core_async.side_effect = self._publish
        self.status_ops: list = []
        self.receipt_ops: list = []
        self.client.subscribe_to_iot_core_connection_status.side_effect = self._subscribe_status
        self.client.subscribe_to_iot_core.side_effect = self._subscribe

    def _publish(self, **kw) -> Future:
        fut: Future = Future()
        with self.cond:
            self.publishes.append((kw, fut))
            self.cond.notify_all()
        if self.answer is not None:
            exc = self.answer(kw)
            fut.set_exception(exc) if exc is not None else fut.set_result(model.PublishToIoTCoreResponse())
        return fut

    def _subscribe_status(self, **kw):
        op = create_autospec(ipc_client.SubscribeToIoTCoreConnectionStatusOperation, instance=True)
        with self.cond:
            self.status_ops.append((kw, op))
            self.cond.notify_all()
        return model.SubscribeToIoTCoreConnectionStatusResponse(), op

    def _subscribe(self, **kw):
        op = create_autospec(ipc_client.SubscribeToIoTCoreOperation, instance=True)
        with self.cond:
            self.receipt_ops.append((kw, op))
            self.cond.notify_all()
        return model.SubscribeToIoTCoreResponse(), op

    def wait(self, predicate, timeout: float = 5.0) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), "the condition did not come true"

    def accept(self, i: int = -1) -> None:
        self.publishes[i][1].set_result(model.PublishToIoTCoreResponse())

    def status(self, status: str) -> None:
        kw = self.status_ops[-1][0]
        kw["on_stream_event"](model.IoTCoreConnectionStatusEvent(
            connection_status_event=model.ConnectionStatusEvent(status=status)))

    def receipt(self, batch: str, topic: str = TOPIC) -> None:
        kw = self.receipt_ops[-1][0]
        payload = json.dumps({"batch": batch, "topic": topic}).encode()
        kw["on_stream_event"](model.IoTCoreMessage(message=model.MQTTMessage(topic_name=RECEIPTS, payload=payload)))


@pytest.fixture
def nucleus() -> Nucleus:
    return Nucleus()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def opened():
    pubs: list[IpcPublisher] = []

    def open_(*args, **kw) -> IpcPublisher:
        pubs.append(IpcPublisher(*args, **kw).start())
        return pubs[-1]

    yield open_
    for p in pubs:
        p.close()


def message(n: int = 1, value: float = 41.0) -> bytes:
    return encode(THING, "15", [[f"15{i:02d}:electricity", T0 + i, value] for i in range(n)])


def wait_for(predicate, timeout: float = 5.0) -> None:
    event = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        event.wait(0.01)
    assert predicate(), "the condition did not come true"


# ---------------------------------------------------------------- handoff


def test_handoff_resolves_when_the_nucleus_accepts(nucleus, opened):
    pub = opened(nucleus.client, THING)
    assert isinstance(pub, Publisher) and pub.local is False and pub.delivery_window_s == 0
    payload = message()
    fut = pub.publish(TOPIC, payload)
    nucleus.wait(lambda: nucleus.publishes)
    kw = nucleus.publishes[0][0]
    assert kw == {"topic_name": TOPIC, "qos": model.QOS.AT_LEAST_ONCE, "payload": payload}
    assert not fut.done()
    nucleus.accept()
    assert fut.result(timeout=1) is None
    nucleus.client.subscribe_to_iot_core.assert_not_called()  # no receipts in handoff mode
    assert pub.accepted == 1


def test_a_message_over_128_kb_never_reaches_the_nucleus(nucleus, opened):
    pub = opened(nucleus.client, THING)
    with pytest.raises(UndeliverableError, match="payload"):
        pub.publish(TOPIC, b"x" * (MAX_PAYLOAD_BYTES + 1)).result(timeout=1)
    nucleus.client.publish_to_iot_core_async.assert_not_called()


# ---------------------------------------------------------------- receipts


def test_receipt_mode_resolves_only_on_the_receipt_of_its_batch(nucleus, opened):
    pub = opened(nucleus.client, THING, delivery="receipt")
    kw = nucleus.receipt_ops[0][0]
    assert (kw["topic_name"], kw["qos"]) == (RECEIPTS, model.QOS.AT_LEAST_ONCE)
    nucleus.status("CONNECTED")
    assert pub.connected
    payload = message()
    fut = pub.publish(TOPIC, payload)
    nucleus.wait(lambda: nucleus.publishes)
    nucleus.accept()  # spooled by the nucleus: not yet delivered
    assert not fut.done()
    nucleus.receipt("0123456789abcdef")  # someone else's batch
    nucleus.receipt_ops[0][0]["on_stream_event"](model.IoTCoreMessage(
        message=model.MQTTMessage(topic_name=RECEIPTS, payload=b"not json")))
    assert not fut.done()
    nucleus.receipt(decode(payload)["batch"])
    assert fut.result(timeout=1) is None
    assert (pub.receipts, pub.resends) == (1, 0)


def test_no_receipt_in_time_resends_the_very_same_bytes(nucleus, clock, opened):
    pub = opened(nucleus.client, THING, delivery="receipt", receipt_timeout_s=60, resend_limit=2, clock=clock)
    nucleus.status("CONNECTED")
    payload = message(3)
    fut = pub.publish(TOPIC, payload)
    nucleus.accept()
    clock.now += 59
    pub.tick()
    assert len(nucleus.publishes) == 1
    clock.now += 2
    pub.tick()
    nucleus.wait(lambda: len(nucleus.publishes) == 2)
    assert nucleus.publishes[1][0] == nucleus.publishes[0][0]  # same topic, qos and bytes: same batch id
    assert pub.resends == 1 and not fut.done()
    nucleus.accept()
    nucleus.receipt(batch_of(payload))
    assert fut.result(timeout=1) is None


def test_an_outage_stops_the_receipt_clock(nucleus, clock, opened):
    pub = opened(nucleus.client, THING, delivery="receipt", receipt_timeout_s=60, clock=clock)
    nucleus.status("CONNECTED")
    pub.publish(TOPIC, message())
    nucleus.accept()
    nucleus.status("DISCONNECTED")
    clock.now += 600
    pub.tick()
    assert len(nucleus.publishes) == 1 and pub.resends == 0
    nucleus.status("CONNECTED")
    clock.now += 59
    pub.tick()
    assert pub.resends == 0
    clock.now += 2
    pub.tick()
    assert pub.resends == 1


def test_after_every_resend_the_future_fails_retryable(nucleus, clock, opened):
    pub = opened(nucleus.client, THING, delivery="receipt", receipt_timeout_s=10, resend_limit=2, clock=clock)
    nucleus.status("CONNECTED")
    fut = pub.publish(TOPIC, message())
    nucleus.accept()
    for sends in (2, 3):
        clock.now += 10
        pub.tick()
        nucleus.wait(lambda: len(nucleus.publishes) == sends)
        nucleus.accept()
    clock.now += 10
    pub.tick()
    with pytest.raises(RetryableError, match=rf"^no receipt for batch {batch_of(nucleus.publishes[0][0]['payload'])} "
                                             rf"\({TOPIC}\) on {RECEIPTS} after 3 sends 10 s apart$"):
        fut.result(timeout=1)
    assert pub.resends == 2 and pub.status()["awaiting_receipt"] == 0


def test_the_forwarder_never_times_out_a_claim_before_the_publisher_had_its_resends(tmp_path, nucleus, clock, caplog,
                                                                                   opened):
    pub = opened(nucleus.client, THING, delivery="receipt", receipt_timeout_s=60, resend_limit=1, clock=clock)
    nucleus.status("CONNECTED")
    buf = Buffer(tmp_path / "buffer.db", live_window_ms=10**12)
    try:
        buf.put([Reading("15", "1501", "electricity", T0, 1.0, "test")])
        fwd = Forwarder(buf, pub, THING, window=4, ack_timeout_s=30, clock=clock, backoff=Backoff(0.001, 0.001))
        assert fwd.claim_timeout_s == 30 + 4 * MAX_PAYLOAD_BYTES / MAX_BYTES_PER_S + pub.delivery_window_s
        assert pub.delivery_window_s == 60 * 2 + pub.poll_s
        fwd.step()  # claims and publishes
        nucleus.wait(lambda: nucleus.publishes)
        nucleus.accept()
        caplog.set_level(logging.WARNING, logger="gateway.forwarder")
        clock.now += 60
        pub.tick()  # no receipt: the resend
        nucleus.wait(lambda: len(nucleus.publishes) == 2)
        nucleus.accept()
        fwd.step()
        assert fwd.status()["in_flight_claims"] == 1
        clock.now += 60
        pub.tick()  # still none, and no resend left: the publisher fails the future
        fwd.step()  # the forwarder takes the publisher's word, before its own timeout
        assert "delivery failed (no receipt for batch" in caplog.text
        assert "no PUBACK within" not in caplog.text
        assert fwd.status()["in_flight_claims"] == 0
        assert buf.pending() == 1  # handed back, to be sent again: nothing lost
    finally:
        buf.close()


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("exc, kind, text", [
    (model.ServiceError(message=SPOOL_FULL), RetryableError, "spool is full"),
    (model.ServiceError(message=f"Publish to topic {TOPIC} failed: Message is larger than the size of message spool."),
     RetryableError, "maxSizeInBytes"),
    (model.ServiceError(message="Publish to topic t failed: The publishing message size 200000 bytes exceeds the "
                                "configured limit of 131072 bytes"), UndeliverableError, "exceeds the configured limit"),
    (model.ServiceError(message="something else"), RetryableError, "something else"),
    (model.UnauthorizedError(message="Not Authorized"), NotAuthorizedError, "accessControl"),
    (model.InvalidArgumentsError(message="QoS is required"), UndeliverableError, "QoS is required"),
    (rpc.ConnectionClosedError(), RetryableError, "IPC connection"),
    (rpc.StreamClosedError(), RetryableError, "IPC connection"),
])
def test_every_ipc_error_maps_to_the_error_tree(exc, kind, text):
    err = map_ipc_error(exc, TOPIC)
    assert type(err) is kind and text in str(err) and err.__cause__ is exc


def test_a_full_spool_is_backpressure_the_forwarder_backs_off_and_loses_nothing(tmp_path, nucleus, opened):
    refusals = {"left": 3}

    def answer(kw):
        if refusals["left"]:
            refusals["left"] -= 1
            return model.ServiceError(message=SPOOL_FULL)
        return None

    nucleus.answer = answer
    pub = opened(nucleus.client, THING)
    nucleus.status("CONNECTED")

    class Recorded(Backoff):
        delays: list[float] = []

        def next(self) -> float:
            self.delays.append(super().next())
            return self.delays[-1]

    readings = [Reading(str(s), f"{s}{b:02d}", "electricity", T0 + t * 60_000, float(t), "test")
                for t in range(20) for s in range(2) for b in range(5)]
    buf = Buffer(tmp_path / "buffer.db", live_window_ms=10**12)
    try:
        buf.put(readings)
        backoff = Recorded(0.001, 0.002, rng=random.Random(1))
        fwd = Forwarder(buf, pub, THING, batch_size=50, claim_size=100, backoff=backoff)
        fwd.drain(timeout_s=10)
        assert buf.pending() == 0
    finally:
        buf.close()
    assert pub.spool_full == 3 and fwd.failures >= 1 and len(backoff.delays) >= 1
    refused = [fut.exception() for _, fut in nucleus.publishes if fut.exception() is not None]
    assert len(refused) == 3 and all(SPOOL_FULL in e.message for e in refused)
    accepted = [kw for kw, fut in nucleus.publishes if fut.exception() is None]
    keys = {(r[0], r[1]) for kw in accepted for r in decode(kw["payload"])["readings"]}
    assert len(keys) == len(readings)  # every reading went to the nucleus, once or more


def test_not_authorized_and_invalid_arguments_fail_the_future(nucleus, opened):
    pub = opened(nucleus.client, THING)
    fut = pub.publish(TOPIC, message())
    nucleus.publishes[0][1].set_exception(model.UnauthorizedError(message="Not Authorized"))
    with pytest.raises(NotAuthorizedError, match="aws.greengrass.ipc.mqttproxy"):
        fut.result(timeout=1)
    fut = pub.publish(TOPIC, message())
    nucleus.publishes[1][1].set_exception(model.InvalidArgumentsError(message="Payload is required"))
    with pytest.raises(UndeliverableError, match="Payload is required"):
        fut.result(timeout=1)


def test_losing_the_ipc_socket_fails_fast_and_what_awaits_a_receipt(nucleus, opened):
    pub = opened(nucleus.client, THING, delivery="receipt")
    nucleus.status("CONNECTED")
    waiting = pub.publish(TOPIC, message(1))
    nucleus.accept()
    nucleus.client.publish_to_iot_core_async.side_effect = rpc.ConnectionClosedError()
    with pytest.raises(RetryableError, match="IPC connection"):
        pub.publish(TOPIC, message(2)).result(timeout=1)
    with pytest.raises(RetryableError, match="IPC connection"):
        waiting.result(timeout=1)
    assert not pub.connected
    with pytest.raises(RetryableError, match="IPC connection to the nucleus is closed"):
        pub.publish(TOPIC, message(3)).result(timeout=1)


def test_an_owned_client_is_replaced_after_the_socket_closes(opened):
    nuclei = [Nucleus(), Nucleus()]
    made: list[Nucleus] = []

    def connect():
        made.append(nuclei[len(made)])
        return made[-1].client

    pub = opened(None, THING, connect=connect, reconnect_s=0.0, poll_s=0.01)
    nuclei[0].status("CONNECTED")
    assert pub.connected
    nuclei[0].client.subscribe_to_iot_core_connection_status.side_effect = rpc.ConnectionClosedError()
    nuclei[0].status_ops[0][0]["on_stream_closed"]()  # the socket went: every stream closes
    assert not pub.connected
    nuclei[1].wait(lambda: nuclei[1].status_ops)
    nuclei[1].status("CONNECTED")
    assert pub.connected
    nuclei[0].client.close.assert_called_once()  # the old, owned client
    pub.close()
    nuclei[1].client.close.assert_called_once()


@pytest.mark.parametrize("delivery", ["handoff", "receipt"])
def test_subscribing_on_a_connection_that_just_closed_is_a_lost_connection_not_a_missing_operation(opened, delivery):
    # awscrt raises a bare RuntimeError for a stream opened on a connection that has just closed
    # (seen against the local nucleus restarting); it once made the publisher take IoT Core as
    # connected on a dead client and wait resubscribe_s before it reconnected
    closed = RuntimeError("4104 (AWS_ERROR_EVENT_STREAM_RPC_CONNECTION_CLOSED): event stream rpc connection has "
                          "been closed")
    nuclei = [Nucleus(), Nucleus()]
    made: list[Nucleus] = []

    def connect():
        made.append(nuclei[len(made)])
        return made[-1].client

    pub = opened(None, THING, delivery=delivery, connect=connect, reconnect_s=0.0, poll_s=0.01, resubscribe_s=600)
    nuclei[0].status("CONNECTED")
    assert pub.connected
    for name in ("subscribe_to_iot_core_connection_status", "subscribe_to_iot_core"):
        getattr(nuclei[0].client, name).side_effect = closed
    nuclei[0].status_ops[0][0]["on_stream_closed"]()
    if delivery == "receipt":
        nuclei[0].receipt_ops[0][0]["on_stream_closed"]()
    nuclei[1].wait(lambda: nuclei[1].status_ops)  # a new connection, at once
    assert not pub.connected  # nothing assumed: the new nucleus says
    nuclei[1].status("CONNECTED")
    wait_for(lambda: pub.connected)  # in receipt mode, once the receipt subscription stands too
    assert type(map_ipc_error(closed, TOPIC)) is RetryableError and "IPC connection" in str(map_ipc_error(closed))


def test_outside_greengrass_an_owned_client_is_a_config_error(monkeypatch):
    for name in ("SVCUID", "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=r"^publisher\.type: ipc needs the Greengrass nucleus: the environment has "
                                          r"no 'AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT'"):
        IpcPublisher(None, THING).start()


# ---------------------------------------------------------------- connected


def test_connection_status_events_flip_connected(nucleus, opened):
    pub = opened(nucleus.client, THING)
    assert not pub.connected  # the subscription's response carries no status: wait for the first event
    nucleus.status("CONNECTED")
    assert pub.connected
    nucleus.status("DISCONNECTED")
    assert not pub.connected
    nucleus.status("CONNECTED")
    assert pub.connected


def test_without_a_first_status_event_connected_follows_the_ipc_connection(nucleus, clock, opened, caplog):
    pub = opened(nucleus.client, THING, clock=clock, status_grace_s=10)
    assert not pub.connected
    clock.now += 10
    with caplog.at_level(logging.WARNING, logger="gateway.publishers.ipc"):
        assert pub.connected
    assert "no IoT Core connection status within 10 s" in caplog.text


def test_a_nucleus_that_refuses_the_status_operation_counts_as_connected(opened):
    old = Nucleus()
    old.client.subscribe_to_iot_core_connection_status.side_effect = model.ServiceError(message="unsupported")
    assert opened(old.client, THING).connected


def test_receipt_mode_is_not_connected_without_its_subscription(nucleus, opened, caplog):
    nucleus.client.subscribe_to_iot_core.side_effect = model.UnauthorizedError(message="Not Authorized")
    with caplog.at_level(logging.ERROR, logger="gateway.publishers.ipc"):
        pub = opened(nucleus.client, THING, delivery="receipt")
    nucleus.status("CONNECTED")
    assert not pub.connected
    assert f"refused SubscribeToIoTCore on {RECEIPTS}" in caplog.text and "accessControl" in caplog.text


def test_receipts_are_subscribed_anew_after_iot_core_reconnects(nucleus, opened):
    pub = opened(nucleus.client, THING, delivery="receipt", poll_s=0.01)
    nucleus.status("CONNECTED")
    nucleus.status("DISCONNECTED")
    nucleus.status("CONNECTED")
    nucleus.wait(lambda: len(nucleus.receipt_ops) == 2)
    wait_for(lambda: nucleus.receipt_ops[0][1].close.called)  # the old stream, after the new one stands
    assert pub.connected
    nucleus.receipt_ops[0][0]["on_stream_closed"]()  # the old stream's close is not a loss
    assert pub.connected


def test_close_closes_its_streams_not_an_injected_client(nucleus):
    pub = IpcPublisher(nucleus.client, THING, delivery="receipt").start()
    nucleus.status("CONNECTED")
    fut = pub.publish(TOPIC, message())
    pub.close()
    nucleus.status_ops[0][1].close.assert_called_once()
    nucleus.receipt_ops[0][1].close.assert_called_once()
    nucleus.client.close.assert_not_called()
    with pytest.raises(RetryableError, match="publisher closed"):
        fut.result(timeout=1)
    assert not pub.connected


def test_in_receipt_mode_a_message_without_a_batch_id_is_done_on_handoff(nucleus, opened):
    pub = opened(nucleus.client, THING, delivery="receipt")
    nucleus.status("CONNECTED")
    fut = pub.publish(f"dt/meters/gateway/{THING}/health", b'{"state":"running"}')
    nucleus.accept()
    assert fut.result(timeout=1) is None and pub.status()["awaiting_receipt"] == 0
