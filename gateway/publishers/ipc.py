"""The IPC publisher: messages to IoT Core through the Greengrass nucleus (PublishToIoTCore).

Inside a Greengrass component the nucleus already holds the thing's MQTT connection; this
publisher hands each message to it over IPC with awsiotsdk's ``GreengrassCoreIPCClientV2``::

    pub = IpcPublisher(None, "gw-1", delivery="receipt").start()   # creates the client itself
    fut = pub.publish("dt/meters/15/gw-1/raw", payload)             # Future[None]

The client may be injected (tests pass an autospec'd one); one is created (and later closed)
only when none is given. Only the client's public methods are used.

What "delivered" means: the two delivery modes
-----------------------------------------------
A successful PublishToIoTCore says only that the nucleus *queued* the message in its spooler;
the nucleus sends it to IoT Core later, from memory (lost on a nucleus restart) or, with the
Disk Spooler, from disk.

* ``handoff`` (default): the future resolves when the nucleus accepts the message. From then
  on the nucleus's spooler is responsible for it: configure the Disk Spooler
  (``aws.greengrass.DiskSpooler``) and ``mqtt.maxPublishRetry: -1`` on the nucleus, or a
  nucleus restart or a message failing 100 times loses what the buffer already let go.
* ``receipt``: the future resolves only when a receipt for the message's batch id comes back
  on ``receipt_topic`` (``cmd/meters/<thing>/receipt``; a cloud rule republishes the ``batch``
  of every raw and scored message there, ``{"batch": "<16 hex>", "topic": "<topic>"}``). The
  batch id is the ``"batch"`` field at the start of every payload (:mod:`gateway.messages`);
  it identifies the readings, so a receipt resolves every pending message carrying it (a
  message without one, such as the health report, is done on handoff: receipts exist for
  readings only). A
  message without a receipt ``receipt_timeout_s`` after the nucleus accepted it is published
  again, the very same bytes (``resends`` counts them; the cloud drops duplicates by key);
  after ``resend_limit`` resends the future fails with RetryableError and the forwarder sends
  the claim again after its backoff. While IoT Core is disconnected the receipt clocks stand
  still (an outage is not a timeout), as the forwarder's do.

**The receipt window and the forwarder's claim timeout.** A future in receipt mode may stay
pending for :attr:`IpcPublisher.delivery_window_s` = ``receipt_timeout_s`` x
(``resend_limit`` + 1) (+ one tick) of connected time. The forwarder adds its publisher's
``delivery_window_s`` to its per-claim timeout (:mod:`gateway.forwarder`), so its timeout can
never fire before this publisher has had every resend; no config rule ties ``ack_timeout_s`` to
``receipt_timeout_s``. (``ack_timeout_s`` stays the margin for the nucleus's own answer.)

Errors (:func:`map_ipc_error`)
------------------------------
* ``ServiceError`` "Publish to topic <t> failed: Message spool is full. Message could not be
  added." (the nucleus's ``Spool.queueCapacityCheck``): backpressure, RetryableError; the
  forwarder backs off and sends again, nothing is lost. "Message is larger than the size of
  message spool." is RetryableError too, logged at ERROR: ``mqtt.spooler.maxSizeInBytes`` is
  below 128 KB, a configuration to fix. The nucleus's own checks of the request
  (``maxMessageSizeInBytes``, slashes, topic size, wildcards) are UndeliverableError; any other
  ServiceError is RetryableError.
* ``UnauthorizedError``: NotAuthorizedError (the component's ``accessControl`` for
  ``aws.greengrass.ipc.mqttproxy`` does not allow the topic). ``InvalidArgumentsError`` and a
  request the SDK cannot serialize: UndeliverableError.
* The IPC socket closing (``ConnectionClosedError``, ``StreamClosedError``, ``EventStreamError``,
  awscrt errors, ``OSError``): RetryableError; pending receipts fail too. A client this
  publisher created is replaced by a new connection (every ``reconnect_s``); an injected one
  stays down (``connected`` is False) until its owner replaces the publisher.

``connected``
-------------
True while the IPC connection is up, IoT Core is connected according to
``SubscribeToIoTCoreConnectionStatus`` and, in receipt mode, the receipt subscription stands.
The subscription's response (``SubscribeToIoTCoreConnectionStatusResponse``) is empty: it says
nothing of the state, so before the first event (the nucleus sends the current status right
after the response) ``connected`` is False. Should no event come within ``status_grace_s``, or a
nucleus refuse the operation, the status is taken as connected (the nucleus spools anyway) and a
WARNING says so. After each reconnect to IoT Core the receipt subscription is made anew (then
the old stream is closed), so a subscription lost by the nucleus does not silently stop receipts.

``local`` is False: the nucleus applies IoT Core's limits (128 KB per message, which the
forwarder already keeps). :meth:`IpcPublisher.close` closes the streams it opened, fails what is
pending with RetryableError, and closes the client only if it created it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import CancelledError, Future, InvalidStateError
from typing import Any, Callable

from awscrt.exceptions import AwsCrtError
from awsiot import eventstreamrpc as rpc
from awsiot.greengrasscoreipc import model

from gateway.errors import ConfigError, NotAuthorizedError, PublishError, RetryableError, UndeliverableError
from gateway.topics import check_message

__all__ = ["DELIVERY_MODES", "IpcPublisher", "map_ipc_error", "receipt_topic"]

log = logging.getLogger(__name__)

DELIVERY_MODES = ("handoff", "receipt")

#: The nucleus's words inside its ServiceError "Publish to topic <t> failed: <reason>"
#: (aws-greengrass-nucleus: mqttclient/spool/Spool.java, mqttclient/MqttClient.java).
SPOOL_FULL = "Message spool is full"
SPOOL_TOO_SMALL = "Message is larger than the size of message spool"
UNDELIVERABLE_REASONS = (
    "exceeds the configured limit",  # the nucleus's mqtt.maxMessageSizeInBytes
    "forward slashes",
    "topic size of request",
    "wildcard",
)
#: What the SDK raises when the IPC socket (or the stream on it) is gone.
CONNECTION_ERRORS = (rpc.ConnectionClosedError, rpc.StreamClosedError, rpc.EventStreamError, AwsCrtError,
                     OSError, CancelledError)
#: awscrt's binding raises a bare RuntimeError, "4104 (AWS_ERROR_EVENT_STREAM_RPC_CONNECTION_CLOSED): ...",
#: for an operation started on a connection that has just closed (before the SDK marks it closed).
CONNECTION_CLOSED_CRT = "AWS_ERROR_EVENT_STREAM_RPC_CONNECTION_CLOSED"


def connection_gone(exc: BaseException) -> bool:
    """Whether ``exc`` says the IPC connection to the nucleus is gone (not a refusal by the nucleus)."""
    return isinstance(exc, CONNECTION_ERRORS) or (isinstance(exc, RuntimeError) and CONNECTION_CLOSED_CRT in str(exc))

_QOS = {0: model.QOS.AT_MOST_ONCE, 1: model.QOS.AT_LEAST_ONCE}
_BATCH_HEAD = b'{"batch":"'


def receipt_topic(thing: str, app: str = "meters") -> str:
    """Where the cloud rule republishes the batch ids it received for ``thing``."""
    return f"cmd/{app}/{thing}/receipt"


def _reason(exc: BaseException) -> str:
    """An IPC error's message (the SDK's error shapes carry it in ``.message``, not in args)."""
    text = getattr(exc, "message", None) or str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def map_ipc_error(exc: BaseException, topic: str = "") -> PublishError:
    """The gateway error for an exception out of the IPC client (see the module doc)."""
    if isinstance(exc, PublishError):
        return exc
    where = f" to {topic!r}" if topic else ""
    why = _reason(exc)
    if isinstance(exc, model.UnauthorizedError):
        err: PublishError = NotAuthorizedError(
            f"the nucleus refused PublishToIoTCore{where} ({why}): the component's accessControl for "
            f"aws.greengrass.ipc.mqttproxy must allow aws.greengrass#PublishToIoTCore on it")
    elif isinstance(exc, (model.InvalidArgumentsError, rpc.SerializeError, TypeError, ValueError)):
        err = UndeliverableError(f"the nucleus refused the publish{where}: {why}")
    elif isinstance(exc, model.ServiceError):
        text = exc.message or ""
        if SPOOL_FULL in text:
            err = RetryableError(f"the nucleus's spool is full (backpressure){where}: {text}")
        elif SPOOL_TOO_SMALL in text:
            err = RetryableError(f"the nucleus's spool is smaller than one message{where}: {text}; "
                                 "raise mqtt.spooler.maxSizeInBytes on aws.greengrass.Nucleus above 131072")
        elif any(reason in text for reason in UNDELIVERABLE_REASONS):
            err = UndeliverableError(f"the nucleus refused the publish{where}: {text}")
        else:
            err = RetryableError(f"publish{where} failed in the nucleus: {why}")
    elif connection_gone(exc):
        err = RetryableError(f"publish{where} failed: the IPC connection to the nucleus is gone ({why})")
    else:
        err = RetryableError(f"publish{where} failed: {why}")
    err.__cause__ = exc
    return err


def batch_of(payload: bytes) -> str | None:
    """The ``batch`` id at the start of a gateway message (None if it has none)."""
    if payload[:10] == _BATCH_HEAD and payload[26:27] == b'"':
        try:
            return payload[10:26].decode("ascii")
        except UnicodeDecodeError:
            return None
    try:
        batch = json.loads(payload).get("batch")
    except (ValueError, AttributeError):
        return None
    return batch if isinstance(batch, str) and batch else None


def _settle(fut: Future, exc: BaseException | None = None) -> bool:
    """Resolve ``fut`` unless something got there first; True if this call did."""
    try:
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)
    except InvalidStateError:
        return False
    return True


def _default_connect() -> Any:
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

    return GreengrassCoreIPCClientV2()


class _Pending:
    """A message in receipt mode: its bytes, its future, and its receipt clock."""

    __slots__ = ("topic", "payload", "qos", "batch", "future", "sends", "accepted", "deadline")

    def __init__(self, topic: str, payload: bytes, qos: int, batch: str, future: Future):
        self.topic, self.payload, self.qos, self.batch, self.future = topic, payload, qos, batch, future
        self.sends = 0  # PublishToIoTCore calls made for it
        self.accepted = False  # the nucleus accepted a copy: the receipt clock runs
        self.deadline = 0.0


class IpcPublisher:
    """Publishes through the nucleus over IPC (see the module doc).

    Args:
        client: a ``GreengrassCoreIPCClientV2`` (or a spec'd mock); None: ``connect()`` makes
            one at :meth:`start`, and this publisher owns (reconnects, closes) it.
        thing: the thing name (for the default receipt topic and messages).
        delivery: ``handoff`` or ``receipt``.
        receipt_topic: where receipts arrive; default ``cmd/meters/<thing>/receipt``.
        receipt_timeout_s: no receipt this long after the nucleus accepted a message: resend it.
        resend_limit: resends of one message before its future fails with RetryableError.
        clock: monotonic seconds (tests inject one).
        connect: makes a client when none is given (default: ``GreengrassCoreIPCClientV2()``).
        status_grace_s: how long to wait for the first connection status event.
        resubscribe_s, reconnect_s: the pace of retrying a failed subscription, a lost connection.
        poll_s: the keeper thread's longest sleep between two looks at the receipt clocks.
    """

    local = False

    def __init__(self, client: Any, thing: str, *, delivery: str = "handoff", receipt_topic: str | None = None,
                 receipt_timeout_s: float = 60.0, resend_limit: int = 3,
                 clock: Callable[[], float] = time.monotonic, connect: Callable[[], Any] | None = None,
                 status_grace_s: float = 10.0, resubscribe_s: float = 30.0, reconnect_s: float = 5.0,
                 poll_s: float = 0.5):
        if delivery not in DELIVERY_MODES:
            raise ValueError(f"delivery {delivery!r} is not one of {', '.join(DELIVERY_MODES)}")
        if not receipt_timeout_s > 0 or resend_limit < 0:
            raise ValueError("receipt_timeout_s must be > 0 and resend_limit >= 0")
        self.thing = thing
        self.delivery = delivery
        self.receipt_topic = receipt_topic or f"cmd/meters/{thing}/receipt"
        self.receipt_timeout_s = receipt_timeout_s
        self.resend_limit = resend_limit
        self.clock = clock
        self.status_grace_s = status_grace_s
        self.resubscribe_s = resubscribe_s
        self.reconnect_s = reconnect_s
        self.poll_s = poll_s
        self._client = client
        self._owned = client is None
        self._connect = connect or _default_connect
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._thread: threading.Thread | None = None
        self._ipc_up = client is not None
        self._next_connect = 0.0
        # IoT Core's connection, as SubscribeToIoTCoreConnectionStatus reports it
        self._status: bool | None = None  # None: no event yet
        self._status_since: float | None = None  # when the subscription was answered
        self._status_assumed = False  # no status to be had: taken as connected
        self._status_op: Any = None
        self._status_gen = 0
        self._next_status = 0.0
        # the receipt subscription (receipt mode)
        self._receipt_op: Any = None
        self._receipt_gen = 0
        self._next_receipt = 0.0
        self._resubscribe = False
        self._pending: dict[str, list[_Pending]] = {}
        self._warned: set[str] = set()
        self.accepted = 0  # PublishToIoTCore calls the nucleus accepted (resends included)
        self.resends = 0  # receipt mode: messages published again for want of a receipt
        self.receipts = 0  # receipt mode: messages resolved by a receipt
        self.spool_full = 0  # publishes the nucleus refused with a full spool

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "IpcPublisher":
        """Connect (if this publisher owns the client), subscribe, and start the keeper thread.

        Raises ConfigError when there is no nucleus to connect to (not inside a component)."""
        if self._client is None:
            self._open_client(first=True)
        self._maintain()
        self._thread = threading.Thread(target=self._keep, name="ipc-publisher", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Close the streams this publisher opened; fail what is pending; close an owned client."""
        with self._wake:
            if self._closed:
                return
            self._closed = True
            ops = [op for op in (self._status_op, self._receipt_op) if op is not None]
            self._status_op = self._receipt_op = None
            pending = [e for entries in self._pending.values() for e in entries]
            self._pending.clear()
            self._wake.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for op in ops:
            self._close_op(op)
        for entry in pending:
            _settle(entry.future, RetryableError("publisher closed"))
        if self._owned and self._client is not None:
            self._close_client(self._client)

    def __enter__(self) -> "IpcPublisher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._connected_locked()

    @property
    def delivery_window_s(self) -> float:
        """The longest a future stays pending, in connected time (0 in handoff mode): the forwarder
        adds it to its per-claim timeout."""
        if self.delivery != "receipt":
            return 0.0
        return self.receipt_timeout_s * (self.resend_limit + 1) + self.poll_s

    def _connected_locked(self) -> bool:
        if self._closed or not self._ipc_up:
            return False
        if self.delivery == "receipt" and self._receipt_op is None:
            return False
        if self._status is not None:
            return self._status
        if self._status_assumed:
            return True
        if self._status_since is not None and self.clock() - self._status_since >= self.status_grace_s:
            self._status_assumed = True
            self._warn_once("status", logging.WARNING, "ipc: no IoT Core connection status within %g s of "
                            "subscribing; taking IoT Core as connected", self.status_grace_s)
            return True
        return False

    # ------------------------------------------------------------------ publishing

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> "Future[None]":
        """Hand one message to the nucleus; the future settles as the module doc says. Never raises."""
        fut: Future[None] = Future()
        problem = check_message(topic, payload, qos)
        if problem is not None:
            fut.set_exception(UndeliverableError(problem))
            return fut
        payload = bytes(payload)
        # receipt delivery for messages with a batch id (readings); the rest (health) on handoff
        batch = (batch_of(payload) or "") if self.delivery == "receipt" else ""
        entry = _Pending(topic, payload, qos, batch, fut)
        with self._lock:
            if self._closed:
                fut.set_exception(RetryableError("publisher closed"))
                return fut
            if not self._ipc_up:
                fut.set_exception(RetryableError(f"publish to {topic!r} failed: the IPC connection to the "
                                                 "nucleus is closed"))
                return fut
            if batch:
                self._pending.setdefault(batch, []).append(entry)
            entry.sends = 1
            client = self._client
        self._send(client, entry)
        return fut

    def _send(self, client: Any, entry: _Pending) -> None:
        try:
            ipc_fut = client.publish_to_iot_core_async(topic_name=entry.topic, qos=_QOS[entry.qos],
                                                       payload=entry.payload)
        except Exception as exc:  # the connection is closed, or the request cannot be written
            self._failed(entry, exc)
            return
        ipc_fut.add_done_callback(lambda f: self._answered(entry, f))

    def _answered(self, entry: _Pending, ipc_fut: Future) -> None:
        try:
            exc = ipc_fut.exception()
        except CancelledError as cancelled:
            exc = cancelled
        if exc is not None:
            self._failed(entry, exc)
            return
        with self._wake:
            self.accepted += 1
            self._warned.discard("spool")
            if entry.batch:
                if not entry.future.done() and not entry.accepted:
                    entry.accepted = True
                    entry.deadline = self.clock() + self.receipt_timeout_s
                    self._wake.notify_all()
                return
        _settle(entry.future)

    def _failed(self, entry: _Pending, exc: BaseException) -> None:
        err = map_ipc_error(exc, entry.topic)
        if isinstance(exc, rpc.ConnectionClosedError) or (isinstance(exc, RuntimeError) and connection_gone(exc)):
            self._lost(exc)
        if isinstance(err, RetryableError) and isinstance(exc, model.ServiceError):
            self._note_spool(exc)
        with self._lock:
            if entry.batch and entry.sends > 1 and isinstance(err, RetryableError) \
                    and not entry.future.done():
                # a resend refused for now (a full spool): the next timeout tries again
                entry.deadline = self.clock() + self.receipt_timeout_s
                return
            self._forget(entry)
        _settle(entry.future, err)

    def _note_spool(self, exc: model.ServiceError) -> None:
        text = exc.message or ""
        if SPOOL_FULL in text:
            self.spool_full += 1
            self._warn_once("spool", logging.WARNING, "ipc: the nucleus's spool is full; the forwarder backs off "
                            "and sends again (%s)", text)
        elif SPOOL_TOO_SMALL in text:
            self._warn_once("spool", logging.ERROR, "ipc: %s: mqtt.spooler.maxSizeInBytes of aws.greengrass.Nucleus "
                            "must be above 131072 (one 128 KB message)", text)

    def _forget(self, entry: _Pending) -> None:
        """Drop ``entry`` from the pending receipts (under the lock)."""
        entries = self._pending.get(entry.batch)
        if entries is not None and entry in entries:
            entries.remove(entry)
            if not entries:
                del self._pending[entry.batch]

    # ------------------------------------------------------------------ receipts

    def _on_receipt(self, event: Any) -> None:
        message = getattr(event, "message", None)
        payload = getattr(message, "payload", None) or b""
        try:
            body = json.loads(payload)
            batch = body["batch"]
        except (ValueError, TypeError, KeyError) as exc:
            log.debug("ipc: ignored a receipt that is not {\"batch\": ...}: %r (%s)", payload[:200], exc)
            return
        with self._lock:
            entries = self._pending.pop(batch, []) if isinstance(batch, str) else []
            self.receipts += len(entries)
        for entry in entries:
            _settle(entry.future)

    def tick(self) -> None:
        """Look at the receipt clocks: resend what is due, fail what had every resend (the keeper
        thread calls it; tests with an injected clock may too)."""
        if self.delivery != "receipt":
            return
        resend: list[_Pending] = []
        failed: list[_Pending] = []
        with self._lock:
            now = self.clock()
            connected = self._connected_locked()
            client = self._client
            for entries in list(self._pending.values()):
                for entry in list(entries):
                    if not entry.accepted or entry.future.done():
                        continue
                    if not connected:  # an outage is not a timeout: the clock starts again
                        entry.deadline = now + self.receipt_timeout_s
                    elif now >= entry.deadline:
                        if entry.sends > self.resend_limit:
                            self._forget(entry)
                            failed.append(entry)
                        else:
                            entry.sends += 1
                            entry.deadline = now + self.receipt_timeout_s
                            self.resends += 1
                            resend.append(entry)
        for entry in failed:
            _settle(entry.future, RetryableError(
                f"no receipt for batch {entry.batch} ({entry.topic}) on {self.receipt_topic} after "
                f"{entry.sends} sends {self.receipt_timeout_s:g} s apart"))
        for entry in resend:
            log.debug("ipc: no receipt for batch %s within %g s: sending it again (send %d)", entry.batch,
                      self.receipt_timeout_s, entry.sends)
            self._send(client, entry)

    # ------------------------------------------------------------------ subscriptions and the connection

    def _on_status(self, event: Any) -> None:
        status = getattr(getattr(event, "connection_status_event", None), "status", None)
        if status not in (model.ConnectionStatus.CONNECTED, model.ConnectionStatus.DISCONNECTED):
            log.debug("ipc: ignored a connection status event %r", event)
            return
        up = status == model.ConnectionStatus.CONNECTED
        with self._wake:
            again = up and self._status is False
            self._status = up
            if again and self.delivery == "receipt":
                self._resubscribe = True  # a nucleus may lose subscriptions across a reconnect
            self._wake.notify_all()
        log.info("ipc: IoT Core %s", "connected" if up else "disconnected")

    def _status_closed(self, gen: int) -> None:
        with self._wake:
            if gen != self._status_gen or self._closed:
                return  # a stream replaced or closed on purpose
            self._status_op = None
            self._status = None
            self._status_since = None
            self._wake.notify_all()
        log.warning("ipc: the connection status stream closed; subscribing again")

    def _receipts_closed(self, gen: int) -> None:
        with self._wake:
            if gen != self._receipt_gen or self._closed:
                return
            self._receipt_op = None
            self._wake.notify_all()
        log.warning("ipc: the receipt stream on %s closed; subscribing again", self.receipt_topic)

    @staticmethod
    def _stream_error(error: Exception) -> bool:
        log.warning("ipc: stream error: %s", _reason(error))
        return True  # close the stream; its on_stream_closed subscribes again

    def _keep(self) -> None:
        """The keeper thread: subscriptions, the connection, the receipt clocks."""
        while True:
            with self._wake:
                if self._closed:
                    return
            try:
                self._maintain()
                self.tick()
            except Exception:  # never let the keeper die: it is what recovers the rest
                log.exception("ipc: keeper step failed")
            with self._wake:
                if self._closed:
                    return
                self._wake.wait(self.poll_s)

    def _maintain(self) -> None:
        """Reconnect an owned client, and (re)subscribe what needs it, each at its pace."""
        now = self.clock()
        with self._lock:
            if self._closed:
                return
            ipc_up, client = self._ipc_up, self._client
            status_due = (self._status_op is None and not self._status_assumed and now >= self._next_status)
            receipt_due = self.delivery == "receipt" and (
                (self._receipt_op is None and now >= self._next_receipt) or self._resubscribe)
        if not ipc_up:
            if self._owned and now >= self._next_connect:
                self._open_client()
            return
        if status_due:
            self._subscribe_status(client)
        if receipt_due:
            self._subscribe_receipts(client)

    def _subscribe_status(self, client: Any) -> None:
        with self._lock:
            self._status_gen += 1
            gen = self._status_gen
        try:
            _, op = client.subscribe_to_iot_core_connection_status(
                on_stream_event=self._on_status, on_stream_error=self._stream_error,
                on_stream_closed=lambda: self._status_closed(gen))
        except Exception as exc:
            if connection_gone(exc):
                self._lost(exc)
                return
            # a nucleus without the operation: follow the IPC connection only
            with self._lock:
                self._status_assumed = True
            self._warn_once("status", logging.WARNING, "ipc: cannot follow IoT Core's connection status (%s); "
                            "taking IoT Core as connected while the IPC connection is up", _reason(exc))
            return
        with self._lock:
            if self._closed:
                stale = op
            else:
                stale, self._status_op = None, op
                self._status_since = self.clock()
        if stale is not None:
            self._close_op(stale)

    def _subscribe_receipts(self, client: Any) -> None:
        with self._lock:
            self._receipt_gen += 1
            gen = self._receipt_gen
            self._resubscribe = False
        try:
            _, op = client.subscribe_to_iot_core(
                topic_name=self.receipt_topic, qos=model.QOS.AT_LEAST_ONCE, on_stream_event=self._on_receipt,
                on_stream_error=self._stream_error, on_stream_closed=lambda: self._receipts_closed(gen))
        except Exception as exc:
            if connection_gone(exc):
                self._lost(exc)
                return
            with self._lock:
                self._next_receipt = self.clock() + self.resubscribe_s
            if isinstance(exc, model.UnauthorizedError):
                self._warn_once("receipts", logging.ERROR, "ipc: the nucleus refused SubscribeToIoTCore on %s (%s): "
                                "receipt delivery needs the component's accessControl for aws.greengrass.ipc.mqttproxy "
                                "to allow aws.greengrass#SubscribeToIoTCore on it, and the core device's IoT policy "
                                "to allow iot:Subscribe and iot:Receive; retrying every %g s", self.receipt_topic,
                                _reason(exc), self.resubscribe_s)
            else:
                self._warn_once("receipts", logging.WARNING, "ipc: cannot subscribe to %s (%s); retrying every %g s",
                                self.receipt_topic, _reason(exc), self.resubscribe_s)
            return
        with self._lock:
            if self._closed:
                old = op
            else:
                old, self._receipt_op = self._receipt_op, op
            self._warned.discard("receipts")
        if old is not None:  # subscribed anew first, then the old stream goes
            self._close_op(old)

    def _lost(self, exc: BaseException) -> None:
        """The IPC connection is gone: fail what waits for a receipt, and reconnect if owned."""
        with self._wake:
            if not self._ipc_up or self._closed:
                return
            self._ipc_up = False
            self._status, self._status_since, self._status_op = None, None, None
            self._receipt_op = None
            self._status_gen += 1  # what the old streams say from now on is stale
            self._receipt_gen += 1
            self._next_connect = self.clock()
            pending = [e for entries in self._pending.values() for e in entries]
            self._pending.clear()
            self._wake.notify_all()
        log.warning("ipc: the IPC connection to the nucleus is gone (%s)%s", _reason(exc),
                    "; reconnecting" if self._owned else "")
        for entry in pending:
            _settle(entry.future, RetryableError(f"the IPC connection to the nucleus is gone ({_reason(exc)}); "
                                                 f"no receipt can arrive for batch {entry.batch}"))

    def _open_client(self, first: bool = False) -> None:
        """Make a new client with ``connect`` (an owned one); on the first try, no nucleus is a ConfigError."""
        try:
            client = self._connect()
        except KeyError as exc:  # awsiot reads the socket path and token from the environment
            raise ConfigError("publisher.type", f"ipc needs the Greengrass nucleus: the environment has no {exc} "
                                                "(run the gateway as a Greengrass component)") from exc
        except Exception as exc:
            with self._lock:
                self._next_connect = self.clock() + self.reconnect_s
            self._warn_once("connect", logging.DEBUG if not first else logging.WARNING,
                            "ipc: cannot connect to the nucleus (%s); retrying every %g s", _reason(exc),
                            self.reconnect_s)
            return
        with self._lock:
            old, self._client = self._client, client
            self._ipc_up = True
            self._status_assumed = False
            self._next_status = self._next_receipt = 0.0
            self._warned.discard("connect")
        if old is not None and old is not client:
            self._close_client(old)
        if not first:
            log.info("ipc: connected to the nucleus again")

    # ------------------------------------------------------------------ helpers

    def _warn_once(self, key: str, level: int, msg: str, *args: Any) -> None:
        """Like a meter that stops answering: once at ``level``, then quietly until it clears."""
        first = key not in self._warned
        self._warned.add(key)
        log.log(level if first else logging.DEBUG, msg, *args)

    @staticmethod
    def _close_op(op: Any) -> None:
        try:
            op.close()
        except Exception as exc:  # closed already, with its connection
            log.debug("ipc: closing a stream: %s", _reason(exc))

    @staticmethod
    def _close_client(client: Any) -> None:
        try:
            client.close()
        except Exception as exc:
            log.debug("ipc: closing the client: %s", _reason(exc))

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"delivery": self.delivery, "connected": self._connected_locked(), "accepted": self.accepted,
                    "awaiting_receipt": sum(len(v) for v in self._pending.values()), "resends": self.resends,
                    "receipts": self.receipts, "spool_full": self.spool_full}
