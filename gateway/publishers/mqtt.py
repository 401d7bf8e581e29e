"""The MQTT5 publisher: awscrt over mutual TLS to AWS IoT Core (or a local mosquitto).

    pub = MqttPublisher("xxxx-ats.iot.eu-west-1.amazonaws.com", "meter-gw-1",
                        cert="gw.crt", key="gw.key", ca="AmazonRootCA1.pem")
    pub.start()
    pub.wait_connected(10)
    fut = pub.publish("dt/site-1/meter-7/readings", payload)   # Future[None]

What a future does
------------------
* QoS 1: resolves with ``None`` on a PUBACK whose reason code is a success (SUCCESS or
  NO_MATCHING_SUBSCRIBERS). QoS 0: resolves once awscrt has written the packet.
* Fails with :class:`~gateway.errors.UndeliverableError` when the message can never be delivered
  as it is: it fails the pre-publish checks below, awscrt's own validation rejects it (oversize
  for the negotiated maximum packet size, bad topic), or the PUBACK says TOPIC_NAME_INVALID or
  PAYLOAD_FORMAT_INVALID.
* Fails with :class:`~gateway.errors.NotAuthorizedError` on a PUBACK NOT_AUTHORIZED: IoT Core
  answers it when the thing's policy does not allow the topic, so it is a fault of the
  configuration, not of the message. The forwarder keeps the readings and retries slowly.
* Fails with :class:`~gateway.errors.RetryableError` for everything else: connection lost,
  offline, ack timeout, QUOTA_EXCEEDED, UNSPECIFIED_ERROR and other failing PUBACKs, any other
  awscrt error (see :func:`map_crt_error`), and after :meth:`close`.

Disconnects (measured with awscrt 0.36.1 against mosquitto 2.0.11, clean sessions)
------------------------------------------------------------------------------------
awscrt's default offline queue policy keeps un-acked QoS 1 publishes *pending* through an
outage, queues new ones while offline, and re-sends all of them after the reconnect, where
they complete. With ``FAIL_ALL_ON_DISCONNECT``, new publishes while offline fail at once, but
the un-acked ones still stay pending for the whole outage and only fail after the reconnect.

This publisher fails fast instead (``fail_on_disconnect=True``, the default): it uses
``FAIL_ALL_ON_DISCONNECT`` and, when the connection drops, fails every pending future with
RetryableError itself. The durable buffer is the queue; the forwarder sees the batch fail,
stops claiming work while ``connected`` is False, and sends the batch again later. A message
whose PUBACK was lost may arrive twice, which QoS 1 allows. With ``fail_on_disconnect=False``
you get awscrt's default behaviour described above.

Pre-publish checks (IoT Core's limits; they never touch the network)
--------------------------------------------------------------------
:func:`gateway.topics.check_message`, the one home of IoT Core's limits: topic non-empty, at
most 256 bytes of UTF-8 and 7 slashes (a ``$aws/rules/<rule>/`` Basic Ingest prefix is not
counted, as in IoT Core), no ``+``/``#`` wildcards, no NUL, no empty level, no other ``$``
prefix; payload bytes-like and at most 128 KB; qos 0 or 1.

Timeouts
--------
``ack_timeout`` is awscrt's operation timeout (``ClientOptions.ack_timeout_sec``, whole seconds):
a QoS 1 publish written to the socket without PUBACK that long fails with RetryableError
(AWS_ERROR_MQTT_TIMEOUT). The runner sets it from ``forwarder.ack_timeout_s``; the forwarder's
own per-claim timeout is longer (see :mod:`gateway.forwarder`), so the client fails a lost
publish before the forwarder gives up on its claim.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Callable

from awscrt import mqtt5
from awscrt.exceptions import AwsCrtError
from awsiot import mqtt5_client_builder

from gateway.errors import ConfigError, NotAuthorizedError, PublishError, RetryableError, UndeliverableError
from gateway.publishers import Message
from gateway.topics import MAX_PAYLOAD_BYTES, check_message

__all__ = ["MqttPublisher", "MqttSubscriber", "map_crt_error", "puback_error"]

log = logging.getLogger(__name__)

# awscrt errors that mean "this message, as it is, will never go": its own validation.
UNDELIVERABLE_CRT_ERRORS = frozenset({
    "AWS_ERROR_MQTT5_PACKET_VALIDATION",
    "AWS_ERROR_MQTT5_PUBLISH_OPTIONS_VALIDATION",
    "AWS_ERROR_MQTT5_USER_PROPERTY_VALIDATION",
    "AWS_ERROR_MQTT5_INVALID_UTF8_STRING",
    "AWS_ERROR_MQTT5_INVALID_OUTBOUND_TOPIC_ALIAS",
    "AWS_ERROR_MQTT_INVALID_TOPIC",
    "AWS_ERROR_MQTT_INVALID_QOS",
    "AWS_ERROR_MQTT_BUFFER_TOO_BIG",
})

_PUBACK_OK = frozenset({mqtt5.PubackReasonCode.SUCCESS, mqtt5.PubackReasonCode.NO_MATCHING_SUBSCRIBERS})
UNDELIVERABLE_PUBACKS = frozenset({
    mqtt5.PubackReasonCode.TOPIC_NAME_INVALID,
    mqtt5.PubackReasonCode.PAYLOAD_FORMAT_INVALID,
})


def map_crt_error(exc: BaseException, topic: str = "") -> PublishError:
    """The gateway error for an exception out of awscrt (raise it ``from exc``).

    Validation errors (:data:`UNDELIVERABLE_CRT_ERRORS`) and the builtins that mean a bad
    argument (TypeError, ValueError, OverflowError) are undeliverable;
    every other awscrt error (connection, TLS, timeout, offline queue policy, stop) and
    cancellation is retryable.
    """
    where = f" to {topic!r}" if topic else ""
    if isinstance(exc, PublishError):
        return exc
    if isinstance(exc, AwsCrtError):
        if exc.name in UNDELIVERABLE_CRT_ERRORS:
            err: PublishError = UndeliverableError(f"awscrt rejected the publish{where}: {exc.name}: {exc.message}")
        else:
            err = RetryableError(f"publish{where} failed: {exc.name}: {exc.message}")
    else:
        # from_code() turns a few awscrt codes into builtins (ValueError for
        # AWS_ERROR_INVALID_ARGUMENT, BrokenPipeError, MemoryError...), often without a message.
        what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, (TypeError, ValueError, OverflowError)):
            err = UndeliverableError(f"awscrt rejected the publish{where}: {what}")
        else:
            err = RetryableError(f"publish{where} failed: {what}")
    err.__cause__ = exc
    return err


def _settle(fut: Future, exc: BaseException | None = None) -> None:
    """Resolve ``fut`` unless something (close, disconnect) got there first."""
    try:
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)
    except InvalidStateError:
        pass


class _Connection:
    """Lifecycle bookkeeping shared by the publisher and the subscriber.

    ``connected`` is True only between a connection success and the next disconnection,
    connection failure or stop; everything waits on one condition.
    """

    def __init__(self, name: str):
        self._name = name
        self._state = threading.Condition()
        self._is_connected = False
        self._is_stopped = True
        self.connect_failures = 0  # failed connection attempts since construction
        self.last_error: BaseException | None = None
        self._failing = False  # logged the current outage already

    @property
    def connected(self) -> bool:
        return self._is_connected

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until the client is connected; False if ``timeout`` passed first."""
        with self._state:
            return self._state.wait_for(lambda: self._is_connected, timeout)

    def wait_disconnected(self, timeout: float | None = None) -> bool:
        """Wait until the client is not connected; False if ``timeout`` passed first."""
        with self._state:
            return self._state.wait_for(lambda: not self._is_connected, timeout)

    def wait_connect_failures(self, n: int = 1, timeout: float | None = None) -> bool:
        """Wait until ``n`` connection attempts have failed in all; False on timeout."""
        with self._state:
            return self._state.wait_for(lambda: self.connect_failures >= n, timeout)

    def _set(self, connected: bool, *, stopped: bool = False, failed: bool = False) -> None:
        with self._state:
            self._is_connected = connected
            self._is_stopped = stopped
            self.connect_failures += failed
            self._state.notify_all()

    def _on_success(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        if self._failing:
            log.info("%s: connected again", self._name)
        self._failing = False
        self.last_error = None
        self._set(True)

    def _on_failure(self, data: mqtt5.LifecycleConnectFailureData) -> None:
        self._note_error(data.exception, "cannot connect")
        self._set(False, failed=True)

    def _on_disconnection(self, data: mqtt5.LifecycleDisconnectData) -> None:
        self._note_error(data.exception, "disconnected")
        self._set(False)

    def _on_stopped(self, data: mqtt5.LifecycleStoppedData) -> None:
        self._set(False, stopped=True)

    def _wait_stopped(self, timeout: float) -> bool:
        with self._state:
            return self._state.wait_for(lambda: self._is_stopped, timeout)

    def _note_error(self, exc: BaseException | None, what: str) -> None:
        if getattr(exc, "name", "") == "AWS_ERROR_MQTT5_USER_REQUESTED_STOP":
            log.debug("%s: stopped", self._name)
            return
        self.last_error = exc
        # Like a meter that stops answering: once at WARNING, then quietly until it recovers.
        level = logging.DEBUG if self._failing else logging.WARNING
        self._failing = True
        log.log(level, "%s: %s: %s", self._name, what, getattr(exc, "name", exc))

    def _lifecycle_kwargs(self) -> dict:
        return dict(
            on_lifecycle_connection_success=self._on_success,
            on_lifecycle_connection_failure=self._on_failure,
            on_lifecycle_disconnection=self._on_disconnection,
            on_lifecycle_stopped=self._on_stopped,
        )


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class MqttPublisher(_Connection):
    """Publishes to IoT Core (``local=False``) or a local broker over MQTT5 and mutual TLS.

    Args:
        endpoint: the IoT Core ATS endpoint, or ``localhost`` for a local broker.
        thing_name: the IoT thing; the MQTT client id unless ``client_id`` is given.
        client_id: the MQTT client id (None: the thing name, as IoT Core policies expect). Inside
            Greengrass the nucleus already connects as the thing name, so a component needs another.
        cert, key: the thing's certificate and private key (PEM files).
        ca: the CA to trust for the server (AmazonRootCA1.pem), or None for the system store.
        port: 8883 (direct MQTT over TLS).
        local: False keeps awscrt's AWS_IOT_CORE_DEFAULTS validation and flow control
            (100 publishes/s, 512 KB/s per connection); True turns both off.
        min_reconnect_delay, max_reconnect_delay: bounds of the exponential reconnect backoff, s.
        jitter: awscrt's backoff jitter mode; FULL is "random between 0 and the backoff".
        keep_alive: MQTT keep-alive, s (IoT Core accepts 30..1200).
        ack_timeout: a QoS 1 publish without PUBACK this long fails with RetryableError, s.
        connack_timeout: a CONNECT without CONNACK this long is a failed attempt, s.
        fail_on_disconnect: fail pending futures when the connection drops (see module doc).

    Raises ConfigError when the certificate or key cannot be loaded.
    """

    def __init__(self, endpoint: str, thing_name: str, cert: str | os.PathLike, key: str | os.PathLike,
                 ca: str | os.PathLike | None = None, *, port: int = 8883, local: bool = False,
                 min_reconnect_delay: float = 1.0, max_reconnect_delay: float = 120.0,
                 jitter: mqtt5.ExponentialBackoffJitterMode = mqtt5.ExponentialBackoffJitterMode.FULL,
                 keep_alive: int = 300, ack_timeout: float = 60.0, connack_timeout: float = 20.0,
                 fail_on_disconnect: bool = True, client_id: str | None = None):
        client_id = client_id or thing_name
        super().__init__(f"mqtt {client_id}@{endpoint}:{port}")
        if not 0 < min_reconnect_delay <= max_reconnect_delay:
            raise ValueError(f"reconnect delays must satisfy 0 < min ({min_reconnect_delay}) "
                             f"<= max ({max_reconnect_delay})")
        self.local = local
        self.thing_name = thing_name
        self.client_id = client_id
        self.endpoint = endpoint
        self.port = port
        self.fail_on_disconnect = fail_on_disconnect
        self._pending: set[Future] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._topics_ok: set[str] = set()
        self._qos = {0: mqtt5.QoS.AT_MOST_ONCE, 1: mqtt5.QoS.AT_LEAST_ONCE}
        self.client_options = mqtt5.ClientOptions(
            host_name=endpoint,
            port=port,
            # None leaves the builder's default, AWS_IOT_CORE_DEFAULTS.
            extended_validation_and_flow_control_options=(
                mqtt5.ExtendedValidationAndFlowControlOptions.NONE if local else None),
            offline_queue_behavior=(
                mqtt5.ClientOperationQueueBehaviorType.FAIL_ALL_ON_DISCONNECT if fail_on_disconnect
                else mqtt5.ClientOperationQueueBehaviorType.DEFAULT),
            session_behavior=mqtt5.ClientSessionBehaviorType.CLEAN,
            retry_jitter_mode=jitter,
            min_reconnect_delay_ms=_ms(min_reconnect_delay),
            max_reconnect_delay_ms=_ms(max_reconnect_delay),
            ack_timeout_sec=max(1, round(ack_timeout)),
            connack_timeout_ms=_ms(connack_timeout),
        )
        try:
            self._client = mqtt5_client_builder.mtls_from_path(
                endpoint=endpoint, port=port, cert_filepath=os.fspath(cert), pri_key_filepath=os.fspath(key),
                ca_filepath=os.fspath(ca) if ca is not None else None, client_id=client_id,
                keep_alive_interval_sec=keep_alive, client_options=self.client_options,
                **self._lifecycle_kwargs(),
            )
        except (AwsCrtError, OSError, RuntimeError) as exc:  # missing or unreadable cert/key, bad PEM
            raise ConfigError("", f"cannot load certificate {os.fspath(cert)!r} and key {os.fspath(key)!r} "
                                  f"for {thing_name}: {exc}") from exc

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> "MqttPublisher":
        """Start connecting (and reconnecting, with backoff) in the background."""
        with self._state:
            self._is_stopped = False
        self._client.start()
        return self

    def _on_disconnection(self, data: mqtt5.LifecycleDisconnectData) -> None:
        super()._on_disconnection(data)
        if self.fail_on_disconnect:
            self._fail_pending(RetryableError(f"connection lost: {getattr(data.exception, 'name', data.exception)}"),
                               cause=data.exception)

    def _fail_pending(self, err: RetryableError, cause: BaseException | None = None) -> None:
        with self._lock:
            pending, self._pending = self._pending, set()
        for fut in pending:
            e = RetryableError(str(err))
            e.__cause__ = cause
            _settle(fut, e)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the client; futures still pending fail with RetryableError."""
        if self._closed:
            return
        self._closed = True
        self._client.stop()
        self._wait_stopped(timeout)
        self._set(False, stopped=True)
        self._fail_pending(RetryableError("publisher closed"))

    def __enter__(self) -> "MqttPublisher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the hot path -------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> "Future[None]":
        """Send one message; the future settles as the module doc says. Never raises."""
        fut: Future[None] = Future()
        if type(topic) is not str or topic not in self._topics_ok or qos not in self._qos or type(payload) is not bytes \
                or len(payload) > MAX_PAYLOAD_BYTES:
            problem = check_message(topic, payload, qos)
            if problem is not None:
                fut.set_exception(UndeliverableError(problem))
                return fut
            if len(self._topics_ok) > 4096:
                self._topics_ok.clear()
            self._topics_ok.add(topic)
        if self._closed:
            fut.set_exception(RetryableError("publisher closed"))
            return fut
        try:
            crt_fut = self._client.publish(mqtt5.PublishPacket(topic=topic, payload=payload, qos=self._qos[qos]))
        except Exception as exc:  # the binding refused the arguments
            fut.set_exception(map_crt_error(exc, topic))
            return fut
        with self._lock:
            self._pending.add(fut)
        crt_fut.add_done_callback(lambda f: self._completed(f, fut, topic))
        return fut

    def _completed(self, crt_fut: Future, fut: Future, topic: str) -> None:
        with self._lock:
            self._pending.discard(fut)
        if fut.done():
            return
        try:
            exc = crt_fut.exception()
        except CancelledError as cancelled:
            exc = cancelled
        if exc is not None:
            _settle(fut, map_crt_error(exc, topic))
            return
        puback = crt_fut.result().puback
        code = puback.reason_code if puback is not None else None
        if code is None or code in _PUBACK_OK:  # None: QoS 0, written
            _settle(fut)
        else:
            _settle(fut, puback_error(code, puback.reason_string, topic))


def puback_error(code: int, reason: str | None, topic: str) -> PublishError:
    """The gateway error for a failing PUBACK reason code."""
    name = getattr(code, "name", str(code))
    text = f"PUBACK {name} ({int(code)}) for {topic!r}" + (f": {reason}" if reason else "")
    if code == mqtt5.PubackReasonCode.NOT_AUTHORIZED:
        return NotAuthorizedError(text)
    return UndeliverableError(text) if code in UNDELIVERABLE_PUBACKS else RetryableError(text)


class MqttSubscriber(_Connection):
    """Connects with mutual TLS and collects messages on a topic filter (for tests and the demo).

    ``messages`` is a list of :class:`~gateway.publishers.Message`, appended under a lock;
    :meth:`wait_for` waits on a condition, no polling.
    """

    def __init__(self, endpoint: str, client_id: str, cert: str | os.PathLike, key: str | os.PathLike,
                 ca: str | os.PathLike | None = None, *, port: int = 8883, topic_filter: str = "dt/#",
                 local: bool = True):
        super().__init__(f"subscriber {client_id}@{endpoint}:{port}")
        self.topic_filter = topic_filter
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._subscribed = False
        self.suback_error: PublishError | None = None
        self._client = mqtt5_client_builder.mtls_from_path(
            endpoint=endpoint, port=port, cert_filepath=os.fspath(cert), pri_key_filepath=os.fspath(key),
            ca_filepath=os.fspath(ca) if ca is not None else None, client_id=client_id,
            extended_validation_and_flow_control_options=(
                mqtt5.ExtendedValidationAndFlowControlOptions.NONE if local else None),
            min_reconnect_delay_ms=100, max_reconnect_delay_ms=2000,
            on_publish_received=self._on_publish, **self._lifecycle_kwargs(),
        )

    def _on_publish(self, data: mqtt5.PublishReceivedData) -> None:
        p = data.publish_packet
        with self._cond:
            self.messages.append(Message(p.topic, bytes(p.payload), int(p.qos)))
            self._cond.notify_all()

    def _on_success(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        # Clean sessions: every (re)connection subscribes again.
        with self._state:
            self._subscribed = False
            self.suback_error = None
        super()._on_success(data)
        sub = mqtt5.SubscribePacket([mqtt5.Subscription(self.topic_filter, mqtt5.QoS.AT_LEAST_ONCE)])
        self._client.subscribe(sub).add_done_callback(self._on_suback)

    def _on_suback(self, fut: Future) -> None:
        exc = fut.exception()
        with self._state:
            if exc is not None:
                self.suback_error = map_crt_error(exc, self.topic_filter)
            elif any(code >= 128 for code in fut.result().reason_codes):
                self.suback_error = RetryableError(
                    f"{self._name}: SUBACK {fut.result().reason_codes} for {self.topic_filter!r}")
            else:
                self._subscribed = True
            self._state.notify_all()

    def _set(self, connected: bool, **kw) -> None:
        if not connected:
            with self._state:
                self._subscribed = False
        super()._set(connected, **kw)

    def wait_subscribed(self, timeout: float | None = None) -> bool:
        """Wait until connected and subscribed; raise the SUBACK's error if it failed."""
        with self._state:
            ok = self._state.wait_for(lambda: self._subscribed or self.suback_error is not None, timeout)
            if self.suback_error is not None:
                raise self.suback_error
            return ok

    def start(self, timeout: float = 10.0) -> "MqttSubscriber":
        """Connect and subscribe; raise RetryableError if that does not happen within ``timeout``."""
        with self._state:
            self._is_stopped = False
        self._client.start()
        if not self.wait_subscribed(timeout):
            raise RetryableError(f"{self._name}: not subscribed after {timeout}s: {self.last_error}")
        return self

    def wait_for(self, predicate: Callable[[list[Message]], object], timeout: float):
        """Wait until ``predicate(messages)`` is truthy; return its last value (falsy on timeout)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.messages), timeout)

    def snapshot(self) -> list[Message]:
        with self._cond:
            return list(self.messages)

    def close(self, timeout: float = 5.0) -> None:
        self._client.stop()
        self._wait_stopped(timeout)
        self._set(False, stopped=True)

    def __enter__(self) -> "MqttSubscriber":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
