"""The cloud's receipt rule, emulated on the local broker: what makes ``delivery: receipt`` work
without an AWS account.

In the cloud, ``ReceiptRule`` of ``cloud/analytics.yaml`` is an IoT topic rule::

    SELECT batch, topic() AS topic FROM 'dt/meters/+/+/+' WHERE topic(5) = 'raw' OR topic(5) = 'scored'
    -> Republish to cmd/meters/${topic(4)}/receipt at QoS 1

Here one MQTT5 client (awscrt, mutual TLS, like every client of :mod:`emulator.broker`'s
mosquitto) plays it: it subscribes to ``dt/<app>/+/+/raw`` and ``dt/<app>/+/+/scored`` at QoS 1
and, for every message, publishes ``{"batch": <its batch>, "topic": <its topic>}`` to
``cmd/<app>/<thing = topic level 4>/receipt`` at QoS 1. As in the rules engine, a payload that
is not a JSON object, or has no ``batch``, gives a receipt without ``batch`` (SQL's Undefined is
left out of the output)::

    rule = ReceiptRule("localhost", broker.port, cert, key, ca).start()
    rule.wait_subscribed(10)
    rule.pause()    # receipts are held: they come late, or (closed while paused) never
    rule.resume()   # the held receipts go out, in order
    rule.received, rule.republished, rule.held, rule.failed
    rule.close()

It is deliberately small: it hard-codes this one rule rather than running its SQL. A later
rules engine that evaluates the rule SQL of ``cloud/*.yaml`` replaces it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from concurrent.futures import Future

from awscrt import mqtt5
from awsiot import mqtt5_client_builder

__all__ = ["ReceiptRule", "receipt_for"]

log = logging.getLogger(__name__)


def receipt_for(topic: str, payload: bytes) -> tuple[str, bytes] | None:
    """The rule's output for one message: ``(receipt topic, receipt payload)``, or None when
    the rule's ``WHERE`` does not take the topic (it is not ``dt/<app>/<site>/<thing>/raw|scored``)."""
    levels = topic.split("/")
    if len(levels) != 5 or levels[0] != "dt" or levels[4] not in ("raw", "scored"):
        return None
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        body = None
    out: dict = {}
    if isinstance(body, dict) and "batch" in body:
        out["batch"] = body["batch"]
    out["topic"] = topic
    return f"cmd/{levels[1]}/{levels[3]}/receipt", json.dumps(out, separators=(",", ":")).encode()


class ReceiptRule:
    """The receipt rule as a client of the local broker (see the module doc).

    Counters: ``received`` (messages the rule took), ``republished`` (receipts the broker
    acknowledged), ``held`` (receipts waiting while paused), ``failed`` (receipts the broker did
    not take; the rules engine does not retry either).
    """

    def __init__(self, endpoint: str, port: int, cert: str | os.PathLike, key: str | os.PathLike,
                 ca: str | os.PathLike | None, *, client_id: str = "receipt-rule", app: str = "meters"):
        self.filters = [f"dt/{app}/+/+/raw", f"dt/{app}/+/+/scored"]
        self._cond = threading.Condition()
        self._paused = False
        self._held: list[tuple[str, bytes]] = []
        self._connected = False
        self._subscribed = False
        self.received = 0
        self.republished = 0
        self.failed = 0
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
    def start(self) -> "ReceiptRule":
        self._client.start()
        return self

    def close(self) -> None:
        """Stop; receipts still held are dropped (a rule that never ran for them)."""
        self._client.stop()

    def __enter__(self) -> "ReceiptRule":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_subscribed(self, timeout: float | None = None) -> bool:
        """Wait until connected and both subscriptions are granted (again after a reconnect)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._connected and self._subscribed, timeout)

    # -- pausing
    @property
    def held(self) -> int:
        with self._cond:
            return len(self._held)

    def pause(self) -> None:
        """Hold every receipt from now on (the messages are still taken and counted)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        """Send the held receipts, in order, and every later one at once."""
        with self._cond:
            self._paused = False
            held, self._held = self._held, []
            self._cond.notify_all()
        for receipt in held:
            self._republish(*receipt)

    def wait_for(self, predicate, timeout: float | None = None) -> bool:
        """Wait until ``predicate(self)`` holds (checked at every change of a counter)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    # -- the rule
    def _on_message(self, data: mqtt5.PublishReceivedData) -> None:
        p = data.publish_packet
        receipt = receipt_for(p.topic, bytes(p.payload or b""))
        if receipt is None:
            return
        with self._cond:
            self.received += 1
            if self._paused:
                self._held.append(receipt)
                self._cond.notify_all()
                return
            self._cond.notify_all()
        self._republish(*receipt)

    def _republish(self, topic: str, payload: bytes) -> None:
        try:
            fut = self._client.publish(mqtt5.PublishPacket(topic=topic, payload=payload, qos=mqtt5.QoS.AT_LEAST_ONCE))
        except Exception as exc:  # the client is stopped
            self._count(False, topic, exc)
            return
        fut.add_done_callback(lambda f: self._published(f, topic))

    def _published(self, fut: Future, topic: str) -> None:
        exc = fut.exception()
        code = None if exc is not None else getattr(fut.result().puback, "reason_code", None)
        ok = exc is None and code in (None, mqtt5.PubackReasonCode.SUCCESS,
                                      mqtt5.PubackReasonCode.NO_MATCHING_SUBSCRIBERS)
        self._count(ok, topic, exc if exc is not None else code)

    def _count(self, ok: bool, topic: str, why) -> None:
        with self._cond:
            if ok:
                self.republished += 1
            else:
                self.failed += 1
            self._cond.notify_all()
        if not ok:
            log.warning("receipt rule: the receipt to %s was not taken: %s", topic, why)

    # -- connection
    def _set(self, *, connected: bool | None = None, subscribed: bool | None = None) -> None:
        with self._cond:
            if connected is not None:
                self._connected = connected
                if not connected:
                    self._subscribed = False
            if subscribed is not None:
                self._subscribed = subscribed
            self._cond.notify_all()

    def _on_connected(self, data) -> None:
        self._set(connected=True, subscribed=False)  # a clean session: subscribe at every connection
        packet = mqtt5.SubscribePacket([mqtt5.Subscription(f, mqtt5.QoS.AT_LEAST_ONCE) for f in self.filters])
        self._client.subscribe(packet).add_done_callback(self._on_suback)

    def _on_suback(self, fut: Future) -> None:
        exc = fut.exception()
        if exc is None and all(code < 128 for code in fut.result().reason_codes):
            self._set(subscribed=True)
        else:
            log.error("receipt rule: cannot subscribe to %s: %s", self.filters,
                      exc if exc is not None else fut.result().reason_codes)
