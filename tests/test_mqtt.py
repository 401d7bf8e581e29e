"""MqttPublisher against a real mosquitto with mutual TLS (see conftest), plus its error mapping."""

from __future__ import annotations

import threading
from concurrent.futures import TimeoutError as FutureTimeout

import pytest
from awscrt import io, mqtt5
from awscrt.exceptions import AwsCrtError, from_code

from emulator.broker import Mosquitto, make_certs
from gateway.errors import ConfigError, NotAuthorizedError, RetryableError, UndeliverableError
from gateway.publishers import Message, Publisher
from gateway.publishers.mqtt import (
    UNDELIVERABLE_CRT_ERRORS,
    MqttPublisher,
    map_crt_error,
    puback_error,
)

from conftest import THING, publisher_for

WAIT = 10  # seconds: an upper bound for things that normally take milliseconds


def _topics(messages):
    return [m.topic for m in messages]


# -- round trip --------------------------------------------------------------------------------


def test_publish_round_trip_over_mtls(make_publisher, subscriber):
    pub = make_publisher()
    assert isinstance(pub, Publisher)
    assert pub.connected

    assert pub.publish("dt/site-1/meter-7/readings", b'{"kwh": 1.5}').result(WAIT) is None
    assert pub.publish("dt/site-1/meter-7/events", b"q0", qos=0).result(WAIT) is None

    assert subscriber.wait_for(lambda msgs: len(msgs) >= 2, WAIT)
    assert sorted(subscriber.snapshot()) == [
        Message("dt/site-1/meter-7/events", b"q0", 0),
        Message("dt/site-1/meter-7/readings", b'{"kwh": 1.5}', 1),
    ]


def test_broker_sees_the_thing_name_as_identity(make_publisher, broker):
    make_publisher()
    assert f"as {THING} (p5" in broker.log()
    assert f"u'{THING}'" in broker.log()


# -- who may connect ---------------------------------------------------------------------------


class _Outcome:
    """Records the first lifecycle outcome of a bare awscrt client."""

    def __init__(self):
        self.cond = threading.Condition()
        self.result = None

    def set(self, what, data):
        with self.cond:
            self.result = self.result or (what, data)
            self.cond.notify_all()

    def wait(self):
        with self.cond:
            assert self.cond.wait_for(lambda: self.result is not None, WAIT)
            return self.result


def _bare_client(port, tls_ctx, outcome):
    return mqtt5.Client(mqtt5.ClientOptions(
        host_name="localhost", port=port, tls_ctx=tls_ctx,
        connect_options=mqtt5.ConnectPacket(client_id="intruder"),
        on_lifecycle_event_connection_success_fn=lambda d: outcome.set("connected", d),
        on_lifecycle_event_connection_failure_fn=lambda d: outcome.set("refused", d),
    ))


@pytest.mark.parametrize("how", ["tls-without-client-cert", "plain-tcp"])
def test_client_without_certificate_is_refused(broker, certs, how):
    tls_ctx = None
    if how == "tls-without-client-cert":
        opts = io.TlsContextOptions()
        opts.override_default_trust_store_from_path(None, str(certs.ca))
        tls_ctx = io.ClientTlsContext(opts)
    outcome = _Outcome()
    client = _bare_client(broker.port, tls_ctx, outcome)
    client.start()
    try:
        what, data = outcome.wait()
    finally:
        client.stop()
    assert what == "refused"
    assert isinstance(data.exception, AwsCrtError)


def test_client_certificate_from_another_ca_is_refused(broker, certs, tmp_path):
    rogue = make_certs(tmp_path / "rogue", thing_names=[THING]).client(THING)
    pub = MqttPublisher("localhost", THING, rogue.cert, rogue.key, certs.ca, port=broker.port,
                        local=True, min_reconnect_delay=0.05, max_reconnect_delay=0.2)
    pub.start()
    try:
        assert pub.wait_connect_failures(2, WAIT)
        assert not pub.connected
        assert isinstance(pub.last_error, AwsCrtError)
    finally:
        pub.close()
    assert f"as {THING}" not in broker.log()


# -- acknowledgement ---------------------------------------------------------------------------


def test_future_resolves_only_after_puback(make_publisher, broker, subscriber):
    pub = make_publisher()
    broker.pause()
    try:
        fut = pub.publish("dt/site-1/meter-1/readings", b"held")
        with pytest.raises(FutureTimeout):
            fut.result(timeout=0.5)  # the broker is frozen: no PUBACK, no result
        assert not fut.done()
    finally:
        broker.resume()
    assert fut.result(WAIT) is None
    assert subscriber.wait_for(lambda msgs: "dt/site-1/meter-1/readings" in _topics(msgs), WAIT)


def test_not_authorized_puback_is_a_policy_fault_not_a_message_fault(tmp_path, certs):
    acl = f"user {THING}\ntopic write dt/#\n"
    with Mosquitto(tmp_path / "acl-broker", certs, acl=acl) as broker:
        pub = publisher_for(broker, certs).start()
        try:
            assert pub.wait_connected(WAIT)
            with pytest.raises(NotAuthorizedError,
                               match=r"^PUBACK NOT_AUTHORIZED \(135\) for 'cmd/site-1/reboot'$"):
                pub.publish("cmd/site-1/reboot", b"{}").result(WAIT)
            assert pub.publish("dt/site-1/ok", b"{}").result(WAIT) is None
        finally:
            pub.close()


def test_packet_over_the_brokers_maximum_is_undeliverable(tmp_path, certs):
    with Mosquitto(tmp_path / "small-broker", certs, max_packet_size=2048) as broker:
        pub = publisher_for(broker, certs).start()
        try:
            assert pub.wait_connected(WAIT)
            with pytest.raises(UndeliverableError, match=r"^awscrt rejected the publish to 'dt/big': "
                                                         r"AWS_ERROR_MQTT5_PACKET_VALIDATION: .*$") as info:
                pub.publish("dt/big", b"x" * 4096).result(WAIT)
            assert isinstance(info.value.__cause__, AwsCrtError)
            assert pub.connected
        finally:
            pub.close()


# -- checks before the network -----------------------------------------------------------------


@pytest.fixture
def offline_publisher(certs):
    """A publisher that was never started: its checks must not need a connection."""
    c = certs.client(THING)
    pub = MqttPublisher("localhost", THING, c.cert, c.key, certs.ca, port=1)
    yield pub
    pub.close()


@pytest.mark.parametrize(("topic", "payload", "qos", "message"), [
    ("dt/x", b"x" * (128 * 1024 + 1), 1, r"^payload is 131073 bytes, more than 131072 \(128 KB\)$"),
    ("dt/1/2/3/4/5/6/7/8", b"{}", 1, r"^topic 'dt/1/2/3/4/5/6/7/8' has 8 slashes, more than 7$"),
    ("dt/" + "a" * 254, b"{}", 1, r"^topic 'dt/a{58}\.\.\.' is 257 bytes, more than 256$"),
    ("dt/+/readings", b"{}", 1, r"^topic 'dt/\+/readings' contains a wildcard \(\+ or #\)$"),
    ("dt/#", b"{}", 1, r"^topic 'dt/#' contains a wildcard \(\+ or #\)$"),
    ("", b"{}", 1, r"^topic is empty$"),
    ("dt/x", b"{}", 2, r"^qos 2 is not 0 or 1$"),
    ("dt/x", "text", 1, r"^payload must be bytes, not str$"),
    (["dt", "x"], b"{}", 1, r"^topic must be str, not list$"),
])
def test_invalid_message_is_undeliverable_without_network(offline_publisher, topic, payload, qos, message):
    fut = offline_publisher.publish(topic, payload, qos)
    assert fut.done()
    with pytest.raises(UndeliverableError, match=message):
        fut.result()


@pytest.mark.parametrize(("topic", "message"), [
    ("$aws/things/gw/shadow/update",
     r"^topic '\$aws/things/gw/shadow/update' starts with \$, which is reserved \(only a \$aws/rules/<rule>/ prefix is allowed\)$"),
    ("$aws/rules/bad-name/dt/x",
     r"^topic '\$aws/rules/bad-name/dt/x': rule name 'bad-name' must be 1 to 128 letters, digits or underscores$"),
    ("$aws/rules/meter_ingest/", r"^topic '\$aws/rules/meter_ingest/' has nothing after its Basic Ingest prefix$"),
    ("$aws/rules/meter_ingest/dt/1/2/3/4/5/6/7/8",
     r"^topic '\$aws/rules/meter_ingest/dt/1/2/3/4/5/6/7/8' has 8 slashes, more than 7$"),
    ("dt//x", r"^topic 'dt//x' has an empty level$"),
])
def test_reserved_and_basic_ingest_topics_are_checked(offline_publisher, topic, message):
    with pytest.raises(UndeliverableError, match=message):
        offline_publisher.publish(topic, b"{}").result()


def test_limits_are_inclusive_and_basic_ingest_prefix_is_not_counted(offline_publisher):
    ok = [
        ("dt/1/2/3/4/5/6/7", b"x" * (128 * 1024)),
        ("dt/" + "a" * 253, b"{}"),
        ("$aws/rules/meter_ingest/dt/1/2/3/4/5/6/7", b"{}"),  # IoT Core counts after the prefix
        ("$aws/rules/meter_ingest/dt/" + "a" * 253, b"{}"),
    ]
    for topic, payload in ok:
        # Passing the checks means reaching awscrt, which refuses it: the client never started.
        with pytest.raises(RetryableError):
            offline_publisher.publish(topic, payload).result(WAIT)


# -- outages -----------------------------------------------------------------------------------


def test_broker_stop_fails_pending_and_offline_publishes_as_retryable(make_publisher, broker):
    pub = make_publisher()
    broker.pause()
    pending = [pub.publish(f"dt/site-1/meter-{i}", b"in flight") for i in range(5)]
    broker.kill()

    assert pub.wait_disconnected(WAIT)
    assert not pub.connected
    for fut in pending:
        # The cause is AWS_IO_SOCKET_CLOSED or AWS_IO_TLS_ERROR_WRITE_FAILURE, as the race goes.
        with pytest.raises(RetryableError, match=r"^connection lost: AWS_IO_\w+$"):
            fut.result(WAIT)
    with pytest.raises(RetryableError, match=r"^publish to 'dt/offline' failed: "
                                             r"AWS_ERROR_MQTT5_OPERATION_FAILED_DUE_TO_OFFLINE_QUEUE_POLICY: .*$"):
        pub.publish("dt/offline", b"x").result(WAIT)


def test_broker_restart_on_same_port_reconnects_and_delivers(make_publisher, broker, subscriber):
    pub = make_publisher()
    port = broker.port
    broker.stop()
    assert pub.wait_disconnected(WAIT)
    assert subscriber.wait_disconnected(WAIT)

    broker.start()
    assert broker.port == port
    assert pub.wait_connected(WAIT)
    assert subscriber.wait_subscribed(WAIT)
    assert pub.publish("dt/site-1/after-restart", b"back").result(WAIT) is None
    assert subscriber.wait_for(lambda msgs: "dt/site-1/after-restart" in _topics(msgs), WAIT)


def test_without_fail_on_disconnect_awscrt_resends_after_reconnect(make_publisher, broker, subscriber):
    """awscrt's default queue policy, measured: pending through the outage, delivered after it."""
    pub = make_publisher(fail_on_disconnect=False)
    broker.pause()
    inflight = pub.publish("dt/site-1/inflight", b"1")
    broker.kill()
    assert pub.wait_disconnected(WAIT)
    offline = pub.publish("dt/site-1/offline", b"2")
    with pytest.raises(FutureTimeout):
        inflight.result(timeout=0.3)
    assert not offline.done()

    broker.start()
    assert pub.wait_connected(WAIT)
    assert inflight.result(WAIT) is None
    assert offline.result(WAIT) is None


def test_close_fails_pending_and_later_publishes(make_publisher, broker):
    pub = make_publisher()
    broker.pause()
    fut = pub.publish("dt/site-1/x", b"x")
    pub.close()
    broker.resume()
    assert not pub.connected
    with pytest.raises(RetryableError):
        fut.result(WAIT)
    with pytest.raises(RetryableError, match=r"^publisher closed$"):
        pub.publish("dt/site-1/x", b"x").result(WAIT)


# -- configuration -----------------------------------------------------------------------------


def test_iot_core_target_keeps_awscrt_flow_control(broker, certs):
    remote = publisher_for(broker, certs, local=False)
    local = publisher_for(broker, certs, local=True)
    try:
        assert remote.local is False
        assert (remote.client_options.extended_validation_and_flow_control_options
                is mqtt5.ExtendedValidationAndFlowControlOptions.AWS_IOT_CORE_DEFAULTS)
        assert local.local is True
        assert (local.client_options.extended_validation_and_flow_control_options
                is mqtt5.ExtendedValidationAndFlowControlOptions.NONE)
    finally:
        remote.close()
        local.close()


def test_ack_timeout_is_awscrts_operation_timeout(broker, certs):
    pub = publisher_for(broker, certs, ack_timeout=12.4)
    try:
        assert pub.client_options.ack_timeout_sec == 12
    finally:
        pub.close()


def test_reconnect_backoff_is_exponential_with_full_jitter(broker, certs):
    pub = publisher_for(broker, certs, min_reconnect_delay=0.5, max_reconnect_delay=30)
    try:
        opts = pub.client_options
        assert opts.retry_jitter_mode is mqtt5.ExponentialBackoffJitterMode.FULL
        assert (opts.min_reconnect_delay_ms, opts.max_reconnect_delay_ms) == (500, 30_000)
        assert opts.connect_options.client_id == THING
    finally:
        pub.close()


def test_unloadable_certificate_is_a_config_error(certs, tmp_path):
    bad = tmp_path / "bad.crt"
    bad.write_text("not a PEM")
    with pytest.raises(ConfigError, match=r"^cannot load certificate '.*/bad.crt' and key '.*/bad.crt' "
                                          r"for meter-gw-1: .*AWS_ERROR_INVALID_ARGUMENT.*$"):
        MqttPublisher("localhost", THING, bad, bad, certs.ca)
    with pytest.raises(ConfigError, match=r"^cannot load certificate '/nonexistent.crt' .*No such file.*$"):
        MqttPublisher("localhost", THING, "/nonexistent.crt", "/nonexistent.key", certs.ca)


def test_reconnect_delays_are_checked(broker, certs):
    with pytest.raises(ValueError, match=r"^reconnect delays must satisfy 0 < min \(5\) <= max \(1\)$"):
        publisher_for(broker, certs, min_reconnect_delay=5, max_reconnect_delay=1)


# -- error mapping -----------------------------------------------------------------------------


def _all_crt_errors():
    """Every error awscrt knows: AwsCrtError, or a builtin for a few codes (MemoryError...)."""
    errors = [from_code(code) for code in range(0, 16 * 1024)]
    return [e for e in errors if getattr(e, "name", None) != "Unknown Error Code"]


def _name(exc):
    return exc.name if isinstance(exc, AwsCrtError) else type(exc).__name__


def test_every_awscrt_error_is_mapped():
    errors = _all_crt_errors()
    assert len(errors) > 300
    for exc in errors:
        mapped = map_crt_error(exc, "dt/x")
        assert isinstance(mapped, (RetryableError, UndeliverableError)), _name(exc)
        assert mapped.__cause__ is exc
        assert _name(exc) in str(mapped)
        undeliverable = _name(exc) in UNDELIVERABLE_CRT_ERRORS or isinstance(exc, (ValueError, OverflowError))
        assert isinstance(mapped, UndeliverableError) == undeliverable, _name(exc)


def test_undeliverable_awscrt_errors_exist():
    names = {_name(e) for e in _all_crt_errors()}
    assert UNDELIVERABLE_CRT_ERRORS <= names


@pytest.mark.parametrize(("exc", "kind"), [
    (TypeError("bad payload"), UndeliverableError),
    (ValueError("bad topic"), UndeliverableError),
    (RuntimeError("binding"), RetryableError),
    (BrokenPipeError(), RetryableError),
])
def test_non_awscrt_exceptions_are_mapped(exc, kind):
    mapped = map_crt_error(exc, "dt/x")
    assert type(mapped) is kind
    assert mapped.__cause__ is exc


@pytest.mark.parametrize("code", [c for c in mqtt5.PubackReasonCode if c >= 128])
def test_every_failing_puback_reason_is_mapped(code):
    err = puback_error(code, "why", "dt/x")
    undeliverable = code in (mqtt5.PubackReasonCode.TOPIC_NAME_INVALID, mqtt5.PubackReasonCode.PAYLOAD_FORMAT_INVALID)
    if code == mqtt5.PubackReasonCode.NOT_AUTHORIZED:
        assert type(err) is NotAuthorizedError
    else:
        assert type(err) is (UndeliverableError if undeliverable else RetryableError)
    assert str(err) == f"PUBACK {code.name} ({int(code)}) for 'dt/x': why"
