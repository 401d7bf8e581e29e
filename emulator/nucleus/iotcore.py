"""The local nucleus's bridge to IoT Core: one MQTT5 connection, a spooler, re-established subscriptions.

The IPC server's PublishToIoTCore, SubscribeToIoTCore and SubscribeToIoTCoreConnectionStatus
run on this. "IoT Core" here is the local mosquitto of :mod:`emulator.broker`, with mutual TLS::

    bridge = IotCoreBridge("localhost", broker.port, "meter-gw-1", cert, key, ca,
                           spool=SpoolConfig(storage_type="Disk", path=root / "spool.db")).start()
    bridge.publish("dt/meters/s1/meter-gw-1/raw", payload, qos=1)   # returns once spooled
    stop = bridge.subscribe("cmd/meters/meter-gw-1/#", 1, lambda topic, payload: ...)
    off = bridge.add_status_listener(lambda connected: ...)
    bridge.spool_stats    # SpoolStats(messages, bytes, queued, in_flight, dropped_qos0, dropped_failed)
    bridge.close()

Interface (what the IPC server calls)
-------------------------------------
``IotCoreBridge(endpoint, port, thing_name, cert, key, ca, *, spool=SpoolConfig(), clock=time.monotonic,
**tuning)``; ``start() -> self``; ``close()``.

``publish(topic, payload, qos, *, retain, user_properties, message_expiry_interval_sec,
correlation_data, response_topic, payload_format, content_type) -> None`` (the keywords are the
MQTT 5 properties PublishToIoTCore carries; they are spooled and sent with the message) returns
when the message is *spooled*, not when it is
acknowledged, as the nucleus's ``MqttClient.publish`` does. It raises :class:`SpoolFull` (or a
subclass) with the nucleus's own text, which the IPC server answers as ServiceError
``Publish to topic <topic> failed: <text>``:

* ``Message spool is full. Message could not be added.`` / ``Message is larger than the size of
  message spool.`` (:class:`SpoolFull`; see :mod:`emulator.nucleus.spool` for eviction);
* ``Device is offline. Dropping QoS 0 message.`` (:class:`OfflineQos0Dropped`): offline, with
  ``keepQos0WhenOffline`` false, a QoS 0 message is refused (and counted in ``dropped_qos0``);
* ``The publishing message size N bytes exceeds the configured limit of 131072 bytes``
  (:class:`MessageTooLarge`, ``mqtt.maxMessageSizeInBytes``).

``subscribe(topic_filter, qos, callback) -> unsubscribe``: ``callback(topic, payload)`` runs on the
bridge's one dispatch thread, in arrival order (never on awscrt's event loop). Connected, it
returns after the SUBACK and raises :class:`SubscribeFailed` (``Subscribe to topic <filter> failed
with error <reason code>``) on a failing one; offline, it registers the subscription and returns,
and the broker learns it at the next connection. Calling the returned function unsubscribes
(idempotent); the broker is told UNSUBSCRIBE when no callback is left on that filter.

``add_status_listener(cb) -> remove``: ``cb(connected: bool)`` on every change of
:attr:`connected` (True after a CONNACK, False when the connection goes), on the dispatch thread
in order with the messages; the IPC server turns them into SubscribeToIoTCoreConnectionStatus
events.

``MqttProxyBridge(bridge)`` puts it behind the seam of :mod:`emulator.nucleus.mqttproxy` (the
same calls; a refused SUBACK's text is its reason code alone, as the proxy words the error).

How it behaves (as the Java nucleus, ``com.aws.greengrass.mqttclient.MqttClient``)
-----------------------------------------------------------------------------------
* One awscrt MQTT5 client, mutual TLS, client id = thing name, reconnecting with exponential
  backoff (``min_reconnect_delay``..``max_reconnect_delay``) whenever the broker goes away.
  Offline queue ``FAIL_ALL_ON_DISCONNECT``, as the nucleus configures it.
* A sender thread drains the spool to the broker oldest first, with at most
  ``max_in_flight`` (``mqtt.maxInFlightPublishes``, 5; at most 100) QoS 1 publishes awaiting
  PUBACK. A message leaves the spool only on success (PUBACK SUCCESS or NO_MATCHING_SUBSCRIBERS;
  for QoS 0, once written). A failing PUBACK or error puts it back at the front to be sent again,
  up to ``max_publish_retry`` (``mqtt.maxPublishRetry``, 100; -1 unlimited) times, then it is
  dropped; PUBACK NOT_AUTHORIZED, TOPIC_NAME_INVALID and PAYLOAD_FORMAT_INVALID, and awscrt's own
  validation errors, drop it at once. Dropped messages count in ``dropped_failed`` and are logged.
* When the connection goes: messages in flight go back to the front of the spool in their order
  (they are sent again after the reconnect; QoS 1 allows the duplicate), and with
  ``keepQos0WhenOffline`` false every queued QoS 0 message is dropped (counted in
  ``dropped_qos0``).
* Every subscription is sent again after *every* connection success, session present or not,
  and retried every second while its SUBSCRIBE fails on a live connection: a broker restart
  never silently loses one (the bug of aws-greengrass-lite#1172).

Differences from the nucleus, on purpose: one connection (the nucleus opens another per 50
subscriptions); a clean session at every connect (the nucleus rejoins, then re-subscribes only
when the broker lost the session; here the broker never keeps one); awscrt's IoT Core flow control
(100 publishes/s, 512 KB/s) is off unless ``iot_core_limits=True``, since the target is a local
broker; a SQLite error in Disk mode raises SpoolFull instead of falling back to memory.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable

from awscrt import mqtt5
from awscrt.exceptions import AwsCrtError
from awsiot import mqtt5_client_builder

from emulator.nucleus.spool import (MessageTooLarge, OFFLINE_QOS0_TEXT, OfflineQos0Dropped, Spool, SpoolConfig,
                                    SpoolFull, SpoolMessage, SpoolStats)
from gateway.errors import ConfigError, GatewayError
from gateway.publishers.mqtt import UNDELIVERABLE_CRT_ERRORS
from gateway.topics import topic_matches

__all__ = ["IotCoreBridge", "MqttProxyBridge", "SpoolConfig", "SpoolFull", "OfflineQos0Dropped", "MessageTooLarge",
           "SpoolStats",
           "SubscribeFailed", "topic_matches", "DEFAULT_MAX_MESSAGE_SIZE", "MAX_IN_FLIGHT_LIMIT"]

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_SIZE = 128 * 1024  # mqtt.maxMessageSizeInBytes
MAX_IN_FLIGHT_LIMIT = 100  # IoT Core's limit on unacknowledged QoS 1 publishes per connection

_PUBACK_OK = frozenset({mqtt5.PubackReasonCode.SUCCESS, mqtt5.PubackReasonCode.NO_MATCHING_SUBSCRIBERS})
# The nucleus's nonRetryablePubAckReasonCodes, less the two successes.
_PUBACK_GIVE_UP = frozenset({mqtt5.PubackReasonCode.TOPIC_NAME_INVALID, mqtt5.PubackReasonCode.PAYLOAD_FORMAT_INVALID,
                             mqtt5.PubackReasonCode.NOT_AUTHORIZED})
_QOS = {0: mqtt5.QoS.AT_MOST_ONCE, 1: mqtt5.QoS.AT_LEAST_ONCE}
RESUBSCRIBE_RETRY_S = 1.0


class SubscribeFailed(GatewayError):
    """A subscription the broker refused, or a topic filter that is not one; the nucleus's text.

    ``reason`` is the SUBACK's reason code name (or what is wrong with the filter).
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason if reason is not None else message


def check_filter(topic_filter: str) -> str | None:
    """What is wrong with ``topic_filter`` as an MQTT topic filter, or None."""
    if not isinstance(topic_filter, str) or not topic_filter:
        return "the topic filter is empty"
    if "\x00" in topic_filter:
        return "the topic filter contains a NUL character"
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "# must be a whole level, and the last"
        if "+" in level and level != "+":
            return "+ must be a whole level"
    return None


def _packet(msg: SpoolMessage) -> mqtt5.PublishPacket:
    packet = mqtt5.PublishPacket(topic=msg.topic, payload=msg.payload, qos=_QOS[msg.qos])
    for key, value in (msg.properties or {}).items():
        if key == "correlation_data":
            packet.correlation_data_bytes = value
        elif key == "user_properties":
            packet.user_properties = [mqtt5.UserProperty(name, v) for name, v in value]
        elif key == "payload_format":
            packet.payload_format_indicator = (mqtt5.PayloadFormatIndicator.AWS_MQTT5_PFI_UTF8 if value == "UTF8"
                                               else mqtt5.PayloadFormatIndicator.AWS_MQTT5_PFI_BYTES)
        else:
            setattr(packet, key, value)
    return packet


class _Subscription:
    def __init__(self, qos: int):
        self.qos = qos
        self.callbacks: list[Callable[[str, bytes], None]] = []


class IotCoreBridge:
    """The nucleus's connection to IoT Core (see the module doc for what it does).

    Args beyond the interface (keywords, the nucleus's ``mqtt`` settings where it has one):
        max_in_flight: ``maxInFlightPublishes``, 1..100 (5).
        max_publish_retry: ``maxPublishRetry`` (100; -1 unlimited).
        max_message_size: ``maxMessageSizeInBytes`` (131072).
        operation_timeout: ``operationTimeoutMs``/1000: PUBACK and SUBACK timeout, s (30).
        min_reconnect_delay, max_reconnect_delay: the reconnect backoff's bounds, s (1, 120).
        keep_alive: MQTT keep-alive, s (60, ``keepAliveTimeoutMs``).
        iot_core_limits: keep awscrt's IoT Core flow control (False: a local broker).

    Raises ConfigError when the certificate or key cannot be loaded.
    """

    def __init__(self, endpoint: str, port: int, thing_name: str, cert: str | os.PathLike, key: str | os.PathLike,
                 ca: str | os.PathLike | None, *, spool: SpoolConfig = SpoolConfig(),
                 clock: Callable[[], float] = time.monotonic, max_in_flight: int = 5, max_publish_retry: int = 100,
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, operation_timeout: float = 30.0,
                 min_reconnect_delay: float = 1.0, max_reconnect_delay: float = 120.0, keep_alive: int = 60,
                 iot_core_limits: bool = False):
        if not 1 <= max_in_flight <= MAX_IN_FLIGHT_LIMIT:
            raise ConfigError("mqtt.maxInFlightPublishes", f"{max_in_flight} is out of range 1..{MAX_IN_FLIGHT_LIMIT}")
        if max_publish_retry < -1:
            raise ConfigError("mqtt.maxPublishRetry", f"{max_publish_retry} must be -1 (unlimited) or >= 0")
        if not 0 < min_reconnect_delay <= max_reconnect_delay:
            raise ValueError(f"reconnect delays must satisfy 0 < min ({min_reconnect_delay}) "
                             f"<= max ({max_reconnect_delay})")
        self.endpoint, self.port, self.thing_name = endpoint, port, thing_name
        self.spool_config = spool
        self.clock = clock
        self.max_in_flight = max_in_flight
        self.max_publish_retry = max_publish_retry
        self.max_message_size = max_message_size
        self.operation_timeout = operation_timeout
        self._name = f"iotcore {thing_name}@{endpoint}:{port}"
        self._spool: Spool | None = None
        self._cond = threading.Condition()  # replaced by the spool's at start()
        self._connected = False
        self._closed = False
        self._started = False
        self._stopped = threading.Event()
        self._attempted = threading.Event()  # awscrt began a connection attempt
        self._generation = 0  # counts connections; a completion from an older one is stale
        self._in_flight: dict[int, int] = {}  # message id -> generation it was sent on
        self._subs: dict[str, _Subscription] = {}
        self._acked: dict[str, int] = {}  # topic filter -> generation whose SUBACK granted it (under _cond)
        self._subs_lock = threading.Lock()
        self._listeners: dict[int, Callable[[bool], None]] = {}
        self._listener_ids = itertools.count()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self.last_error: BaseException | None = None
        self.last_change: float | None = None  # clock() at the last change of ``connected``
        self._failing = False
        options = mqtt5.ClientOptions(
            host_name=endpoint, port=port,
            extended_validation_and_flow_control_options=(
                None if iot_core_limits else mqtt5.ExtendedValidationAndFlowControlOptions.NONE),
            offline_queue_behavior=mqtt5.ClientOperationQueueBehaviorType.FAIL_ALL_ON_DISCONNECT,
            session_behavior=mqtt5.ClientSessionBehaviorType.CLEAN,
            retry_jitter_mode=mqtt5.ExponentialBackoffJitterMode.FULL,
            min_reconnect_delay_ms=max(1, round(min_reconnect_delay * 1000)),
            max_reconnect_delay_ms=max(1, round(max_reconnect_delay * 1000)),
            ack_timeout_sec=max(1, round(operation_timeout)),
        )
        try:
            self._client = mqtt5_client_builder.mtls_from_path(
                endpoint=endpoint, port=port, cert_filepath=os.fspath(cert), pri_key_filepath=os.fspath(key),
                ca_filepath=os.fspath(ca) if ca is not None else None, client_id=thing_name,
                keep_alive_interval_sec=keep_alive, client_options=options,
                on_publish_received=self._on_publish_received,
                on_lifecycle_connection_success=self._on_connection_success,
                on_lifecycle_connection_failure=self._on_connection_failure,
                on_lifecycle_disconnection=self._on_disconnection,
                on_lifecycle_stopped=lambda data: self._stopped.set(),
                on_lifecycle_attempting_connect=lambda data: self._attempted.set(),
            )
        except (AwsCrtError, OSError, RuntimeError) as exc:
            raise ConfigError("", f"cannot load certificate {os.fspath(cert)!r} and key {os.fspath(key)!r} "
                                  f"for {thing_name}: {exc}") from exc

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> "IotCoreBridge":
        """Open the spool and start connecting (and reconnecting) and sending in the background."""
        if self._started:
            return self
        self._started = True
        self._spool = Spool(self.spool_config)
        self._cond = self._spool.lock
        for target, name in ((self._send_loop, "iotcore-sender"), (self._dispatch_loop, "iotcore-dispatch")):
            t = threading.Thread(target=target, name=f"{name}-{self.thing_name}", daemon=True)
            t.start()
            self._threads.append(t)
        self._client.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Disconnect and stop; a Disk spool keeps every message not yet acknowledged."""
        if self._closed or not self._started:
            self._closed = True
            return
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._client.stop()
        # A stop() before awscrt has begun its first attempt is not always followed by the
        # stopped event (awscrt 0.36.1), though the client is stopped: do not wait long for it.
        self._stopped.wait(timeout if self._attempted.is_set() else min(timeout, 0.2))
        with self._cond:
            self._connected = False
        self._events.put(None)
        for t in self._threads:
            t.join(timeout)
        self._spool.close()

    def __enter__(self) -> "IotCoreBridge":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._connected

    def wait_connected(self, timeout: float | None = None, connected: bool = True) -> bool:
        """Wait until :attr:`connected` is ``connected``; False if ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._connected == connected, timeout)

    @property
    def spool_stats(self) -> SpoolStats:
        """Messages and bytes spooled and not yet acknowledged, and what was dropped."""
        return self._spool.stats()

    def wait_spool_empty(self, timeout: float | None = None) -> bool:
        """Wait until every spooled message was acknowledged; False on timeout."""
        return self.wait_until(lambda stats: stats.messages == 0, timeout)

    def wait_until(self, predicate: Callable[[SpoolStats], object], timeout: float | None = None):
        """Wait until ``predicate(spool_stats)`` is truthy (it is checked at every change of the
        spool or the connection); return its last value, falsy on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._spool.stats()), timeout)

    # -- connection events (awscrt's event loop: never block here) -------------------------------------

    def _on_connection_success(self, data: mqtt5.LifecycleConnectSuccessData) -> None:
        if self._failing:
            log.info("%s: connected again", self._name)
        self._failing = False
        self.last_error = None
        with self._cond:
            self._generation += 1
            generation = self._generation
            self._set_connected(True)
        with self._subs_lock:
            filters = {f: s.qos for f, s in self._subs.items()}
        for topic_filter, qos in filters.items():
            self._send_subscribe(topic_filter, qos, generation)

    def _on_connection_failure(self, data: mqtt5.LifecycleConnectFailureData) -> None:
        self._note_error(data.exception, "cannot connect")
        self._went_offline()

    def _on_disconnection(self, data: mqtt5.LifecycleDisconnectData) -> None:
        self._note_error(data.exception, "disconnected")
        self._went_offline()

    def _went_offline(self) -> None:
        with self._cond:
            if self._closed:
                return  # the spool may be closed already; a Disk spool keeps its messages anyway
            was = self._connected
            self._generation += 1
            in_flight, self._in_flight = list(self._in_flight), {}
            if self._spool is not None:
                self._spool.requeue_all(in_flight)
                if not self.spool_config.keep_qos0_when_offline:
                    dropped = self._spool.drop_qos0()
                    if dropped:
                        log.info("%s: offline: dropped %d spooled QoS 0 messages (keepQos0WhenOffline is false)",
                                 self._name, dropped)
            if was:
                self._set_connected(False)

    def _set_connected(self, connected: bool) -> None:  # under self._cond
        self._connected = connected
        self.last_change = self.clock()
        self._cond.notify_all()
        # The listeners registered now: one added later never hears of an older change.
        self._events.put(("status", connected, list(self._listeners.values())))

    def _note_error(self, exc: BaseException | None, what: str) -> None:
        if getattr(exc, "name", "") == "AWS_ERROR_MQTT5_USER_REQUESTED_STOP":
            return
        self.last_error = exc
        # Once at WARNING per outage, then quietly until it recovers.
        log.log(logging.DEBUG if self._failing else logging.WARNING, "%s: %s: %s", self._name, what,
                getattr(exc, "name", exc))
        self._failing = True

    # -- publishing -------------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int, *, retain: bool = False,
                user_properties: list[tuple[str, str]] | None = None, message_expiry_interval_sec: int | None = None,
                correlation_data: bytes | None = None, response_topic: str | None = None,
                payload_format: str | None = None, content_type: str | None = None) -> None:
        """Spool a message for IoT Core; see the module doc for what it raises.

        The keywords are the MQTT 5 properties PublishToIoTCore carries (``payload_format`` is
        "BYTES" or "UTF8"); they are spooled with the message and sent with it.
        """
        users = [list(p) for p in user_properties or ()]
        props = {k: v for k, v in (("retain", bool(retain)), ("user_properties", users),
                                   ("message_expiry_interval_sec", message_expiry_interval_sec),
                                   ("correlation_data", correlation_data), ("response_topic", response_topic),
                                   ("payload_format", payload_format), ("content_type", content_type)) if v}
        if payload_format not in (None, "BYTES", "UTF8"):
            raise ValueError(f"payload_format {payload_format!r} must be BYTES or UTF8")
        if qos not in _QOS:
            raise ValueError(f"qos {qos!r} must be 0 or 1")
        if not isinstance(topic, str) or not topic:
            raise ValueError(f"topic {topic!r} must be a non-empty str")
        payload = bytes(payload)
        if len(payload) > self.max_message_size:
            raise MessageTooLarge(f"The publishing message size {len(payload)} bytes exceeds the configured "
                                  f"limit of {self.max_message_size} bytes")
        if self._spool is None or self._closed:
            raise RuntimeError(f"{self._name}: publish() before start() or after close()")
        with self._cond:
            if qos == 0 and not self._connected and not self.spool_config.keep_qos0_when_offline:
                self._spool.count_dropped_qos0()
                raise OfflineQos0Dropped(OFFLINE_QOS0_TEXT)
            self._spool.add(topic, payload, qos, props)  # notifies the sender

    def _send_loop(self) -> None:
        cond, spool = self._cond, self._spool
        while True:
            with cond:
                cond.wait_for(lambda: self._closed or (
                    self._connected and len(self._in_flight) < self.max_in_flight and spool.has_queued()))
                if self._closed:
                    return
                msg = spool.pop()
                generation = self._generation
                self._in_flight[msg.id] = generation
                cond.notify_all()
            try:
                fut = self._client.publish(_packet(msg))
            except Exception as exc:  # the binding refused the arguments
                self._done(msg, generation, exc, None)
                continue
            fut.add_done_callback(lambda f, msg=msg, generation=generation: self._completed(f, msg, generation))

    def _completed(self, fut: Future, msg: SpoolMessage, generation: int) -> None:
        exc = fut.exception()
        puback = None if exc is not None else fut.result().puback
        self._done(msg, generation, exc, puback)

    def _done(self, msg: SpoolMessage, generation: int, exc: BaseException | None, puback) -> None:
        spool = self._spool
        with self._cond:
            if self._closed or self._in_flight.get(msg.id) != generation:
                return  # closed (a Disk spool keeps the message), or the connection went and it was queued again
            del self._in_flight[msg.id]
            code = puback.reason_code if puback is not None else None
            if exc is None and (code is None or code in _PUBACK_OK):
                spool.remove(msg.id)
            elif code in _PUBACK_GIVE_UP or getattr(exc, "name", None) in UNDELIVERABLE_CRT_ERRORS \
                    or isinstance(exc, (TypeError, ValueError, OverflowError)):
                why = f"PUBACK {code.name}" if code is not None else f"{type(exc).__name__}: {exc}"
                log.error("%s: dropped message to %r, not retryable: %s", self._name, msg.topic, why)
                spool.discard(msg.id)
            elif not spool.requeue(msg.id, self.max_publish_retry):
                why = f"PUBACK {code.name}" if code is not None else f"{getattr(exc, 'name', type(exc).__name__)}"
                log.error("%s: dropped message to %r after %d retries: %s", self._name, msg.topic,
                          self.max_publish_retry, why)
            self._cond.notify_all()

    # -- subscriptions -----------------------------------------------------------------------------------

    def subscribe(self, topic_filter: str, qos: int, callback: Callable[[str, bytes], None]) -> Callable[[], None]:
        """Register ``callback(topic, payload)`` for ``topic_filter``; see the module doc."""
        problem = check_filter(topic_filter)
        if problem is not None:
            raise SubscribeFailed(f"Subscribe to topic {topic_filter!r} failed: {problem}",
                                  f"{topic_filter!r} is not a valid topic filter: {problem}")
        if qos not in _QOS:
            raise ValueError(f"qos {qos!r} must be 0 or 1")
        with self._subs_lock:
            sub = self._subs.get(topic_filter)
            new = sub is None or qos > sub.qos
            if sub is None:
                sub = self._subs[topic_filter] = _Subscription(qos)
            sub.qos = max(sub.qos, qos)
            sub.callbacks.append(callback)

        def unsubscribe() -> None:
            self._unsubscribe(topic_filter, callback)

        with self._cond:
            connected, generation = self._connected, self._generation
        if new and connected:
            try:
                suback = self._send_subscribe(topic_filter, sub.qos, generation).result(self.operation_timeout)
            except Exception as exc:  # a timeout or the connection going: it is sent again at the next connect
                log.warning("%s: SUBSCRIBE %r not acknowledged (%s); it is sent again on the next connection",
                            self._name, topic_filter, getattr(exc, "name", type(exc).__name__))
            else:
                failed = [c for c in suback.reason_codes if c >= 128]
                if failed:
                    unsubscribe()
                    reason = getattr(failed[0], "name", str(failed[0]))
                    raise SubscribeFailed(f"Subscribe to topic {topic_filter} failed with error {reason}", reason)
        return unsubscribe

    def _send_subscribe(self, topic_filter: str, qos: int, generation: int) -> Future:
        fut = self._client.subscribe(mqtt5.SubscribePacket([mqtt5.Subscription(topic_filter, _QOS[qos])]))
        fut.add_done_callback(lambda f: self._subscribed(f, topic_filter, generation))
        return fut

    def _subscribed(self, fut: Future, topic_filter: str, generation: int) -> None:
        exc = fut.exception()
        if exc is None:
            failed = [c for c in fut.result().reason_codes if c >= 128]
            if failed:
                log.error("%s: the broker refused the subscription %r: %s", self._name, topic_filter,
                          getattr(failed[0], "name", failed[0]))
            else:
                with self._cond:
                    self._acked[topic_filter] = generation
                    self._cond.notify_all()
            return
        # Not acknowledged on a connection that is still up (a timeout): send it again, later.
        with self._cond:
            live = self._connected and self._generation == generation and not self._closed
        with self._subs_lock:
            sub = self._subs.get(topic_filter)
        if live and sub is not None:
            log.warning("%s: SUBSCRIBE %r failed (%s); again in %.0f s", self._name, topic_filter,
                        getattr(exc, "name", exc), RESUBSCRIBE_RETRY_S)
            timer = threading.Timer(RESUBSCRIBE_RETRY_S, self._resubscribe_one, (topic_filter, generation))
            timer.daemon = True
            timer.start()

    def _resubscribe_one(self, topic_filter: str, generation: int) -> None:
        with self._cond:
            live = self._connected and self._generation == generation and not self._closed
        with self._subs_lock:
            sub = self._subs.get(topic_filter)
        if live and sub is not None:
            self._send_subscribe(topic_filter, sub.qos, generation)

    def _unsubscribe(self, topic_filter: str, callback) -> None:
        with self._subs_lock:
            sub = self._subs.get(topic_filter)
            if sub is None or callback not in sub.callbacks:
                return
            sub.callbacks.remove(callback)
            if sub.callbacks:
                return
            del self._subs[topic_filter]
        if self._connected and not self._closed:
            self._client.unsubscribe(mqtt5.UnsubscribePacket([topic_filter]))

    def wait_subscribed(self, timeout: float | None = None) -> bool:
        """Wait until connected and every subscription is acknowledged on this connection."""
        def done() -> bool:
            with self._subs_lock:
                filters = list(self._subs)
            return self._connected and all(self._acked.get(f) == self._generation for f in filters)
        with self._cond:
            return self._cond.wait_for(done, timeout)

    def subscriptions(self) -> dict[str, int]:
        """The topic filters held (filter -> QoS), re-established at every connection."""
        with self._subs_lock:
            return {f: s.qos for f, s in self._subs.items()}

    # -- status listeners and dispatch ----------------------------------------------------------------------

    def add_status_listener(self, cb: Callable[[bool], None]) -> Callable[[], None]:
        """Call ``cb(connected)`` at every change of :attr:`connected`; return a function that removes it."""
        key = next(self._listener_ids)
        self._listeners[key] = cb
        return lambda: self._listeners.pop(key, None)

    def _on_publish_received(self, data: mqtt5.PublishReceivedData) -> None:
        p = data.publish_packet
        self._events.put(("message", p.topic, bytes(p.payload)))

    def _dispatch_loop(self) -> None:
        while (event := self._events.get()) is not None:
            if event[0] == "status":
                targets = [(cb, (event[1],)) for cb in event[2]]
            else:
                _, topic, payload = event
                with self._subs_lock:
                    targets = [(cb, (topic, payload)) for f, s in self._subs.items() if topic_matches(f, topic)
                               for cb in s.callbacks]
            for cb, args in targets:
                try:
                    cb(*args)
                except Exception:
                    log.exception("%s: a %s callback failed", self._name, event[0])

    def __repr__(self) -> str:
        return f"IotCoreBridge({self._name}, {'connected' if self._connected else 'offline'})"


class MqttProxyBridge:
    """:class:`IotCoreBridge` behind the seam of :mod:`emulator.nucleus.mqttproxy`:
    ``MqttProxy(MqttProxyBridge(bridge), acl)``, or ``IPCServer(iotcore=MqttProxyBridge(bridge))``.

    The seam is the bridge's own (``publish(topic, payload, qos, **MQTT 5 properties)``, callbacks
    given ``(topic, payload)``); the one difference is a refused SUBACK: it raises
    :class:`SubscribeFailed` whose text is the reason code alone, so the proxy's ServiceError reads
    as the nucleus's ``Subscribe to topic <filter> failed with error <reason code>`` (the bridge's
    own text would be said twice).
    """

    def __init__(self, bridge: IotCoreBridge):
        self.bridge = bridge

    @property
    def connected(self) -> bool:
        return self.bridge.connected

    def publish(self, topic: str, payload: bytes, qos: int, **properties) -> None:
        self.bridge.publish(topic, payload, qos, **properties)

    def subscribe(self, topic_filter: str, qos: int, callback: Callable[[str, bytes], None]) -> Callable[[], None]:
        try:
            return self.bridge.subscribe(topic_filter, qos, callback)
        except SubscribeFailed as exc:
            raise SubscribeFailed(exc.reason) from exc

    def add_status_listener(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        return self.bridge.add_status_listener(callback)
