"""Messages out: the Publisher seam.

One method, as small as httpx's transport::

    class Publisher(Protocol):
        local: bool   # True when the target is not IoT Core (no per-connection limits)
        def publish(self, topic: str, payload: bytes, qos: int = 1) -> Future[None]: ...
        def close(self) -> None: ...

The future resolves when the message is acknowledged (PUBACK for QoS 1) and fails with
:class:`~gateway.errors.RetryableError` (try again), :class:`~gateway.errors.NotAuthorizedError`
(the broker refuses the topic: a policy to fix, the message is fine) or
:class:`~gateway.errors.UndeliverableError` (this message can never go).
``connected`` tells the forwarder whether claiming more work makes sense.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import NamedTuple, Protocol, runtime_checkable

from gateway.errors import RetryableError


@runtime_checkable
class Publisher(Protocol):
    local: bool

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> "Future[None]": ...

    def close(self) -> None: ...


class Message(NamedTuple):
    topic: str
    payload: bytes
    qos: int


class MemoryPublisher:
    """The in-memory twin: keeps every message, acknowledges at once.

    Set ``online = False`` to make publishes fail with :class:`RetryableError`, as a broker
    outage would; set ``hold = True`` to keep futures pending until :meth:`release`.
    """

    local = True

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.online = True
        self.hold = False
        self._held: list[tuple[Message, Future]] = []
        self._lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self.online

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> "Future[None]":
        fut: Future[None] = Future()
        msg = Message(topic, payload, qos)
        with self._lock:
            if not self.online:
                fut.set_exception(RetryableError("memory publisher is offline"))
            elif self.hold:
                self._held.append((msg, fut))
            else:
                self.messages.append(msg)
                fut.set_result(None)
        return fut

    def release(self) -> None:
        """Acknowledge every held message."""
        with self._lock:
            held, self._held = self._held, []
            for msg, fut in held:
                self.messages.append(msg)
                fut.set_result(None)

    def close(self) -> None:
        with self._lock:
            for _, fut in self._held:
                fut.set_exception(RetryableError("publisher closed"))
            self._held = []
