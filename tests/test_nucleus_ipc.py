"""The local nucleus's IPC server, driven by the real, unmodified awsiotsdk GreengrassCoreIPCClientV2.

Plus the eventstream codec and the access-control matching on their own, and a few raw-socket
checks of the protocol (ping, frames before CONNECT, bad CRCs, unknown operations).
"""

from __future__ import annotations

import datetime as dt
import json
import queue
import shutil
import socket
import struct
import tempfile
import threading
import uuid
import zlib
from pathlib import Path

import pytest
from awsiot.eventstreamrpc import AccessDeniedError
from awsiot.greengrasscoreipc import model
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

from emulator.nucleus import accesscontrol, eventstream
from emulator.nucleus.eventstream import Decoder, FrameError, Header, HeaderType, decode, encode
from emulator.nucleus.ipc import IPCServer
from emulator.nucleus.localcli import ComponentInfo, DeploymentInfo
from emulator.nucleus.mqttproxy import MemoryIoTCore

GATEWAY = "org.metergateway.Gateway"
MODEL = "org.metergateway.Model"
THING = "meter-gw-1"
WAIT = 10

GATEWAY_ACL = {
    "aws.greengrass.ipc.mqttproxy": {
        "gw:mqtt:1": {"operations": ["aws.greengrass#PublishToIoTCore", "aws.greengrass#SubscribeToIoTCore"],
                      "resources": ["dt/meters/+/{iot:thingName}/#", "cmd/meters/{iot:thingName}/receipt"]}},
    "aws.greengrass.ipc.pubsub": {
        "gw:pubsub:1": {"operations": ["*"], "resources": ["metergateway/*"]}},
    "aws.greengrass.Cli": {
        "gw:cli:1": {"operations": ["aws.greengrass#ListComponents", "aws.greengrass#GetComponentDetails",
                                    "aws.greengrass#CreateLocalDeployment",
                                    "aws.greengrass#GetLocalDeploymentStatus", "aws.greengrass#RestartComponent"],
                     "resources": ["*"]}},
}
MODEL_ACL = {
    "aws.greengrass.ipc.pubsub": {
        "model:pubsub:1": {"operations": ["aws.greengrass#PublishToTopic"], "resources": ["metergateway/model/announce"]}},
    "aws.greengrass.Cli": {
        "model:cli:1": {"operations": ["aws.greengrass#RestartComponent"], "resources": [MODEL]}},
}


class Hooks:
    """The runner's side of the CLI operations, in memory."""

    def __init__(self) -> None:
        self.components = {GATEWAY: ComponentInfo(GATEWAY, "1.0.0", "RUNNING", {"thing": ""}),
                           MODEL: ComponentInfo(MODEL, "2.0.0", "FINISHED")}
        self.restarted: list[str] = []
        self.deployments: dict[str, DeploymentInfo] = {}
        self.requests: list[model.CreateLocalDeploymentRequest] = []

    def list_components(self):
        return list(self.components.values())

    def get_component_details(self, name):
        return self.components.get(name)

    def restart_component(self, name):
        self.restarted.append(name)

    def create_local_deployment(self, request):
        self.requests.append(request)
        deployment_id = str(uuid.uuid4())
        self.deployments[deployment_id] = DeploymentInfo(deployment_id, "IN_PROGRESS", "01/02/2025 03:04:05")
        return deployment_id

    def get_local_deployment_status(self, deployment_id):
        return self.deployments.get(deployment_id)


class WatchedIoTCore(MemoryIoTCore):
    """MemoryIoTCore that signals when a subscription is removed."""

    def __init__(self) -> None:
        super().__init__()
        self.unsubscribed = threading.Event()

    def subscribe(self, topic_filter, qos, callback):
        remove = super().subscribe(topic_filter, qos, callback)

        def unsubscribe():
            remove()
            self.unsubscribed.set()
        return unsubscribe


@pytest.fixture
def short_dir():
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer
    path = Path(tempfile.mkdtemp(prefix="ggipc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def bridge() -> WatchedIoTCore:
    return WatchedIoTCore()


@pytest.fixture
def hooks() -> Hooks:
    return Hooks()


@pytest.fixture
def server(short_dir, bridge, hooks):
    with IPCServer(short_dir / "ipc.socket", thing_name=THING, iotcore=bridge, cli_hooks=hooks) as s:
        s.register_component(GATEWAY, version="1.0.0", configuration={
            "accessControl": GATEWAY_ACL, "thing": "", "forwarder": {"batch": 71, "qos": 1}})
        s.register_component(MODEL, version="2.0.0", access_control=MODEL_ACL, configuration={"model": "v3"})
        yield s


@pytest.fixture
def connect(server, monkeypatch):
    """``connect(component)`` -> a GreengrassCoreIPCClientV2 made from the component's environment."""
    clients = []

    def make(component: str) -> GreengrassCoreIPCClientV2:
        for key, value in server.environment(component).items():
            monkeypatch.setenv(key, value)
        client = GreengrassCoreIPCClientV2()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


# ---------------------------------------------------------------- codec


def test_codec_round_trips_every_header_type():
    when = dt.datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone.utc)
    ident = uuid.uuid4()
    headers = [
        Header("t", HeaderType.BOOL_TRUE, True), Header("f", HeaderType.BOOL_FALSE, False),
        Header("b", HeaderType.BYTE, -7), Header("s", HeaderType.INT16, -30000),
        Header("i", HeaderType.INT32, 2**31 - 1), Header("l", HeaderType.INT64, -(2**63)),
        Header("buf", HeaderType.BYTE_BUF, b"\x00\xff"), Header("str", HeaderType.STRING, "héllo"),
        Header("ts", HeaderType.TIMESTAMP, when), Header("id", HeaderType.UUID, ident),
    ]
    frame = encode(headers, b'{"a": 1}')
    msg = decode(frame)
    assert msg.headers == headers
    assert msg.payload == b'{"a": 1}'
    assert msg.header("STR") == "héllo"
    # the layout of the spec: total, headers length, prelude CRC, ..., message CRC
    total, hlen, pcrc = struct.unpack(">III", frame[:12])
    assert total == len(frame) and pcrc == zlib.crc32(frame[:8])
    assert struct.unpack(">I", frame[-4:])[0] == zlib.crc32(frame[:-4])
    assert hlen == len(frame) - 16 - len(msg.payload)


def test_decoder_takes_messages_split_anywhere():
    frames = [encode([Header.int32(":stream-id", n)], b"x" * n) for n in range(5)]
    data = b"".join(frames)
    decoder = Decoder()
    got = []
    for i in range(0, len(data), 7):
        got.extend(decoder.feed(data[i:i + 7]))
    assert [m.header(":stream-id") for m in got] == [0, 1, 2, 3, 4]
    assert [len(m.payload) for m in got] == [0, 1, 2, 3, 4]


def test_corrupted_crcs_are_rejected_with_a_clear_error():
    frame = bytearray(encode([Header.string("a", "b")], b"payload"))
    frame[-6] ^= 0x01
    with pytest.raises(FrameError, match=r"^message CRC mismatch: frame says 0x[0-9a-f]{8}, bytes give 0x[0-9a-f]{8}$"):
        decode(bytes(frame))
    frame = bytearray(encode([], b""))
    frame[1] ^= 0x01
    with pytest.raises(FrameError, match=r"^prelude CRC mismatch"):
        list(Decoder().feed(bytes(frame)))


def test_codec_limits():
    with pytest.raises(FrameError, match=r"header name 'x{128}' is 128 bytes; it must be 1\.\.127"):
        encode([Header.string("x" * 128, "v")])
    with pytest.raises(FrameError, match=r"message is \d+ bytes, more than 16777216"):
        encode([], b"\0" * eventstream.MAX_MESSAGE)
    with pytest.raises(FrameError, match=r"headers are \d+ bytes, more than 131072"):
        encode([Header(f"h{i}", HeaderType.BYTE_BUF, b"\0" * 60000) for i in range(3)])
    prelude = struct.pack(">II", eventstream.MAX_MESSAGE + 1, 0)
    with pytest.raises(FrameError, match=r"message length 16777217 is more than the 16777216-byte limit"):
        list(Decoder().feed(prelude + struct.pack(">I", zlib.crc32(prelude))))
    frame = bytearray(encode([Header.string("a", "b")]))
    frame[14] = 11  # the header's type byte: no such type
    frame[-4:] = struct.pack(">I", zlib.crc32(bytes(frame[:-4])))
    with pytest.raises(FrameError, match=r"header 'a' has unknown value type 11"):
        decode(bytes(frame))


# ---------------------------------------------------------------- access control


def _allowed(destination, resources, operation, resource, variables=None):
    acl = accesscontrol.AccessControl()
    acl.set_policies("c", accesscontrol.parse(
        {destination: {"p": {"operations": [operation], "resources": resources}}}, variables))
    return acl.is_allowed("c", operation, resource)


@pytest.mark.parametrize("policy,topic,allowed", [
    ("dt/meters/+/gw/raw", "dt/meters/site1/gw/raw", True),
    ("dt/meters/+/gw/raw", "dt/meters/a/b/gw/raw", False),
    ("dt/meters/#", "dt/meters", True),
    ("dt/meters/#", "dt/meters/a/b/c", True),
    ("dt/meters/#", "dt/meterss", False),
    ("#", "anything/at/all", True),
    ("dt/*/raw", "dt/a/b/raw", True),   # * crosses levels
    ("dt/a+b/raw", "dt/a+b/raw", True),  # + inside a level is literal
    ("dt/a+b/raw", "dt/axb/raw", False),
    ("dt/+/raw", "dt/+/raw", True),      # a subscription filter is matched as a string
    ("dt/+/raw", "dt/#", False),
    ("dt/${*}", "dt/*", True),
    ("dt/${*}", "dt/x", False),
])
def test_mqttproxy_resources_match_mqtt_style(policy, topic, allowed):
    assert _allowed("aws.greengrass.ipc.mqttproxy", [policy], "aws.greengrass#PublishToIoTCore", topic) is allowed


@pytest.mark.parametrize("policy,topic,allowed", [
    ("metergateway/*", "metergateway/model/announce", True),
    ("metergateway/+", "metergateway/model", False),  # pubsub resources are not MQTT-style
    ("metergateway/+", "metergateway/+", True),
    ("*", "x", True),
])
def test_pubsub_resources_match_glob_style(policy, topic, allowed):
    assert _allowed("aws.greengrass.ipc.pubsub", [policy], "aws.greengrass#PublishToTopic", topic) is allowed


def test_recipe_variables_are_substituted():
    assert _allowed("aws.greengrass.ipc.mqttproxy", ["dt/{iot:thingName}/raw"], "aws.greengrass#PublishToIoTCore",
                    "dt/gw1/raw", {"iot:thingName": "gw1"})
    assert not _allowed("aws.greengrass.ipc.mqttproxy", ["dt/{iot:thingName}/raw"],
                        "aws.greengrass#PublishToIoTCore", "dt/gw2/raw", {"iot:thingName": "gw1"})


def test_malformed_access_control_names_the_path():
    with pytest.raises(accesscontrol.PolicyError,
                       match=r"^c\.accessControl\.aws\.greengrass\.ipc\.pubsub\.p1\.operations: expected a non-empty list"):
        accesscontrol.parse({"aws.greengrass.ipc.pubsub": {"p1": {"operations": "x"}}}, where="c.accessControl")


# ---------------------------------------------------------------- connecting


def test_unknown_token_is_refused(server, monkeypatch):
    monkeypatch.setenv("AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT", str(server.socket_path))
    monkeypatch.setenv("SVCUID", "NOT-A-TOKEN")
    with pytest.raises(AccessDeniedError, match="Connection access denied to event stream RPC server"):
        GreengrassCoreIPCClientV2()


class RawClient:
    """Eventstream over a plain socket, for what the SDK client never sends."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(WAIT)
        self.sock.connect(str(path))
        self.decoder = Decoder()
        self.pending: list[eventstream.Message] = []

    def send(self, mtype: int, headers=(), payload=b"", flags=0, stream_id=0) -> None:
        self.sock.sendall(encode([Header.int32(":message-type", mtype), Header.int32(":message-flags", flags),
                                  Header.int32(":stream-id", stream_id), *headers], payload))

    def recv(self) -> eventstream.Message | None:
        while not self.pending:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def connect(self, token: str) -> eventstream.Message:
        self.send(4, [Header.string(":version", "0.1.0")], json.dumps({"authToken": token}).encode())
        return self.recv()


def test_ping_is_echoed_and_bad_frames_close_the_connection(server):
    raw = RawClient(server.socket_path)
    ack = raw.connect(server.component(GATEWAY).token)
    assert (ack.header(":message-type"), ack.header(":message-flags")) == (5, 1)
    raw.send(2, [Header.string("x-ping", "1")], b"hello")
    pong = raw.recv()
    assert (pong.header(":message-type"), pong.header("x-ping"), pong.payload) == (3, "1", b"hello")
    frame = bytearray(encode([Header.int32(":message-type", 2)]))
    frame[-1] ^= 0xFF
    raw.sock.sendall(bytes(frame))
    err = raw.recv()
    assert err.header(":message-type") == 6
    assert json.loads(err.payload)["message"].startswith("bad frame: message CRC mismatch")
    assert raw.recv() is None  # closed


def test_a_message_before_connect_and_a_wrong_version_are_refused(server):
    raw = RawClient(server.socket_path)
    raw.send(2)
    err = raw.recv()
    assert err.header(":message-type") == 6
    assert json.loads(err.payload) == {"message": "PING before CONNECT"}
    raw = RawClient(server.socket_path)
    raw.send(4, [Header.string(":version", "0.2.0")],
             json.dumps({"authToken": server.component(GATEWAY).token}).encode())
    ack = raw.recv()
    assert (ack.header(":message-type"), ack.header(":message-flags")) == (5, 0)
    assert raw.recv() is None


def test_an_operation_outside_the_model_gets_the_eventstream_answer(server):
    raw = RawClient(server.socket_path)
    raw.connect(server.component(GATEWAY).token)
    raw.send(0, [Header.string("operation", "aws.greengrass#NoSuchThing"),
                 Header.string(":content-type", "application/json")], b"{}", stream_id=1)
    reply = raw.recv()
    assert (reply.header(":message-type"), reply.header(":message-flags"), reply.header(":stream-id")) == (1, 2, 1)
    assert json.loads(reply.payload) == {"error": "Unsupported Operation",
                                         "message": "aws.greengrass#NoSuchThing is an unsupported operation."}


def test_a_model_operation_not_implemented_is_a_service_error(connect):
    client = connect(GATEWAY)
    with pytest.raises(model.ServiceError) as err:
        client.get_secret_value(secret_id="s")
    assert err.value.message == "Operation aws.greengrass#GetSecretValue is not supported by Greengrass"


# ---------------------------------------------------------------- IoT Core


def test_publish_to_iot_core(connect, bridge):
    client = connect(GATEWAY)
    resp = client.publish_to_iot_core(topic_name=f"dt/meters/site1/{THING}/raw", qos="1", payload=b'{"r": 1}',
                                      user_properties=[model.UserProperty(key="k", value="v")])
    assert isinstance(resp, model.PublishToIoTCoreResponse)
    (message, qos), = bridge.published
    assert (message.topic, message.payload, qos, message.user_properties) == (
        f"dt/meters/site1/{THING}/raw", b'{"r": 1}', 1, [("k", "v")])


def test_publish_to_iot_core_denied(connect, bridge):
    client = connect(GATEWAY)
    with pytest.raises(model.UnauthorizedError) as err:
        client.publish_to_iot_core(topic_name="dt/meters/site1/other-thing/raw", qos="0", payload=b"x")
    assert err.value.message == "Not Authorized"
    assert bridge.published == []


def test_publish_to_iot_core_bad_arguments_and_full_spool(connect, bridge):
    client = connect(GATEWAY)
    topic = f"dt/meters/s/{THING}/raw"
    with pytest.raises(model.InvalidArgumentsError) as err:
        client.publish_to_iot_core(topic_name=topic, qos="2", payload=b"x")
    assert err.value.message == "Invalid QoS value: 2"
    with pytest.raises(model.InvalidArgumentsError) as err:
        client.publish_to_iot_core(topic_name=topic, qos="1")
    assert err.value.message == "Payload is required"
    bridge.full = True
    with pytest.raises(model.ServiceError) as err:
        client.publish_to_iot_core(topic_name=topic, qos="1", payload=b"x")
    assert err.value.message == f"Publish to topic {topic} failed: spool is full"


def test_subscribe_to_iot_core_streams_until_closed(connect, bridge):
    client = connect(GATEWAY)
    got: queue.Queue = queue.Queue()
    resp, op = client.subscribe_to_iot_core(topic_name=f"cmd/meters/{THING}/receipt", qos="1",
                                            on_stream_event=got.put)
    assert isinstance(resp, model.SubscribeToIoTCoreResponse)
    assert bridge.subscriptions() == [f"cmd/meters/{THING}/receipt"]
    assert bridge.deliver(f"cmd/meters/{THING}/receipt", b'{"batch": "ab"}') == 1
    event = got.get(timeout=WAIT)
    assert (event.message.topic_name, event.message.payload) == (f"cmd/meters/{THING}/receipt", b'{"batch": "ab"}')
    op.close().result(WAIT)
    assert bridge.unsubscribed.wait(WAIT)
    assert bridge.subscriptions() == []


def test_subscribe_to_iot_core_denied(connect, bridge):
    with pytest.raises(model.UnauthorizedError):
        connect(GATEWAY).subscribe_to_iot_core(topic_name="cmd/#", qos="1", on_stream_event=print)
    assert bridge.subscriptions() == []


def test_subscribe_to_iot_core_connection_status(connect, bridge):
    got: queue.Queue = queue.Queue()
    resp, op = connect(GATEWAY).subscribe_to_iot_core_connection_status(on_stream_event=got.put)
    assert isinstance(resp, model.SubscribeToIoTCoreConnectionStatusResponse)
    assert got.get(timeout=WAIT).connection_status_event.status == "CONNECTED"
    bridge.set_connected(False)
    assert got.get(timeout=WAIT).connection_status_event.status == "DISCONNECTED"
    op.close().result(WAIT)


# ---------------------------------------------------------------- local pub/sub


def test_local_pubsub_between_components(connect):
    gateway, model_client = connect(GATEWAY), connect(MODEL)
    got: queue.Queue = queue.Queue()
    resp, op = gateway.subscribe_to_topic(topic="metergateway/model/+", on_stream_event=got.put,
                                          receive_mode="RECEIVE_MESSAGES_FROM_OTHERS")
    assert isinstance(resp, model.SubscribeToTopicResponse)
    announce = {"component": MODEL, "version": "2.0.0", "model": "v3", "path": "/m"}
    model_client.publish_to_topic(topic="metergateway/model/announce",
                                  publish_message=model.PublishMessage(json_message=model.JsonMessage(message=announce)))
    event = got.get(timeout=WAIT)
    assert event.json_message.message == announce
    assert event.json_message.context.topic == "metergateway/model/announce"
    # its own message is not delivered back (RECEIVE_MESSAGES_FROM_OTHERS); a binary one from MODEL is
    gateway.publish_to_topic(topic="metergateway/model/request",
                             publish_message=model.PublishMessage(json_message=model.JsonMessage(message={})))
    model_client.publish_to_topic(topic="metergateway/model/announce",
                                  publish_message=model.PublishMessage(binary_message=model.BinaryMessage(message=b"\x01")))
    event = got.get(timeout=WAIT)
    assert (event.binary_message.message, event.json_message) == (b"\x01", None)
    op.close().result(WAIT)


def test_local_publish_denied(connect):
    with pytest.raises(model.UnauthorizedError) as err:
        connect(MODEL).publish_to_topic(topic="metergateway/model/request", publish_message=model.PublishMessage(
            json_message=model.JsonMessage(message={})))
    assert err.value.message == (f"Principal {MODEL} is not authorized to perform aws.greengrass.ipc.pubsub:"
                                 "aws.greengrass#PublishToTopic on resource metergateway/model/request")


# ---------------------------------------------------------------- configuration


def test_get_configuration(connect):
    client = connect(GATEWAY)
    whole = client.get_configuration()
    assert (whole.component_name, whole.value) == (GATEWAY, {"thing": "", "forwarder": {"batch": 71, "qos": 1}})
    assert client.get_configuration(key_path=["forwarder", "batch"]).value == {"batch": 71}
    assert client.get_configuration(component_name=MODEL).value == {"model": "v3"}
    with pytest.raises(model.ResourceNotFoundError) as err:
        client.get_configuration(key_path=["nope"])
    assert err.value.message == "Key not found"


def test_update_configuration_notifies_subscribers(connect, server):
    client = connect(GATEWAY)
    got: queue.Queue = queue.Queue()
    _, op = client.subscribe_to_configuration_update(key_path=["forwarder"], on_stream_event=got.put)
    now = dt.datetime.now(dt.timezone.utc)
    client.update_configuration(key_path=["forwarder"], timestamp=now, value_to_merge={"batch": 100})
    event = got.get(timeout=WAIT).configuration_update_event
    assert (event.component_name, event.key_path) == (GATEWAY, ["forwarder", "batch"])
    assert server.config.get(GATEWAY, ["forwarder"]) == {"batch": 100, "qos": 1}
    # a deployment's change, from the runner, is seen the same way
    server.config.merge(GATEWAY, ["forwarder"], {"qos": 0})
    assert got.get(timeout=WAIT).configuration_update_event.key_path == ["forwarder", "qos"]
    with pytest.raises(model.FailedUpdateConditionCheckError):
        client.update_configuration(key_path=["forwarder"], timestamp=now - dt.timedelta(hours=1),
                                    value_to_merge={"batch": 5})
    with pytest.raises(model.InvalidArgumentsError) as err:
        client.update_configuration(timestamp=now, value_to_merge={"accessControl": {}})
    assert err.value.message == "Config update is not allowed for following fields ['accessControl']"
    op.close().result(WAIT)


@pytest.mark.parametrize("verdict", ["ACCEPTED", "REJECTED"])
def test_validate_configuration_updates(connect, server, verdict):
    client = connect(GATEWAY)
    asked = threading.Event()

    def on_event(events):
        asked.set()
        e = events.validate_configuration_update_event
        assert e.configuration["forwarder"]["batch"] == 0
        client.send_configuration_validity_report(configuration_validity_report=model.ConfigurationValidityReport(
            status=verdict, deployment_id=e.deployment_id, message="forwarder.batch: 0 is below 1"))

    _, op = client.subscribe_to_validate_configuration_updates(on_stream_event=on_event)
    assert server.config.has_validator(GATEWAY)
    report = server.config.validate(GATEWAY, {"forwarder": {"batch": 0}}, "dep-1", timeout=WAIT)
    assert asked.is_set()
    assert (report.status, report.message) == (verdict, "forwarder.batch: 0 is below 1")
    with pytest.raises(model.InvalidArgumentsError) as err:
        client.send_configuration_validity_report(configuration_validity_report=model.ConfigurationValidityReport(
            status="ACCEPTED", deployment_id="dep-unknown"))
    assert err.value.message == "Validation request either timed out or was never made"
    op.close().result(WAIT)


# ---------------------------------------------------------------- lifecycle


def test_update_state(connect, server):
    connect(GATEWAY).update_state(state="RUNNING")
    assert server.lifecycle.wait_for_state(GATEWAY, "RUNNING", WAIT)
    connect(MODEL).update_state(state="ERRORED")
    assert server.lifecycle.state(MODEL) == "ERRORED"


def test_component_updates_and_deferral(connect, server):
    client = connect(GATEWAY)
    got: queue.Queue = queue.Queue()

    def on_event(events):
        got.put(events)
        if events.pre_update_event is not None:
            client.defer_component_update(deployment_id=events.pre_update_event.deployment_id,
                                          message="flushing the buffer", recheck_after_ms=5000)

    _, op = client.subscribe_to_component_updates(on_stream_event=on_event)
    deferrals = server.lifecycle.offer_update("dep-2", timeout=WAIT)
    assert deferrals[GATEWAY].recheck_after_ms == 5000
    assert deferrals[GATEWAY].message == "flushing the buffer"
    assert got.get(timeout=WAIT).pre_update_event.deployment_id == "dep-2"
    server.lifecycle.post_update("dep-2")
    assert got.get(timeout=WAIT).post_update_event.deployment_id == "dep-2"
    with pytest.raises(model.ServiceError) as err:
        client.defer_component_update(deployment_id="dep-2", recheck_after_ms=1)
    assert err.value.message == "Time limit to respond to PreComponentUpdateEvent exceeded"
    op.close().result(WAIT)


# ---------------------------------------------------------------- the CLI's operations


def test_list_and_get_components(connect):
    client = connect(GATEWAY)
    listed = client.list_components().components
    assert [(c.component_name, c.version, c.state) for c in listed] == [
        (GATEWAY, "1.0.0", "RUNNING"), (MODEL, "2.0.0", "FINISHED")]
    details = client.get_component_details(component_name=GATEWAY).component_details
    assert (details.component_name, details.configuration) == (GATEWAY, {"thing": ""})
    with pytest.raises(model.ResourceNotFoundError) as err:
        client.get_component_details(component_name="nope")
    assert (err.value.message, err.value.resource_name) == ("Component nope not found", "nope")


def test_restart_component_and_its_authorization(connect, hooks):
    assert connect(MODEL).restart_component(component_name=MODEL).restart_status == "SUCCEEDED"
    with pytest.raises(model.UnauthorizedError) as err:
        connect(MODEL).restart_component(component_name=GATEWAY)
    assert err.value.message == (f"Principal {MODEL} is not authorized to perform aws.greengrass.Cli:"
                                 f"aws.greengrass#RestartComponent on resource {GATEWAY}")
    with pytest.raises(model.UnauthorizedError):
        connect(MODEL).list_components()
    assert hooks.restarted == [MODEL]


def test_local_deployments(connect, hooks):
    client = connect(GATEWAY)
    created = client.create_local_deployment(root_component_versions_to_add={MODEL: "2.1.0"},
                                             component_to_configuration={MODEL: {"MERGE": {"model": "v4"}}})
    assert hooks.requests[0].root_component_versions_to_add == {MODEL: "2.1.0"}
    status = client.get_local_deployment_status(deployment_id=created.deployment_id).deployment
    assert (status.deployment_id, status.status) == (created.deployment_id, "IN_PROGRESS")
    with pytest.raises(model.ResourceNotFoundError):
        client.get_local_deployment_status(deployment_id="no-such-deployment")


def test_cli_operations_without_a_runner_are_not_supported(short_dir, monkeypatch):
    with IPCServer(short_dir / "bare.socket") as bare:
        bare.register_component(GATEWAY, access_control=GATEWAY_ACL)
        for key, value in bare.environment(GATEWAY).items():
            monkeypatch.setenv(key, value)
        client = GreengrassCoreIPCClientV2()
        try:
            with pytest.raises(model.ServiceError) as err:
                client.list_components()
            assert err.value.message == "Operation aws.greengrass#ListComponents is not supported by Greengrass"
        finally:
            client.close()


def test_stopping_the_server_closes_open_streams(short_dir, monkeypatch):
    server = IPCServer(short_dir / "stop.socket").start()
    server.register_component(GATEWAY, access_control=GATEWAY_ACL)
    for key, value in server.environment(GATEWAY).items():
        monkeypatch.setenv(key, value)
    client = GreengrassCoreIPCClientV2()
    closed = threading.Event()
    try:
        client.subscribe_to_topic(topic="metergateway/x", on_stream_event=print, on_stream_closed=closed.set)
        server.stop()
        assert closed.wait(WAIT)
        assert not server.socket_path.exists()
        with pytest.raises(Exception):
            client.publish_to_topic(topic="metergateway/x", publish_message=model.PublishMessage(
                json_message=model.JsonMessage(message={})))
    finally:
        client.close()
