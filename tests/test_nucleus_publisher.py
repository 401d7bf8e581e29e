"""The IPC publisher and the Greengrass agent over the real, unmodified awsiotsdk client, against
the local nucleus: its IPC server, the real IoT Core bridge (and its spooler) to a real
mosquitto, and the cloud's receipt rule (:mod:`emulator.receipts`) on that broker.

tests/test_ipc_publisher.py and tests/test_greengrass.py play the nucleus with an autospec'd
client; here the same flows run end to end. The component's accessControl is the one in
recipes/gateway.yaml. Outages: ``link.cut()`` (the uplink goes, the nucleus sees it) and
``broker.pause()`` (IoT Core hangs: the connection stands and nothing is acknowledged, so the
nucleus keeps taking messages into its spool until it is full). Every wait is on a condition.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

from conftest import SUBSCRIBER, THING
from emulator.nucleus.config import ValidityReport
from emulator.nucleus.iotcore import IotCoreBridge, MqttProxyBridge, SpoolConfig
from emulator.nucleus.ipc import IPCServer
from emulator.receipts import ReceiptRule, receipt_for
from gateway.buffer import Buffer
from gateway.errors import NotAuthorizedError, RetryableError
from gateway.forwarder import Backoff, Forwarder
from gateway.greengrass import COMPONENT, GreengrassAgent
from gateway.messages import decode, encode
from gateway.publishers.ipc import IpcPublisher
from gateway.readings import Reading

WAIT = 15.0
TOPIC = f"dt/meters/15/{THING}/raw"
T0 = 1_451_606_400_000
RECIPE = Path(__file__).parent.parent / "recipes" / "gateway.yaml"


def recipe_access_control() -> dict:
    recipe = yaml.safe_load(RECIPE.read_text())
    return recipe["ComponentConfiguration"]["DefaultConfiguration"]["accessControl"]


def wait_for(predicate, timeout: float = WAIT) -> bool:
    """Poll ``predicate`` until it holds (returns as soon as it does)."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while time.monotonic() < deadline:
        if predicate():
            return True
        tick.wait(0.02)
    return bool(predicate())


def message(n: int = 1, value: float = 41.0) -> bytes:
    return encode(THING, "15", [[f"15{i:02d}:electricity", T0 + i, value] for i in range(n)])


def payloads(messages, topic: str = TOPIC) -> list[bytes]:
    return [m.payload for m in messages if m.topic == topic]


def keys_of(messages) -> list[tuple]:
    """Every reading key in the raw messages, duplicates included."""
    return [(r[0], r[1]) for m in messages if m.topic.endswith("/raw") for r in decode(m.payload)["readings"]]


def readings(n: int) -> list[Reading]:
    return [Reading("15", f"15{i % 5:02d}", "electricity", T0 + (i // 5) * 60_000, float(i), "test") for i in range(n)]


def key(r: Reading) -> tuple:
    return (f"{r.building}:{r.meter}", r.ts)


class Nucleus:
    """The local nucleus as a test needs it: the IPC server on a Unix socket and the IoT Core
    bridge to ``port``. :meth:`stop` then :meth:`start` is a nucleus restart: a memory spool is
    gone, and the component keeps its token (SVCUID), so its client connects again."""

    def __init__(self, root: Path, port: int, certs, *, spool: SpoolConfig, configuration: dict | None):
        self.socket = root / "ipc.socket"
        self.port, self.certs, self.spool = port, certs, spool
        self.configuration = configuration or {}
        self.token: str | None = None
        self.bridge: IotCoreBridge | None = None
        self.server: IPCServer | None = None

    def start(self) -> "Nucleus":
        client = self.certs.client(THING)
        self.bridge = IotCoreBridge("localhost", self.port, THING, client.cert, client.key, self.certs.ca,
                                    spool=self.spool, min_reconnect_delay=0.05, max_reconnect_delay=0.3).start()
        self.server = IPCServer(self.socket, thing_name=THING, iotcore=MqttProxyBridge(self.bridge)).start()
        self.token = self.server.register_component(COMPONENT, token=self.token, version="1.0.0",
                                                    access_control=recipe_access_control(),
                                                    configuration=self.configuration)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.bridge is not None:
            self.bridge.close()
            self.bridge = None


@pytest.fixture
def short_dir():
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer
    path = Path(tempfile.mkdtemp(prefix="ggpub-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_nucleus(short_dir, link, certs, monkeypatch):
    """``make_nucleus(spool=, configuration=)`` -> a started Nucleus whose bridge goes through
    ``link``; the component's environment (socket, SVCUID, thing) is set for the real client."""
    made: list[Nucleus] = []

    def make(*, spool: SpoolConfig = SpoolConfig(), configuration: dict | None = None) -> Nucleus:
        n = Nucleus(short_dir, link.port, certs, spool=spool, configuration=configuration).start()
        made.append(n)
        assert n.bridge.wait_connected(WAIT), f"the bridge did not connect: {n.bridge.last_error}"
        for name, value in n.server.environment(COMPONENT).items():
            monkeypatch.setenv(name, value)
        return n

    yield make
    for n in made:
        n.stop()


@pytest.fixture
def nucleus(make_nucleus) -> Nucleus:
    return make_nucleus()


@pytest.fixture
def open_publisher():
    """``open_publisher(**kw)`` -> a started IpcPublisher that owns its client (made from the
    environment, as in a component), connected to IoT Core through the nucleus."""
    pubs: list[IpcPublisher] = []

    def open_(**kw) -> IpcPublisher:
        kw.setdefault("poll_s", 0.05)
        kw.setdefault("reconnect_s", 0.1)
        pub = IpcPublisher(None, THING, **kw).start()
        pubs.append(pub)
        assert wait_for(lambda: pub.connected), pub.status()
        return pub

    yield open_
    for pub in pubs:
        pub.close()


@pytest.fixture
def sub(subscriber):
    """The broker-side subscriber on dt/#, subscribed before anything is published."""
    assert subscriber.wait_subscribed(WAIT)
    return subscriber


@pytest.fixture
def receipts(broker, certs):
    """The cloud's receipt rule on the broker itself (not behind the link)."""
    client = certs.client(SUBSCRIBER)
    rule = ReceiptRule("localhost", broker.port, client.cert, client.key, certs.ca).start()
    assert rule.wait_subscribed(WAIT)
    yield rule
    rule.close()


class Running:
    """A Forwarder.run in a thread, stopped at the end of the with block."""

    def __init__(self, fwd: Forwarder):
        self.fwd, self.stop = fwd, threading.Event()
        self.thread = threading.Thread(target=fwd.run, args=(self.stop, 5.0), name="forwarder", daemon=True)

    def __enter__(self) -> "Running":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(15)
        assert not self.thread.is_alive()


# ---------------------------------------------------------------- the receipt rule itself


def test_the_receipt_rule_answers_raw_and_scored_only_as_the_cloud_rule_does():
    topic, body = receipt_for(TOPIC, message())
    assert topic == f"cmd/meters/{THING}/receipt"
    assert body == b'{"batch":"%s","topic":"%s"}' % (decode(message())["batch"].encode(), TOPIC.encode())
    assert receipt_for(f"dt/meters/15/{THING}/scored", b"not json") == (
        f"cmd/meters/{THING}/receipt", b'{"topic":"dt/meters/15/%s/scored"}' % THING.encode())
    assert receipt_for(f"dt/meters/gateway/{THING}/health", b"{}") is None
    assert receipt_for("dt/weather/15/observations", b"{}") is None


# ---------------------------------------------------------------- handoff and receipts


def test_handoff_resolves_once_the_nucleus_spools_and_the_bytes_reach_iot_core(nucleus, open_publisher, sub):
    pub = open_publisher()
    assert pub.local is False and pub.delivery_window_s == 0
    payload = message(3)
    assert pub.publish(TOPIC, payload).result(WAIT) is None
    assert sub.wait_for(lambda ms: payloads(ms) == [payload], WAIT)
    assert pub.accepted == 1 and nucleus.bridge.wait_spool_empty(WAIT)


def test_receipt_mode_resolves_only_on_the_receipt_of_its_batch(nucleus, open_publisher, sub, receipts):
    receipts.pause()
    pub = open_publisher(delivery="receipt")
    payload = message(3)
    fut = pub.publish(TOPIC, payload)
    assert sub.wait_for(lambda ms: payloads(ms) == [payload], WAIT)  # in IoT Core ...
    assert receipts.wait_for(lambda r: r.held == 1, WAIT)  # ... and in the rule: the receipt is late
    assert wait_for(lambda: pub.accepted == 1)
    assert not fut.done()
    receipts.resume()
    assert fut.result(WAIT) is None
    assert (pub.receipts, pub.resends, receipts.republished) == (1, 0, 1)


def test_no_receipt_in_time_sends_the_very_same_bytes_again(nucleus, open_publisher, sub, receipts):
    receipts.pause()
    pub = open_publisher(delivery="receipt", receipt_timeout_s=1.0, resend_limit=3)
    payload = message(4)
    fut = pub.publish(TOPIC, payload)
    assert sub.wait_for(lambda ms: len(payloads(ms)) >= 2, WAIT)
    first, second = payloads(sub.snapshot())[:2]
    assert first == second == payload  # same bytes, same batch id: the cloud drops the duplicate by key
    assert pub.resends >= 1 and not fut.done()
    receipts.resume()
    assert fut.result(WAIT) is None
    assert pub.receipts == 1 and pub.status()["awaiting_receipt"] == 0


# ---------------------------------------------------------------- errors and the connection


def test_a_full_spool_is_backpressure_the_forwarder_backs_off_and_loses_nothing(tmp_path, make_nucleus, broker,
                                                                               open_publisher, sub):
    size = len(message(10))
    nucleus = make_nucleus(spool=SpoolConfig(max_size_bytes=4 * size + 100))
    pub = open_publisher()
    sent = readings(200)
    buf = Buffer(tmp_path / "buffer.db", live_window_ms=10**12)
    try:
        buf.put(sent)
        fwd = Forwarder(buf, pub, THING, batch_size=10, claim_size=10, backoff=Backoff(0.02, 0.1))
        broker.pause()  # IoT Core hangs: the nucleus spools until its spool is full
        with Running(fwd):
            assert wait_for(lambda: pub.spool_full >= 3), pub.status()
            assert 0 < nucleus.bridge.spool_stats.bytes <= 4 * size + 100
            assert buf.pending() > 0
            broker.resume()
            assert wait_for(lambda: buf.pending() == 0 and fwd.messages_in_flight == 0, 30), buf.pending()
        assert nucleus.bridge.wait_spool_empty(WAIT)
        assert sub.wait_for(lambda ms: set(keys_of(ms)) >= {key(r) for r in sent}, WAIT)
        assert fwd.failures >= 1 and nucleus.bridge.spool_stats.dropped_failed == 0
    finally:
        broker.resume()
        buf.close()


def test_a_topic_outside_the_recipes_access_control_is_not_authorized(nucleus, open_publisher):
    pub = open_publisher()
    with pytest.raises(NotAuthorizedError, match=r"UnauthorizedError: Not Authorized\): the component's "
                                                 r"accessControl for aws\.greengrass\.ipc\.mqttproxy"):
        pub.publish("dt/meters/15/another-gw/raw", message()).result(WAIT)
    assert pub.accepted == 0 and nucleus.bridge.spool_stats.messages == 0


def test_connected_follows_iot_core_across_an_outage_and_receipts_come_after_it(nucleus, open_publisher, link,
                                                                              receipts, sub):
    pub = open_publisher(delivery="receipt")
    assert pub.connected
    link.cut()
    assert wait_for(lambda: not pub.connected)
    link.restore()
    assert wait_for(lambda: pub.connected)
    # the nucleus sent the receipt subscription again at the reconnect, and the publisher made it anew
    assert pub.publish(TOPIC, message(2)).result(WAIT) is None
    assert pub.receipts == 1


def test_an_outage_spools_qos1_delivers_it_after_in_order_and_refuses_qos0(nucleus, open_publisher, link, sub):
    pub = open_publisher()
    link.cut()
    assert wait_for(lambda: not pub.connected)
    sent = [message(2, value=float(i)) for i in range(10)]
    for fut in [pub.publish(TOPIC, p) for p in sent]:
        assert fut.result(WAIT) is None  # handed off: in the nucleus's spool
    assert nucleus.bridge.spool_stats.messages == 10
    with pytest.raises(RetryableError, match=r"Device is offline\. Dropping QoS 0 message\."):
        pub.publish(TOPIC, message(1, 99.0), qos=0).result(WAIT)
    link.restore()
    assert sub.wait_for(lambda ms: len(payloads(ms)) == 10, WAIT)
    assert payloads(sub.snapshot()) == sent
    assert nucleus.bridge.spool_stats.dropped_qos0 == 1


# ---------------------------------------------------------------- nothing lost (receipt) / lost (handoff)


@pytest.mark.parametrize("delivery", ["receipt", "handoff"])
def test_a_memory_spool_that_overflows_and_dies_with_the_nucleus(delivery, tmp_path, make_nucleus, broker,
                                                                open_publisher, sub, receipts):
    """IoT Core hangs long enough for the nucleus's in-memory spool to overflow (backpressure),
    then the nucleus restarts: what sat in its memory spool is gone. With ``receipt`` every
    reading still arrives; with ``handoff`` the readings the gateway handed off, and so
    acknowledged in its buffer, are lost: the buffer says delivered, IoT Core never had them."""
    size = len(message(10))
    nucleus = make_nucleus(spool=SpoolConfig(max_size_bytes=6 * size + 100))
    pub = open_publisher(delivery=delivery, receipt_timeout_s=30)
    sent = readings(300)
    buf = Buffer(tmp_path / "buffer.db", live_window_ms=10**12)
    try:
        buf.put(sent)
        # one message per claim, so a claim is acknowledged as soon as the nucleus takes its message
        fwd = Forwarder(buf, pub, THING, batch_size=10, claim_size=10, backoff=Backoff(0.02, 0.1))
        broker.pause()
        with Running(fwd):
            assert wait_for(lambda: pub.spool_full >= 1), pub.status()  # overflowed: backpressure
            old = nucleus.bridge
            nucleus.stop()  # the nucleus restarts: its memory spool goes with it
            spooled = old.spool_stats  # what it held then: queued, and in flight to the hung broker
            assert spooled.messages >= 6 and spooled.queued >= 1
            broker.resume()
            nucleus.start()
            assert wait_for(lambda: buf.pending() == 0 and fwd.messages_in_flight == 0), buf.pending()
        assert nucleus.bridge.wait_spool_empty(WAIT)
        last = message(1, value=-1.0)  # after everything else: once it is in, the rest is too
        assert pub.publish(TOPIC, last).result(WAIT) is None
        assert sub.wait_for(lambda ms: last in payloads(ms), WAIT)
        got = keys_of([m for m in sub.snapshot() if m.payload != last])
        lost = {key(r) for r in sent} - set(got)
        assert buf.pending() == 0 and buf.status()["delivered"] == len(sent)  # the buffer: all delivered
        if delivery == "receipt":
            assert lost == set()
            print(f"\nreceipt: nothing lost; {len(got) - len(set(got))} readings arrived twice "
                  f"(resends: {pub.resends} by the receipt clock, {fwd.failures} failed claims sent again)")
        else:
            # the queued ones never left the nucleus; those in flight were written to the hung
            # broker's socket, and mosquitto may still read them when it resumes
            assert 10 * spooled.queued <= len(lost) <= 10 * spooled.messages
            print(f"\nhandoff: {len(lost)} of {len(sent)} readings lost with the nucleus's memory spool "
                  f"({spooled.messages} messages spooled, {spooled.queued} not yet sent)")
    finally:
        broker.resume()
        buf.close()


# ---------------------------------------------------------------- the Greengrass agent's configuration


def component_config(**over) -> dict:
    cfg = {
        "thing": "",
        "buffer": {"path": "buffer.db"},
        "sources": [{"type": "simulator", "name": "sim", "meters": 3, "count": 10, "speed": None,
                     "start": "2026-01-01T00:00:00Z"}],
        "publisher": {"type": "ipc", "delivery": "handoff"},
        "forwarder": {"claim_size": 20},
    }
    cfg.update(over)
    return cfg


@pytest.fixture
def agent(tmp_path, make_nucleus, sub):
    """A GreengrassAgent on the real client, running in a thread; its nucleus is ``agent.nucleus``."""
    nucleus = make_nucleus(configuration=component_config())
    client = GreengrassCoreIPCClientV2()
    a = GreengrassAgent(client, work_dir=tmp_path, env={"AWS_IOT_THING_NAME": THING})
    a.nucleus = nucleus
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(a.run()), name="agent", daemon=True)
    root_level = logging.getLogger().level
    t.start()
    try:
        assert wait_for(lambda: a.running.is_set() or result), result
        assert nucleus.server.lifecycle.wait_for_state(COMPONENT, "RUNNING", WAIT)
        yield a
    finally:
        a.stop()
        t.join(30)
        client.close()
        logging.getLogger().setLevel(root_level)
    assert result == [0]


def test_the_agent_applies_a_configuration_update_live(agent, sub):
    gw = agent.gateway
    assert sub.wait_for(lambda ms: len(set(keys_of(ms))) == 30, WAIT)  # the readings, through the nucleus
    agent.nucleus.server.config.merge(COMPONENT, [], {"log_level": "DEBUG", "forwarder": {"window": 8}})
    assert agent.wait_for(lambda: agent.updates)
    assert agent.updates == [{"restart": [], "live": ["forwarder.window", "log_level"]}]
    assert agent.gateway is gw and agent.restarts == 0 and gw.forwarder.window == 8
    assert logging.getLogger().level == logging.DEBUG


def test_the_agent_rejects_a_bad_update_with_the_validators_message(agent):
    store = agent.nucleus.server.config
    bad = component_config(forwarder={"window": 0, "backoff_min_s": -1})
    assert store.validate(COMPONENT, bad, "deploy-bad", timeout=WAIT) == ValidityReport(
        "REJECTED", "forwarder.window: 0 is out of range 1..10000\nforwarder.backoff_min_s: -1 must be > 0")
    good = store.validate(COMPONENT, component_config(log_level="DEBUG"), "deploy-good", timeout=WAIT)
    assert good == ValidityReport("ACCEPTED", "the gateway accepts this configuration")
    assert agent.gateway.config.log_level == "INFO" and agent.updates == []  # validating applies nothing
