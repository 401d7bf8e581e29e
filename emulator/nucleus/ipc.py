"""The local nucleus's IPC server: Greengrass eventstream RPC on a Unix socket.

The unmodified awsiotsdk ``GreengrassCoreIPCClientV2`` connects to it when a component's
environment holds ``AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT`` (the socket) and
``SVCUID`` (the component's token); :meth:`IPCServer.environment` gives both.

The RPC layer over :mod:`emulator.nucleus.eventstream` (as in aws-c-event-stream's
``event_stream_rpc.h``): every message carries ``:message-type``, ``:message-flags`` and
``:stream-id`` (int32 headers).

- Connection level (stream 0): the client's CONNECT has ``:version`` "0.1.0" and the payload
  ``{"authToken": "<SVCUID>"}``. A known token and that version get CONNECT_ACK with flag 1
  (accepted); anything else a CONNECT_ACK without it (the client closes and raises
  ``AccessDeniedError``; the server closes the socket itself if the client lingers 2 s). PING is answered by PING_RESPONSE echoing the payload and the
  non-``:`` headers. Anything before CONNECT, or a malformed frame, gets a PROTOCOL_ERROR and
  the connection is closed.
- Operations: each call opens a new stream whose first APPLICATION_MESSAGE carries ``operation``
  (``aws.greengrass#PublishToIoTCore``), ``:content-type: application/json`` and
  ``service-model-type``; the payload is the request shape's JSON. The answer is one
  APPLICATION_MESSAGE whose ``service-model-type`` names the response shape, with flag 2
  (terminate stream) unless the operation streams: then events follow on the same stream (flags
  0) until the client sends an empty APPLICATION_MESSAGE with the terminate flag (its
  ``operation.close()``), or the server ends it with one.
- Errors are APPLICATION_ERROR with terminate, ``service-model-type`` naming the error shape
  (``aws.greengrass#UnauthorizedError``, ``ServiceError``, ``InvalidArgumentsError``,
  ``ResourceNotFoundError`` ...) and its JSON, ``{"message": ...}``. The client raises them as
  the awsiotsdk's own exception classes.
- An operation of the Greengrass model that this server does not implement is answered as the
  Java nucleus's ``DefaultOperationHandler`` answers: ``ServiceError`` "Operation <name> is not
  supported by Greengrass". An operation name outside the model gets the eventstream server's
  own answer: APPLICATION_ERROR ``{"error": "Unsupported Operation", "message": "<name> is an
  unsupported operation."}`` without a model type (the client then raises ``StreamClosedError``).

Shapes are (de)serialised with the awsiotsdk's own model classes (``_from_payload`` /
``_to_payload``), so field names and base64 blobs are exactly the client's. Handlers raise the
model's error classes (``model.ServiceError(message=...)``).

The server runs one asyncio loop on its own thread; handlers run on it and must not block,
except those registered as blocking (the runner's callbacks), which run in a thread pool.
Everything in the Python API is thread-safe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import json
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from awsiot import eventstreamrpc as rpc
from awsiot.greengrasscoreipc import model

from emulator.nucleus import accesscontrol
from emulator.nucleus.eventstream import Decoder, FrameError, Header, HeaderType, Message, encode

log = logging.getLogger(__name__)

VERSION = "0.1.0"
SOCKET_ENV = "AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT"
TOKEN_ENV = "SVCUID"
JSON = "application/json"


class MessageType(enum.IntEnum):
    APPLICATION_MESSAGE = 0
    APPLICATION_ERROR = 1
    PING = 2
    PING_RESPONSE = 3
    CONNECT = 4
    CONNECT_ACK = 5
    PROTOCOL_ERROR = 6
    INTERNAL_ERROR = 7


REFUSED_LINGER_S = 2.0
CONNECTION_ACCEPTED = 1
TERMINATE_STREAM = 2


@dataclass(frozen=True)
class OperationModel:
    name: str
    request: type
    response: type
    stream_event: type | None


def operation_models() -> dict[str, OperationModel]:
    """Every operation of the awsiotsdk's Greengrass model, by name."""
    ops = {}
    for attr in dir(model):
        cls = getattr(model, attr)
        if (isinstance(cls, type) and issubclass(cls, rpc.ClientOperation) and attr.startswith("_")
                and attr.endswith("Operation")):
            ops[cls._model_name()] = OperationModel(cls._model_name(), cls._request_type(),
                                                    cls._response_type(), cls._response_stream_type())
    return ops


@dataclass
class Component:
    """A component the nucleus knows: its name, token, version and accessControl policies."""

    name: str
    token: str
    version: str = "0.0.0"
    access_control: Mapping | None = None


@dataclass
class Call:
    """One operation call, as a handler sees it."""

    component: Component
    operation: str
    request: Any
    stream: Stream | None = None

    def authorize(self, resource: str | None, acl: accesscontrol.AccessControl,
                  message: str | None = None) -> None:
        """Raise the model's UnauthorizedError unless the component's policies allow this call.

        ``message`` replaces the nucleus's own wording where it has its own (the MQTT proxy
        answers just "Not Authorized").
        """
        try:
            acl.check(self.component.name, self.operation, resource)
        except accesscontrol.AccessDenied as exc:
            log.info("IPC %s denied: %s", self.operation, exc)
            raise model.UnauthorizedError(message=message or str(exc)) from None


Handler = Callable[[Call], Any]


@dataclass
class Operation:
    """A handler for one operation; ``blocking`` handlers run in a thread pool."""

    handler: Handler
    blocking: bool = False


class Stream:
    """The server end of one streaming operation: send events, learn when it ends.

    Events sent before the operation's response is on the wire are held and follow it.
    """

    def __init__(self, conn: _Connection, stream_id: int, op: OperationModel) -> None:
        self._conn = conn
        self.stream_id = stream_id
        self.operation = op
        self.closed = False
        self._ready = False
        self._held: list[Any] = []
        self._on_close: list[Callable[[], None]] = []

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once when the stream ends, from whichever side (or at once if it has)."""
        if self.closed:
            callback()
        else:
            self._on_close.append(callback)

    def send_event(self, event: Any) -> None:
        """Send one event shape (the operation's stream type); thread-safe, dropped once closed."""
        self._conn.call_soon(self._send_event, event)

    def close(self) -> None:
        """End the stream from the server side (an empty terminate message)."""
        self._conn.call_soon(self._close_from_server)

    # -- loop thread only
    def _send_event(self, event: Any) -> None:
        if self.closed:
            return
        if not self._ready:
            self._held.append(event)
            return
        self._conn.send_shape(self.stream_id, event, MessageType.APPLICATION_MESSAGE, 0)

    def _mark_ready(self) -> None:
        self._ready = True
        held, self._held = self._held, []
        for event in held:
            self._send_event(event)

    def _close_from_server(self) -> None:
        if not self.closed:
            self._conn.send(self.stream_id, MessageType.APPLICATION_MESSAGE, TERMINATE_STREAM, [], b"")
            self._closed()

    def _closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._conn.streams.pop(self.stream_id, None)
        callbacks, self._on_close = self._on_close, []
        for cb in callbacks:
            try:
                cb()
            except Exception:
                log.exception("IPC stream %d close callback failed", self.stream_id)


def _to_json(shape: Any) -> bytes:
    return json.dumps(shape._to_payload()).encode()


class _Connection(asyncio.Protocol):
    def __init__(self, server: IPCServer) -> None:
        self.server = server
        self.loop = server._loop
        self.transport: asyncio.Transport | None = None
        self.decoder = Decoder()
        self.component: Component | None = None
        self.streams: dict[int, Stream] = {}
        self.last_stream_id = 0
        self.open_calls: set[int] = set()

    # -- plumbing
    def call_soon(self, fn: Callable, *args: Any) -> None:
        if self.server._loop_thread is threading.current_thread():
            fn(*args)
        else:
            try:
                self.loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop is closed: the server stopped
                pass

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        for stream in list(self.streams.values()):
            stream._closed()

    def send(self, stream_id: int, mtype: MessageType, flags: int, headers: list[Header], payload: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        all_headers = [Header(":message-type", HeaderType.INT32, int(mtype)),
                       Header(":message-flags", HeaderType.INT32, flags),
                       Header(":stream-id", HeaderType.INT32, stream_id), *headers]
        self.transport.write(encode(all_headers, payload))

    def send_shape(self, stream_id: int, shape: Any, mtype: MessageType, flags: int) -> None:
        headers = [Header.string(":content-type", JSON),
                   Header.string("service-model-type", shape._model_name())]
        self.send(stream_id, mtype, flags, headers, _to_json(shape))

    def protocol_error(self, message: str) -> None:
        log.warning("IPC protocol error (%s): %s", self.component.name if self.component else "unconnected", message)
        self.send(0, MessageType.PROTOCOL_ERROR, 0, [Header.string(":content-type", JSON)],
                  json.dumps({"message": message}).encode())
        if self.transport:
            self.transport.close()

    # -- receiving
    def data_received(self, data: bytes) -> None:
        try:
            for msg in self.decoder.feed(data):
                self.handle(msg)
        except FrameError as exc:
            self.protocol_error(f"bad frame: {exc}")

    def handle(self, msg: Message) -> None:
        try:
            mtype = MessageType(msg.header(":message-type"))
        except ValueError:
            self.protocol_error(f":message-type {msg.header(':message-type')!r} is not a message type")
            return
        flags = msg.header(":message-flags", 0) or 0
        stream_id = msg.header(":stream-id", 0) or 0
        if self.component is None:
            if mtype is MessageType.CONNECT:
                self.on_connect(msg)
            else:
                self.protocol_error(f"{mtype.name} before CONNECT")
            return
        if mtype is MessageType.PING:
            echo = [h for h in msg.headers if not h.name.startswith(":")]
            self.send(0, MessageType.PING_RESPONSE, 0, echo, msg.payload)
        elif mtype is MessageType.PING_RESPONSE:
            pass
        elif mtype is MessageType.CONNECT:
            self.protocol_error("CONNECT on a connection already connected")
        elif mtype in (MessageType.APPLICATION_MESSAGE, MessageType.APPLICATION_ERROR):
            if stream_id == 0:
                self.protocol_error(f"{mtype.name} on stream 0")
            else:
                self.on_stream_message(stream_id, flags, msg)
        else:
            self.protocol_error(f"{mtype.name} is not expected from a client")

    def on_connect(self, msg: Message) -> None:
        version = msg.header(":version")
        component = None
        if version != VERSION:
            log.warning("IPC CONNECT refused: :version %r, this server speaks %s", version, VERSION)
        else:
            try:
                token = json.loads(msg.payload or b"{}").get("authToken")
            except (ValueError, AttributeError):
                token = None
            component = self.server._by_token(token)
            if component is None:
                log.warning("IPC CONNECT refused: unknown authToken")
        if component is None:
            self.send(0, MessageType.CONNECT_ACK, 0, [], b"")
            # The client closes on a refused CONNECT_ACK and raises AccessDeniedError; closing
            # at once from here races it into a bare AWS_IO_SOCKET_CLOSED. So the server closes
            # only a client that lingers.
            if self.transport:
                self.loop.call_later(REFUSED_LINGER_S, self.transport.close)
            return
        self.component = component
        self.send(0, MessageType.CONNECT_ACK, CONNECTION_ACCEPTED, [], b"")

    def on_stream_message(self, stream_id: int, flags: int, msg: Message) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:
            if flags & TERMINATE_STREAM:
                stream._closed()
            # no operation here takes events from the client; they are ignored, as in the nucleus
            return
        if stream_id in self.open_calls:
            if flags & TERMINATE_STREAM:
                self.open_calls.discard(stream_id)
            return
        if stream_id <= self.last_stream_id:
            return  # a late message on a stream already finished
        self.last_stream_id = stream_id
        if flags & TERMINATE_STREAM:
            return  # a request hung up before it was made: do no work (as the nucleus)
        operation = msg.header("operation")
        if not isinstance(operation, str):
            self.protocol_error(f"stream {stream_id} opened without an operation header")
            return
        self.server._dispatch(self, stream_id, operation, msg)

    def reply(self, stream_id: int, op: OperationModel, stream: Stream | None, result: Any,
              error: BaseException | None) -> None:
        """Send an operation's outcome (loop thread)."""
        self.open_calls.discard(stream_id)
        if error is not None:
            if not isinstance(error, model.GreengrassCoreIPCError):
                log.error("IPC %s failed inside the server", op.name, exc_info=error)
                error = model.ServiceError(message=f"{op.name} failed inside the local nucleus: {error!r}")
            self.send_shape(stream_id, error, MessageType.APPLICATION_ERROR, TERMINATE_STREAM)
            if stream is not None:
                stream._closed()
            return
        if result is None:
            result = op.response()
        if stream is None:
            self.send_shape(stream_id, result, MessageType.APPLICATION_MESSAGE, TERMINATE_STREAM)
        elif not stream.closed:
            self.send_shape(stream_id, result, MessageType.APPLICATION_MESSAGE, 0)
            stream._mark_ready()


class IPCServer:
    """The IPC server and the registry of components it answers.

    ::

        server = IPCServer(tmp / "ipc.socket", thing_name="meter-gw-1", iotcore=MemoryIoTCore())
        with server:
            token = server.register_component("org.metergateway.Gateway", access_control=...)
            env = server.environment("org.metergateway.Gateway")  # for the component's process

    Services: ``server.pubsub``, ``server.config``, ``server.lifecycle``, ``server.mqtt``,
    ``server.cli`` (the runner's callbacks). Each has a Python API for the runner and tests.
    """

    def __init__(self, socket_path: str | os.PathLike, *, thing_name: str = "local-thing",
                 iotcore: Any = None, cli_hooks: Any = None) -> None:
        from emulator.nucleus.config import ConfigStore
        from emulator.nucleus.lifecycle import Lifecycle
        from emulator.nucleus.localcli import LocalCli
        from emulator.nucleus.mqttproxy import MemoryIoTCore, MqttProxy
        from emulator.nucleus.pubsub import PubSub

        self.socket_path = Path(socket_path)
        self.thing_name = thing_name
        self.acl = accesscontrol.AccessControl()
        self._components: dict[str, Component] = {}
        self._tokens: dict[str, Component] = {}
        self._lock = threading.Lock()
        self.models = operation_models()
        self.pubsub = PubSub(self.acl)
        self.config = ConfigStore()
        self.lifecycle = Lifecycle()
        self.mqtt = MqttProxy(iotcore if iotcore is not None else MemoryIoTCore(), self.acl)
        self.cli = LocalCli(self.acl, cli_hooks)
        self.operations: dict[str, Operation] = {}
        for service in (self.pubsub, self.config, self.lifecycle, self.mqtt, self.cli):
            self.operations.update(service.operations())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="ipc-blocking")

    # -- components
    def register_component(self, name: str, *, token: str | None = None, version: str = "0.0.0",
                           access_control: Mapping | None = None, configuration: Mapping | None = None,
                           variables: Mapping[str, str] | None = None) -> str:
        """Make a component known (or replace it): its token (made when not given), policies, config.

        ``configuration`` is its configuration without ``accessControl``; an ``accessControl`` key
        in it is taken as the policies when ``access_control`` is not given. ``variables`` adds
        recipe variables for the policies' resources beyond ``{iot:thingName}``.
        Raises :class:`accesscontrol.PolicyError` for a malformed accessControl.
        """
        configuration = dict(configuration or {})
        if access_control is None:
            access_control = configuration.get("accessControl")
        configuration.pop("accessControl", None)
        known = {"iot:thingName": self.thing_name, **(variables or {})}
        policies = accesscontrol.parse(access_control, known, where=f"{name}.accessControl")
        token = token or secrets.token_hex(16).upper()
        component = Component(name, token, version, access_control)
        with self._lock:
            old = self._components.get(name)
            if old is not None:
                self._tokens.pop(old.token, None)
            self._components[name] = component
            self._tokens[token] = component
        self.acl.set_policies(name, policies)
        self.config.set_component(name, configuration)
        self.lifecycle.add(name)
        return token

    def unregister_component(self, name: str) -> None:
        with self._lock:
            component = self._components.pop(name, None)
            if component is not None:
                self._tokens.pop(component.token, None)
        self.acl.remove(name)

    def component(self, name: str) -> Component:
        with self._lock:
            return self._components[name]

    def environment(self, name: str) -> dict[str, str]:
        """The environment variables a component's process needs to reach this server."""
        return {SOCKET_ENV: str(self.socket_path), TOKEN_ENV: self.component(name).token,
                "AWS_IOT_THING_NAME": self.thing_name}

    def _by_token(self, token: Any) -> Component | None:
        if not isinstance(token, str):
            return None
        with self._lock:
            return self._tokens.get(token)

    # -- running
    def start(self) -> IPCServer:
        """Listen on the socket (replacing a stale one); returns once clients can connect."""
        if self._loop_thread is not None:
            return self
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists() or self.socket_path.is_symlink():
            self.socket_path.unlink()
        if len(os.fsencode(self.socket_path)) > 107:
            raise ValueError(f"IPC socket path {self.socket_path} is longer than a Unix socket allows (107 bytes)")
        started = concurrent.futures.Future()
        self._loop_thread = threading.Thread(target=self._run, args=(started,), name="ipc-server", daemon=True)
        self._loop_thread.start()
        started.result()
        return self

    def _run(self, started: concurrent.futures.Future) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                loop.create_unix_server(lambda: _Connection(self), path=str(self.socket_path)))
        except BaseException as exc:
            started.set_exception(exc)
            loop.close()
            return
        started.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.close()

    def stop(self) -> None:
        """Close every connection and the socket; idempotent."""
        loop, thread = self._loop, self._loop_thread
        if thread is None or loop is None:
            return

        def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for conn in list(self._connections):
                if conn.transport:
                    conn.transport.close()
                conn.connection_lost(None)
            loop.call_soon(loop.stop)

        loop.call_soon_threadsafe(shutdown)
        thread.join()
        self._loop_thread = None
        self._pool.shutdown(wait=False)
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> IPCServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- dispatch (loop thread)
    def _dispatch(self, conn: _Connection, stream_id: int, name: str, msg: Message) -> None:
        op = self.models.get(name)
        if op is None:
            payload = json.dumps({"error": "Unsupported Operation",
                                  "message": f"{name} is an unsupported operation."}).encode()
            conn.send(stream_id, MessageType.APPLICATION_ERROR, TERMINATE_STREAM,
                      [Header.string(":content-type", JSON)], payload)
            return
        impl = self.operations.get(name)
        stream = Stream(conn, stream_id, op) if op.stream_event is not None else None
        if stream is not None:
            conn.streams[stream_id] = stream
        else:
            conn.open_calls.add(stream_id)
        if impl is None:
            conn.reply(stream_id, op, stream, None,
                       model.ServiceError(message=f"Operation {name} is not supported by Greengrass"))
            return
        try:
            request = op.request._from_payload(json.loads(msg.payload or b"{}"))
        except Exception as exc:
            conn.reply(stream_id, op, stream, None,
                       model.InvalidArgumentsError(message=f"{name}: the request is not a {op.request._model_name()}: {exc}"))
            return
        call = Call(conn.component, name, request, stream)  # type: ignore[arg-type]
        if impl.blocking:
            fut = self._pool.submit(impl.handler, call)

            def done(f: concurrent.futures.Future) -> None:
                exc = f.exception()
                conn.call_soon(conn.reply, stream_id, op, stream, None if exc else f.result(), exc)
            fut.add_done_callback(done)
            return
        try:
            result = impl.handler(call)
        except BaseException as exc:  # every failure is answered, never dropped
            conn.reply(stream_id, op, stream, None, exc)
            return
        conn.reply(stream_id, op, stream, result, None)
