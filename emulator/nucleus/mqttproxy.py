"""The MQTT proxy: components' PublishToIoTCore / SubscribeToIoTCore, through an IoT Core bridge.

The IPC server never speaks MQTT itself; it calls an :class:`IoTCoreBridge` (the real one, with
its spooler, lives in :mod:`emulator.nucleus.iotcore`; :class:`MemoryIoTCore` is its in-memory
twin for tests and benchmarks). The seam:

``publish(topic, payload, qos, *, retain, user_properties, message_expiry_interval_sec,
correlation_data, response_topic, payload_format, content_type) -> None``
    Accept one message for IoT Core (spool it) and return at once, on the IPC server's loop
    thread: it must not wait for the network. Raise any exception when it cannot be accepted
    (the spool is full, the message is too large): the component gets ``ServiceError``
    "Publish to topic <t> failed: <the exception's message>", as from the nucleus.
``subscribe(topic_filter: str, qos: int, callback: Callable[[str, bytes], None]) -> Callable[[], None]``
    Subscribe (it may block until the SUBACK: it runs in the server's thread pool) and return a
    function that unsubscribes. Raise on a refused subscription (ServiceError "Subscribe to
    topic <f> failed with error <message>"). ``callback(topic, payload)`` may be called from any
    thread.
``add_status_listener(callback: Callable[[bool], None]) -> Callable[[], None]``
    Call ``callback(True)`` when the connection to IoT Core comes up, ``callback(False)`` when it
    goes down; returns a function that removes the listener.
``connected: bool``
    Whether IoT Core is reachable now.

Authorization is the nucleus's: ``aws.greengrass.ipc.mqttproxy`` policies, MQTT-style
resources, and the answer to a denial is ``UnauthorizedError`` "Not Authorized".
QoS is "0" or "1" (the model's strings); a publish needs a payload.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol

from awsiot.greengrasscoreipc import model

from emulator.nucleus.accesscontrol import AccessControl
from emulator.nucleus.ipc import Call, Operation
from gateway.topics import topic_matches

NOT_AUTHORIZED = "Not Authorized"


@dataclass
class MqttMessage:
    """An MQTT message with the MQTT 5 properties IPC carries."""

    topic: str
    payload: bytes = b""
    retain: bool = False
    user_properties: list[tuple[str, str]] = field(default_factory=list)
    message_expiry_interval_seconds: int | None = None
    correlation_data: bytes | None = None
    response_topic: str | None = None
    payload_format: str | None = None  # "BYTES" or "UTF8", the model's values
    content_type: str | None = None


class IoTCoreBridge(Protocol):
    connected: bool

    def publish(self, topic: str, payload: bytes, qos: int, **properties) -> None: ...

    def subscribe(self, topic_filter: str, qos: int,
                  callback: Callable[[str, bytes], None]) -> Callable[[], None]: ...

    def add_status_listener(self, callback: Callable[[bool], None]) -> Callable[[], None]: ...


class MemoryIoTCore:
    """The in-memory twin of the IoT Core bridge: keeps what was published, delivers on demand.

    ``published`` holds ``(MqttMessage, qos)``; ``deliver(topic, payload)`` plays a message from
    the cloud to the matching subscriptions; ``set_connected(flag)`` tells the status listeners;
    ``full = True`` refuses publishes as a full spool would; ``keep = False`` keeps nothing
    (a no-op bridge, for benchmarks).
    """

    def __init__(self, *, connected: bool = True, keep: bool = True) -> None:
        self.connected = connected
        self.keep = keep
        self.full = False
        self.published: list[tuple[MqttMessage, int]] = []
        self.count = 0
        self._subs: dict[int, tuple[str, Callable[[str, bytes], None]]] = {}
        self._listeners: dict[int, Callable[[bool], None]] = {}
        self._next = 0
        self._lock = threading.Lock()
        self.published_event = threading.Condition(self._lock)

    def publish(self, topic: str, payload: bytes, qos: int, *, retain: bool = False,
                user_properties: list[tuple[str, str]] | None = None,
                message_expiry_interval_sec: int | None = None, correlation_data: bytes | None = None,
                response_topic: str | None = None, payload_format: str | None = None,
                content_type: str | None = None) -> None:
        message = MqttMessage(topic, payload, retain, list(user_properties or ()), message_expiry_interval_sec,
                              correlation_data, response_topic, payload_format, content_type)
        if self.full:
            raise RuntimeError("spool is full")
        with self._lock:
            self.count += 1
            if self.keep:
                self.published.append((message, qos))
            self.published_event.notify_all()

    def subscribe(self, topic_filter: str, qos: int, callback: Callable[[str, bytes], None]) -> Callable[[], None]:
        with self._lock:
            self._next += 1
            key = self._next
            self._subs[key] = (topic_filter, callback)
        return lambda: self._subs.pop(key, None)

    def subscriptions(self) -> list[str]:
        with self._lock:
            return [f for f, _ in self._subs.values()]

    def deliver(self, topic: str, payload: bytes) -> int:
        """Deliver to every matching subscription; the number of callbacks called."""
        with self._lock:
            targets = [cb for f, cb in self._subs.values() if topic_matches(f, topic)]
        for cb in targets:
            cb(topic, payload)
        return len(targets)

    def add_status_listener(self, callback: Callable[[bool], None]) -> Callable[[], None]:
        with self._lock:
            self._next += 1
            key = self._next
            self._listeners[key] = callback
        return lambda: self._listeners.pop(key, None)

    def set_connected(self, connected: bool) -> None:
        self.connected = connected
        with self._lock:
            listeners = list(self._listeners.values())
        for cb in listeners:
            cb(connected)


def _qos(value: str | None) -> int:
    if value is None:
        raise model.InvalidArgumentsError(message="QoS is required")
    if value not in (model.QOS.AT_MOST_ONCE, model.QOS.AT_LEAST_ONCE):
        raise model.InvalidArgumentsError(message=f"Invalid QoS value: {value}")
    return int(value)


def _topic(value: str | None) -> str:
    if value is None:
        raise model.InvalidArgumentsError(message="Topic is required")
    return value


def _to_model(topic: str, payload: bytes) -> model.IoTCoreMessage:
    return model.IoTCoreMessage(message=model.MQTTMessage(
        topic_name=topic, payload=payload, retain=False, payload_format=model.PayloadFormat.BYTES))


class MqttProxy:
    """The three IoT Core operations, over one bridge."""

    def __init__(self, bridge: IoTCoreBridge, acl: AccessControl) -> None:
        self.bridge = bridge
        self.acl = acl

    def operations(self) -> dict[str, Operation]:
        return {
            "aws.greengrass#PublishToIoTCore": Operation(self.publish),
            "aws.greengrass#SubscribeToIoTCore": Operation(self.subscribe, blocking=True),
            "aws.greengrass#SubscribeToIoTCoreConnectionStatus": Operation(self.connection_status),
        }

    def publish(self, call: Call) -> model.PublishToIoTCoreResponse:
        r: model.PublishToIoTCoreRequest = call.request
        topic = _topic(r.topic_name)
        call.authorize(topic, self.acl, NOT_AUTHORIZED)
        if r.payload is None:
            raise model.InvalidArgumentsError(message="Payload is required")
        qos = _qos(r.qos)
        try:
            self.bridge.publish(
                topic, r.payload, qos, retain=bool(r.retain),
                user_properties=[(p.key, p.value) for p in r.user_properties or ()] or None,
                message_expiry_interval_sec=r.message_expiry_interval_seconds,
                correlation_data=r.correlation_data, response_topic=r.response_topic,
                payload_format=r.payload_format, content_type=r.content_type)
        except model.GreengrassCoreIPCError:
            raise
        except Exception as exc:
            raise model.ServiceError(message=f"Publish to topic {topic} failed: {exc}") from exc
        return model.PublishToIoTCoreResponse()

    def subscribe(self, call: Call) -> model.SubscribeToIoTCoreResponse:
        r: model.SubscribeToIoTCoreRequest = call.request
        topic = _topic(r.topic_name)
        call.authorize(topic, self.acl, NOT_AUTHORIZED)
        qos = _qos(r.qos)
        stream = call.stream
        assert stream is not None
        try:
            unsubscribe = self.bridge.subscribe(topic, qos, lambda t, p: stream.send_event(_to_model(t, p)))
        except model.GreengrassCoreIPCError:
            raise
        except Exception as exc:
            raise model.ServiceError(message=f"Subscribe to topic {topic} failed with error {exc}") from exc
        stream.on_close(unsubscribe)
        return model.SubscribeToIoTCoreResponse()

    def connection_status(self, call: Call) -> model.SubscribeToIoTCoreConnectionStatusResponse:
        stream = call.stream
        assert stream is not None

        def tell(connected: bool) -> None:
            status = model.ConnectionStatus.CONNECTED if connected else model.ConnectionStatus.DISCONNECTED
            stream.send_event(model.IoTCoreConnectionStatusEvent(
                connection_status_event=model.ConnectionStatusEvent(status=status)))

        stream.on_close(self.bridge.add_status_listener(tell))
        tell(bool(self.bridge.connected))  # the current state first (held until the response is out)
        return model.SubscribeToIoTCoreConnectionStatusResponse()
