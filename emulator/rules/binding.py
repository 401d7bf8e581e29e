"""The rules engine on the local broker: one MQTT5 client playing IoT Core's rules engine.

:class:`BrokerBinding` connects (awscrt MQTT5, mutual TLS, like every client of
:mod:`emulator.broker`'s mosquitto), subscribes at QoS 1 to the union of the enabled rules'
``FROM`` filters (:func:`subscription_filters`: each message must arrive once) plus the Basic
Ingest topics ``$aws/rules/#``, hands every message to
:meth:`RulesEngine.handle <emulator.rules.engine.RulesEngine.handle>`, and publishes the
republish actions' messages through the same connection::

    engine = RulesEngine([ANALYTICS], Actions(firehose=firehose, s3=root / "s3", logs=root / "logs"))
    with BrokerBinding(engine, "localhost", broker.port, cert, key, ca) as rules:
        rules.wait_subscribed(10)
        ...
        rules.received, rules.republished, rules.failed

The binding sets the engine's ``Actions.republish`` when it is None. A republish is handed to the
client and counted when the broker acknowledges it (``republished``) or refuses it (``failed``,
logged); it is not waited for, since the engine runs on the client's own thread.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future
from typing import Callable

from awscrt import mqtt5
from awsiot import mqtt5_client_builder

from emulator.rules.engine import RulesEngine

__all__ = ["BrokerBinding", "subscription_filters"]

log = logging.getLogger(__name__)

_QOS = {0: mqtt5.QoS.AT_MOST_ONCE, 1: mqtt5.QoS.AT_LEAST_ONCE}


def _covers(a: str, b: str) -> bool:
    """Every topic filter ``b`` matches, ``a`` matches too."""
    fa, fb = a.split("/"), b.split("/")
    for i, level in enumerate(fa):
        if level == "#":
            return True
        if i >= len(fb) or fb[i] == "#" or (level != "+" and (fb[i] == "+" or level != fb[i])):
            return False
    return len(fa) == len(fb)


def _overlap(a: str, b: str) -> bool:
    """Some topic matches both filters."""
    fa, fb = a.split("/"), b.split("/")
    for x, y in zip(fa, fb):
        if x == "#" or y == "#":
            return True
        if x != "+" and y != "+" and x != y:
            return False
    return len(fa) == len(fb)


def subscription_filters(filters: list[str]) -> list[str]:
    """What to subscribe to so that each message arrives once: mosquitto delivers a message once
    per matching subscription, so filters that another covers are dropped (``dt/meters/+/+/raw``
    under ``dt/meters/+/+/+``), and filters that still overlap are replaced by ``#``."""
    kept = [f for i, f in enumerate(filters)
            if not any(_covers(g, f) and (g != f or j < i) for j, g in enumerate(filters) if j != i)]
    if any(_overlap(a, b) for i, a in enumerate(kept) for b in kept[i + 1:]):
        return ["#"]
    return kept


class BrokerBinding:
    """A :class:`RulesEngine` as a client of the local broker (see the module doc)."""

    def __init__(self, engine: RulesEngine, endpoint: str, port: int, cert: str | os.PathLike,
                 key: str | os.PathLike, ca: str | os.PathLike | None, *, client_id: str = "rules-engine",
                 basic_ingest: bool = True, on_error: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self.filters = subscription_filters(engine.filters()) + (["$aws/rules/#"] if basic_ingest else [])
        if engine.actions.republish is None:
            engine.actions.republish = self.publish
        self.cond = threading.Condition()
        self._connected = False
        self._subscribed = False
        self.received = 0      # messages handed to the engine
        self.republished = 0   # publishes the broker acknowledged
        self.failed = 0        # publishes the broker did not take
        self.errors = 0        # messages the engine raised on (logged)
        self._on_error = on_error
        self._client = mqtt5_client_builder.mtls_from_path(
            endpoint=endpoint, port=port, cert_filepath=os.fspath(cert), pri_key_filepath=os.fspath(key),
            ca_filepath=os.fspath(ca) if ca is not None else None, client_id=client_id,
            extended_validation_and_flow_control_options=mqtt5.ExtendedValidationAndFlowControlOptions.NONE,
            session_behavior=mqtt5.ClientSessionBehaviorType.CLEAN,
            min_reconnect_delay_ms=50, max_reconnect_delay_ms=500,
            on_publish_received=self._on_message,
            on_lifecycle_connection_success=self._on_connected,
            on_lifecycle_disconnection=lambda data: self._set(connected=False),
            on_lifecycle_connection_failure=lambda data: self._set(connected=False),
        )

    # -- lifecycle
    def start(self) -> "BrokerBinding":
        self._client.start()
        return self

    def close(self) -> None:
        self._client.stop()

    def __enter__(self) -> "BrokerBinding":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_subscribed(self, timeout: float | None = None) -> bool:
        """Wait until connected and every subscription is granted (again after a reconnect)."""
        with self.cond:
            return self.cond.wait_for(lambda: self._connected and self._subscribed, timeout)

    def wait_for(self, predicate: Callable[["BrokerBinding"], bool], timeout: float | None = None) -> bool:
        """Wait until ``predicate(self)`` holds (checked at every change of a counter)."""
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self), timeout)

    # -- messages in
    def _on_message(self, data: mqtt5.PublishReceivedData) -> None:
        p = data.publish_packet
        try:
            self.engine.handle(p.topic, bytes(p.payload or b""), None)
        except Exception as exc:  # a bug must not stop the client's thread; it is counted and logged
            log.exception("rules engine: the message on %s was not handled", p.topic)
            with self.cond:
                self.errors += 1
                self.cond.notify_all()
            if self._on_error is not None:
                self._on_error(exc)
        with self.cond:
            self.received += 1
            self.cond.notify_all()

    # -- messages out
    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        """Publish (a republish action's message); the outcome is counted when the broker answers."""
        packet = mqtt5.PublishPacket(topic=topic, payload=payload, qos=_QOS.get(int(qos), mqtt5.QoS.AT_LEAST_ONCE))
        try:
            fut = self._client.publish(packet)
        except Exception as exc:  # the client is stopped
            self._count(False, topic, exc)
            raise
        fut.add_done_callback(lambda f: self._published(f, topic))

    def _published(self, fut: Future, topic: str) -> None:
        exc = fut.exception()
        code = None if exc is not None else getattr(fut.result().puback, "reason_code", None)
        ok = exc is None and code in (None, mqtt5.PubackReasonCode.SUCCESS,
                                      mqtt5.PubackReasonCode.NO_MATCHING_SUBSCRIBERS)
        self._count(ok, topic, exc if exc is not None else code)

    def _count(self, ok: bool, topic: str, why) -> None:
        with self.cond:
            if ok:
                self.republished += 1
            else:
                self.failed += 1
            self.cond.notify_all()
        if not ok:
            log.warning("rules engine: the republish to %s was not taken: %s", topic, why)

    # -- connection
    def _set(self, *, connected: bool | None = None, subscribed: bool | None = None) -> None:
        with self.cond:
            if connected is not None:
                self._connected = connected
                if not connected:
                    self._subscribed = False
            if subscribed is not None:
                self._subscribed = subscribed
            self.cond.notify_all()

    def _on_connected(self, data) -> None:
        self._set(connected=True, subscribed=False)  # a clean session: subscribe at every connection
        packet = mqtt5.SubscribePacket([mqtt5.Subscription(f, mqtt5.QoS.AT_LEAST_ONCE) for f in self.filters])
        self._client.subscribe(packet).add_done_callback(self._on_suback)

    def _on_suback(self, fut: Future) -> None:
        exc = fut.exception()
        if exc is None and all(code < 128 for code in fut.result().reason_codes):
            self._set(subscribed=True)
        else:
            log.error("rules engine: cannot subscribe to %s: %s", self.filters,
                      exc if exc is not None else fut.result().reason_codes)
