"""The cloud's receipt rule on the local broker: what makes ``delivery: receipt`` work without
an AWS account.

In the cloud, ``ReceiptRule`` of ``cloud/analytics.yaml`` is an IoT topic rule::

    SELECT batch, topic() AS topic FROM 'dt/meters/+/+/+' WHERE topic(5) = 'raw' OR topic(5) = 'scored'
    -> Republish to cmd/meters/${topic(4)}/receipt at QoS 1

Here the rules engine (:mod:`emulator.rules`) runs that rule, read from the template, as one
MQTT5 client of :mod:`emulator.broker`'s mosquitto (:class:`~emulator.rules.binding.BrokerBinding`).
This module is a thin wrapper over it that can hold receipts back, which the tests of late
receipts need. As in IoT Core, a payload that is not a JSON object, or has no ``batch``, gives a
receipt without ``batch`` (SQL's Undefined is left out of the output)::

    rule = ReceiptRule("localhost", broker.port, cert, key, ca).start()
    rule.wait_subscribed(10)
    rule.pause()    # receipts are held: they come late, or (closed while paused) never
    rule.resume()   # the held receipts go out, in order
    rule.received, rule.republished, rule.held, rule.failed
    rule.close()
"""

from __future__ import annotations

import functools
import os
from typing import Callable

from emulator.rules.engine import ANALYTICS, Actions, RulesEngine
from emulator.rules.sql import Context

__all__ = ["ReceiptRule", "receipt_for"]

RULE = "ReceiptRule"


@functools.lru_cache(maxsize=1)
def _rule():
    return RulesEngine([ANALYTICS], rules=(RULE,)).rule(RULE)


def receipt_for(topic: str, payload: bytes) -> tuple[str, bytes] | None:
    """The rule's output for one message: ``(receipt topic, receipt payload)``, or None when the
    rule's ``FROM`` or ``WHERE`` does not take the topic."""
    rule = _rule()
    if not rule.statement.matches(topic):
        return None
    ctx = Context.of(topic, payload, None, 0)
    output = rule.statement.evaluate(ctx)
    if output is None:
        return None
    republish = rule.actions[0]
    return republish.topic(ctx), output.payload()


class ReceiptRule:
    """The receipt rule as a client of the local broker (see the module doc).

    Counters: ``received`` (messages the rule took: receipts made), ``republished`` (receipts the
    broker acknowledged), ``held`` (receipts waiting while paused), ``failed`` (receipts the
    broker did not take; the rules engine does not retry either).
    """

    def __init__(self, endpoint: str, port: int, cert: str | os.PathLike, key: str | os.PathLike,
                 ca: str | os.PathLike | None, *, client_id: str = "receipt-rule", app: str = "meters"):
        if app != "meters":
            raise ValueError(f"app {app!r}: the receipt rule of {ANALYTICS.name} is for app 'meters'")
        from emulator.rules.binding import BrokerBinding

        self.engine = RulesEngine([ANALYTICS], Actions(republish=self._receipt), rules=(RULE,))
        self._binding = BrokerBinding(self.engine, endpoint, port, cert, key, ca, client_id=client_id,
                                      basic_ingest=False)
        self.filters = self._binding.filters
        self._cond = self._binding.cond
        self._paused = False
        self._held: list[tuple[str, bytes, int]] = []
        self.received = 0

    # -- lifecycle
    def start(self) -> "ReceiptRule":
        self._binding.start()
        return self

    def close(self) -> None:
        """Stop; receipts still held are dropped (a rule that never ran for them)."""
        self._binding.close()

    def __enter__(self) -> "ReceiptRule":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_subscribed(self, timeout: float | None = None) -> bool:
        """Wait until connected and subscribed (again after a reconnect)."""
        return self._binding.wait_subscribed(timeout)

    # -- counters
    @property
    def republished(self) -> int:
        return self._binding.republished

    @property
    def failed(self) -> int:
        return self._binding.failed

    @property
    def held(self) -> int:
        with self._cond:
            return len(self._held)

    def wait_for(self, predicate: Callable[["ReceiptRule"], bool], timeout: float | None = None) -> bool:
        """Wait until ``predicate(self)`` holds (checked at every change of a counter)."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    # -- pausing
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
            self._send(*receipt)

    # -- the rule's republish action
    def _receipt(self, topic: str, payload: bytes, qos: int) -> None:
        with self._cond:
            self.received += 1
            self._cond.notify_all()
            if self._paused:
                self._held.append((topic, payload, qos))
                return
        self._send(topic, payload, qos)

    def _send(self, topic: str, payload: bytes, qos: int) -> None:
        try:
            self._binding.publish(topic, payload, qos)
        except Exception:  # the client is stopped: counted as failed by the binding
            pass
