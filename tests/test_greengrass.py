"""The Greengrass agent against an autospec'd GreengrassCoreIPCClientV2: configuration read,
validated, rejected with the validator's message, applied live or by a clean restart that loses
nothing; lifecycle states; deferred updates; health; weather from IoT Core; model hot swap."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from unittest import mock

import onnx
import pytest
from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2
from awsiot.greengrasscoreipc.model import (
    QOS,
    ComponentUpdatePolicyEvents,
    ConfigurationUpdateEvent,
    ConfigurationUpdateEvents,
    ConfigurationValidityStatus,
    GetConfigurationResponse,
    IoTCoreMessage,
    JsonMessage,
    MQTTMessage,
    PostComponentUpdateEvent,
    PreComponentUpdateEvent,
    SubscriptionResponseMessage,
    ValidateConfigurationUpdateEvent,
    ValidateConfigurationUpdateEvents,
)

from gateway.config import validate
from gateway.errors import ConfigErrors, RetryableError
from gateway.greengrass import COMPONENT, WEATHER_TOPIC, GreengrassAgent
from gateway.messages import decode
from gateway.model import announce
from gateway.model.paths import default_model
from gateway.publishers import MemoryPublisher

THING = "gw-gg-1"
ENV = {"AWS_IOT_THING_NAME": THING}
MODEL = default_model()
N_METERS, N_TICKS = 5, 20
HEALTH = f"dt/meters/gateway/{THING}/health"


def wait_until(predicate, timeout: float = 20.0) -> bool:
    """Poll ``predicate`` until it holds (a condition, not a sleep: returns as soon as it does)."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while time.monotonic() < deadline:
        if predicate():
            return True
        tick.wait(0.02)
    return predicate()


class Nucleus:
    """The nucleus as the agent sees it: an autospec'd client whose subscriptions hand their
    ``on_stream_event`` to the test, and whose configuration the test changes."""

    def __init__(self, config: dict):
        self.ipc = mock.create_autospec(GreengrassCoreIPCClientV2, instance=True)
        self.config = config
        self.handlers: dict[str, object] = {}
        self.ipc.get_configuration.side_effect = lambda **kw: GetConfigurationResponse(
            component_name=COMPONENT, value=copy.deepcopy(self.config))
        for name in ("subscribe_to_validate_configuration_updates", "subscribe_to_configuration_update",
                     "subscribe_to_component_updates", "subscribe_to_iot_core", "subscribe_to_topic"):
            getattr(self.ipc, name).side_effect = self._subscriber(name)

    def _subscriber(self, name: str):
        def subscribe(**kwargs):
            key = kwargs.get("topic_name") or kwargs.get("topic") or name
            self.handlers[key] = kwargs["on_stream_event"]
            return mock.Mock(name=f"{name} response"), mock.Mock(name=f"{name} operation")

        return subscribe

    def states(self) -> list[str]:
        return [c.kwargs["state"] for c in self.ipc.update_state.call_args_list]

    def update(self, **changes) -> None:
        """Change the configuration and tell the agent, as a deployment does."""
        for path, value in changes.items():
            node = self.config
            *parents, last = path.split("__")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        self.handlers["subscribe_to_configuration_update"](ConfigurationUpdateEvents(
            configuration_update_event=ConfigurationUpdateEvent(component_name=COMPONENT, key_path=[])))

    def announce(self, payload: dict) -> None:
        self.handlers[announce.ANNOUNCE_TOPIC](SubscriptionResponseMessage(json_message=JsonMessage(message=payload)))


class Publishers:
    """The publisher factory: one MemoryPublisher per gateway, held (no PUBACKs) when asked."""

    def __init__(self, hold_first: bool = False):
        self.made: list[MemoryPublisher] = []
        self.hold_first = hold_first

    def __call__(self, config) -> MemoryPublisher:
        pub = DroppingPublisher()
        pub.hold = self.hold_first and not self.made
        self.made.append(pub)
        return pub

    def readings(self) -> list[tuple]:
        return [tuple(r[:2]) for p in self.made for m in list(p.messages) if m.topic.endswith("/raw")
                for r in decode(m.payload)["readings"]]


class DroppingPublisher(MemoryPublisher):
    def drop(self) -> None:
        """The link goes: every held publish fails, unacknowledged."""
        with self._lock:
            held, self._held = self._held, []
        for _, fut in held:
            fut.set_exception(RetryableError("connection lost"))


def component_config(**over) -> dict:
    cfg = {
        "thing": "",
        "buffer": {"path": "buffer.db"},
        "sources": [{"type": "simulator", "name": "sim", "meters": N_METERS, "count": N_TICKS, "speed": None,
                     "start": "2026-01-01T00:00:00Z"}],
        "publisher": {"type": "memory"},
        "forwarder": {"claim_size": 20},
        "accessControl": {"aws.greengrass.ipc.mqttproxy": {"policy": {"operations": ["*"]}}},
    }
    cfg.update(over)
    return cfg


def copy_model(dst: Path, version: str | None = None) -> Path:
    shutil.copytree(MODEL, dst)
    if version is not None:
        m = onnx.load(dst / "model.onnx")
        for p in m.metadata_props:
            if p.key == "model_version":
                p.value = version
        onnx.save(m, dst / "model.onnx")
        manifest = json.loads((dst / "manifest.json").read_text())
        manifest["version"] = version
        (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


class Running:
    """An agent running in a thread, stopped cleanly at the end of the test."""

    def __init__(self, tmp_path: Path, config: dict, publishers: Publishers | None = None, **kwargs):
        self.nucleus = Nucleus(config)
        self.publishers = publishers or Publishers()
        self.agent = GreengrassAgent(self.nucleus.ipc, publisher_factory=self.publishers, work_dir=tmp_path,
                                     env=ENV, **kwargs)
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, name="agent", daemon=True)

    def _run(self) -> None:
        self.code = self.agent.run()

    def start(self, wait: bool = True) -> "Running":
        self.thread.start()
        if wait:
            assert wait_until(lambda: self.agent.running.is_set() or self.code is not None)
            assert self.code is None, "the agent did not start"
        return self

    def stop(self) -> int | None:
        self.agent.stop()
        self.thread.join(30)
        assert not self.thread.is_alive()
        return self.code


@pytest.fixture
def running(tmp_path):
    started: list[Running] = []

    def make(config: dict | None = None, *, wait: bool = True, **kwargs) -> Running:
        r = Running(tmp_path, config if config is not None else component_config(), **kwargs)
        started.append(r)
        return r.start(wait=wait)

    yield make
    for r in started:
        if r.thread.is_alive():
            r.stop()


def all_readings() -> set[tuple]:
    from gateway.sources.simulator import SimulatorSource

    src = SimulatorSource("sim", meters=N_METERS, seed=1, count=N_TICKS, speed=None, start_ms=1_767_225_600_000)
    return {(r.meter_id, r.ts) for b in src.batches(None, threading.Event()) for r in b.readings}


# ---------------------------------------------------------------- start and configuration


def test_start_reads_the_configuration_reports_running_and_asks_for_a_model(running):
    r = running()
    gw = r.agent.gateway
    assert r.nucleus.states() == ["RUNNING"]
    assert gw.config.thing == THING  # empty in the configuration: the core device's
    assert "accessControl" not in gw.config.raw
    assert Path(gw.config.buffer["path"]) == r.agent.work_dir / "buffer.db"
    r.nucleus.ipc.get_configuration.assert_called_with(key_path=[])
    r.nucleus.ipc.subscribe_to_iot_core.assert_called_once()
    assert r.nucleus.ipc.subscribe_to_iot_core.call_args.kwargs["topic_name"] == WEATHER_TOPIC == "dt/weather/+/observations"
    assert r.nucleus.ipc.subscribe_to_iot_core.call_args.kwargs["qos"] == QOS.AT_LEAST_ONCE
    request = r.nucleus.ipc.publish_to_topic.call_args
    assert request.kwargs["topic"] == announce.REQUEST_TOPIC
    assert request.kwargs["publish_message"].json_message.message == {}
    assert wait_until(lambda: gw.idle())
    assert set(r.publishers.readings()) == all_readings()
    assert r.stop() == 0
    assert r.nucleus.states() == ["RUNNING"]


def test_a_bad_configuration_never_starts_the_gateway(tmp_path, caplog):
    cfg = component_config(buffer={"path": "buffer.db", "policy": "drop_newest"})
    nucleus = Nucleus(cfg)
    pubs = Publishers()
    agent = GreengrassAgent(nucleus.ipc, publisher_factory=pubs, work_dir=tmp_path, env=ENV)
    with caplog.at_level(logging.ERROR):
        assert agent.run() == 1
    assert nucleus.states() == ["ERRORED"]
    assert pubs.made == [] and agent.gateway is None
    assert "buffer.policy: 'drop_newest' is not one of drop_oldest, reject_newest" in caplog.text
    assert not (tmp_path / "buffer.db").exists()


def test_an_empty_thing_without_the_nucleus_environment_is_named(tmp_path, caplog):
    nucleus = Nucleus(component_config())
    agent = GreengrassAgent(nucleus.ipc, publisher_factory=Publishers(), work_dir=tmp_path, env={})
    with caplog.at_level(logging.ERROR):
        assert agent.run() == 1
    assert "thing: is empty, and AWS_IOT_THING_NAME is not set" in caplog.text
    assert nucleus.states() == ["ERRORED"]


def validity_event(configuration: dict, deployment_id: str) -> ValidateConfigurationUpdateEvents:
    return ValidateConfigurationUpdateEvents(validate_configuration_update_event=ValidateConfigurationUpdateEvent(
        configuration=configuration, deployment_id=deployment_id))


def test_a_bad_update_is_rejected_with_the_validators_message(running, tmp_path):
    r = running()
    bad = component_config(forwarder={"window": 0, "backoff_min_s": -1}, buffer={"path": "buffer.db"})
    expected = {k: v for k, v in bad.items() if k != "accessControl"} | {"thing": THING}
    with pytest.raises(ConfigErrors) as exc:
        validate(expected, base=tmp_path)
    handler = r.nucleus.handlers["subscribe_to_validate_configuration_updates"]
    handler(validity_event(bad, "deploy-bad"))
    report = r.nucleus.ipc.send_configuration_validity_report.call_args.kwargs["configuration_validity_report"]
    assert report.status == ConfigurationValidityStatus.REJECTED
    assert report.deployment_id == "deploy-bad"
    assert report.message == str(exc.value)
    assert report.message == "forwarder.window: 0 is out of range 1..10000\nforwarder.backoff_min_s: -1 must be > 0"

    handler(validity_event(component_config(greengrass={"health_every_s": 0}), "deploy-bad-2"))
    report = r.nucleus.ipc.send_configuration_validity_report.call_args.kwargs["configuration_validity_report"]
    assert (report.status, report.message) == (ConfigurationValidityStatus.REJECTED,
                                               "greengrass.health_every_s: 0 must be > 0")

    handler(validity_event(component_config(log_level="DEBUG"), "deploy-good"))
    report = r.nucleus.ipc.send_configuration_validity_report.call_args.kwargs["configuration_validity_report"]
    assert (report.status, report.deployment_id) == (ConfigurationValidityStatus.ACCEPTED, "deploy-good")
    assert r.agent.gateway.config.log_level == "INFO"  # validating applies nothing


def test_a_configuration_update_is_applied_live(running):
    r = running()
    gw = r.agent.gateway
    root = logging.getLogger()
    level = root.level
    try:
        r.nucleus.update(log_level="DEBUG", forwarder__window=8, forwarder__batch_size=50,
                         greengrass={"health_every_s": 5})
        assert r.agent.wait_for(lambda: r.agent.updates)
        assert r.agent.updates == [{"restart": [], "live": ["forwarder.batch_size", "forwarder.window", "log_level",
                                                          "greengrass.health_every_s"]}]
        assert r.agent.gateway is gw and r.agent.restarts == 0
        assert (gw.forwarder.window, gw.forwarder.batch_size) == (8, 50)
        assert root.level == logging.DEBUG
        assert r.agent.settings.greengrass["health_every_s"] == 5
    finally:
        root.setLevel(level)


def test_a_change_that_needs_a_restart_restarts_cleanly_and_loses_nothing(running):
    pubs = Publishers(hold_first=True)
    r = running(publishers=pubs)
    first = r.agent.gateway
    # every reading is stored, and some are in flight, unacknowledged
    assert wait_until(lambda: first.sources_done and first.in_flight() > 0)
    assert pubs.readings() == []
    r.nucleus.update(buffer__live_window_s=600)
    assert wait_until(lambda: first.stop_event.is_set())
    pubs.made[0].drop()  # the old gateway's publishes never get their PUBACK
    assert r.agent.wait_for(lambda: r.agent.restarts == 1)
    second = r.agent.gateway
    assert second is not first and second.config.buffer["live_window_ms"] == 600_000
    assert r.agent.updates == [{"restart": ["buffer.live_window_ms"], "live": []}]
    assert wait_until(lambda: second.idle())
    got = pubs.readings()
    assert set(got) == all_readings() and len(got) >= len(all_readings())
    assert [m for m in pubs.made[0].messages if m.topic.endswith("/raw")] == []  # all came after the restart
    assert r.nucleus.states() == ["RUNNING"]


# ---------------------------------------------------------------- component updates


def component_update(pre: bool, deployment_id: str = "deploy-7") -> ComponentUpdatePolicyEvents:
    if pre:
        return ComponentUpdatePolicyEvents(pre_update_event=PreComponentUpdateEvent(deployment_id=deployment_id,
                                                                                    is_ggc_restarting=False))
    return ComponentUpdatePolicyEvents(post_update_event=PostComponentUpdateEvent(deployment_id=deployment_id))


def test_an_update_is_deferred_while_messages_are_in_flight_then_let_go(running):
    pubs = Publishers(hold_first=True)
    r = running(component_config(forwarder={"claim_size": 20, "window": 2}), publishers=pubs)
    gw, agent = r.agent.gateway, r.agent
    handler = r.nucleus.handlers["subscribe_to_component_updates"]
    assert wait_until(lambda: gw.in_flight() > 0)
    in_flight = gw.in_flight()

    done = agent.actions_done
    handler(component_update(pre=True))
    assert agent.wait_for(lambda: agent.actions_done > done)
    r.nucleus.ipc.defer_component_update.assert_called_once()
    kwargs = r.nucleus.ipc.defer_component_update.call_args.kwargs
    assert kwargs["deployment_id"] == "deploy-7" and kwargs["recheck_after_ms"] == 10_000
    assert kwargs["message"] == (f"{in_flight} messages await their PUBACK; the gateway holds new work "
                                 "and finishes them first")
    assert gw.forwarder.window == 0  # no new claims while the update waits

    pubs.made[0].hold = False
    pubs.made[0].release()  # the PUBACKs arrive
    assert wait_until(lambda: gw.in_flight() == 0)
    done = agent.actions_done
    handler(component_update(pre=True))  # the nucleus asks again: settled, let it go
    assert agent.wait_for(lambda: agent.actions_done > done)
    assert r.nucleus.ipc.defer_component_update.call_count == 2  # the second: recheck_after_ms=0, ready
    assert r.nucleus.ipc.defer_component_update.call_args.kwargs["recheck_after_ms"] == 0
    assert gw.in_flight() == 0 and gw.buffer.pending() > 0  # held: nothing new went out

    handler(component_update(pre=False))  # the deployment did not touch us: forwarding resumes
    assert wait_until(lambda: gw.idle())
    assert set(pubs.readings()) == all_readings()
    assert r.stop() == 0
    assert r.nucleus.states() == ["RUNNING"]


def test_nothing_in_flight_lets_the_update_go_at_once(running):
    r = running(hold_s=0.2)
    gw = r.agent.gateway
    assert wait_until(lambda: gw.idle())
    done = r.agent.actions_done
    r.nucleus.handlers["subscribe_to_component_updates"](component_update(pre=True))
    assert r.agent.wait_for(lambda: r.agent.actions_done > done)
    # recheck_after_ms=0: the nucleus may go on now, rather than wait out its update timeout
    r.nucleus.ipc.defer_component_update.assert_called_once_with(
        deployment_id="deploy-7", recheck_after_ms=0, message="nothing in flight: ready for the update")
    assert r.agent.health()["state"] == "held"
    # no PostComponentUpdateEvent and no SIGTERM (the deployment went elsewhere): claims resume
    assert wait_until(lambda: gw.forwarder.window == 64 and r.agent.health()["state"] == "running")
    assert r.stop() == 0  # SIGTERM from the nucleus: a clean stop


# ---------------------------------------------------------------- health


def test_health_is_published_with_buffer_forwarder_stages_and_weather(running):
    r = running(component_config(greengrass={"health_every_s": 0.05}))
    gw = r.agent.gateway
    assert wait_until(lambda: gw.idle())
    pub = r.publishers.made[0]
    assert wait_until(lambda: sum(m.topic == HEALTH for m in pub.messages) >= 2)  # periodic
    health = r.agent.health()
    b = health["buffer"]
    for key in ("pending", "oldest_pending_age_s", "ingest_per_h", "delivered_per_h", "autonomy_hours",
                "evicted_oldest", "rejected_newest", "used_bytes", "budget_bytes", "quarantine", "delivered"):
        assert key in b, key
    assert b["pending"] == 0 and b["delivered"] == N_METERS * N_TICKS
    assert health["thing"] == THING and health["component"] == COMPONENT and health["state"] == "running"
    assert health["forwarder"]["in_flight_messages"] == 0 and health["forwarder"]["published"] > 0
    assert health["stages"]["forwarder"]["state"] == "running"
    assert health["stages"]["source sim"]["state"] == "finished"
    assert health["model"] is None  # no model configured
    assert health["weather"]["topic"] == WEATHER_TOPIC
    last = json.loads([m for m in pub.messages if m.topic == HEALTH][-1].payload)
    assert set(last) == set(health) and last["thing"] == THING and "pending" in last["buffer"]


# ---------------------------------------------------------------- weather


def weather_message(topic: str, payload) -> IoTCoreMessage:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return IoTCoreMessage(message=MQTTMessage(topic_name=topic, payload=body))


def test_weather_from_iot_core_feeds_the_table_and_bad_messages_are_dropped(running, caplog):
    r = running()
    on_weather = r.nucleus.handlers[WEATHER_TOPIC]
    ts = 1_767_225_600_000
    on_weather(weather_message("dt/weather/15/observations", {"timestamp": ts, "air_temperature": -1.5}))
    on_weather(weather_message("dt/weather/3/observations",
                               [{"site_id": 3, "timestamp": ts, "wind_speed": 2.0}, {"site_id": 3, "timestamp": "x"}]))
    with caplog.at_level(logging.WARNING, logger="gateway.greengrass"):
        on_weather(weather_message("dt/weather/4/observations", b"{not json"))
        on_weather(weather_message("dt/weather/4/observations", {"site_id": 5, "timestamp": ts}))
    got = r.agent.weather.lookup(["15", "3"], [ts + 60_000, ts])
    assert got["air_temperature"][0] == -1.5 and got["wind_speed"][1] == 2.0
    assert r.agent.weather.sites() == ["3", "15"]
    counts = r.agent.weather_counts
    assert (counts["received"], counts["used"], counts["rejected"]) == (4, 2, 3)
    assert "dt/weather/4/observations: site_id: '5' is not the topic's site '4'" == counts["last_error"]
    assert "weather message on dt/weather/4/observations dropped: payload: not JSON" in caplog.text
    assert r.agent.gateway.dead() == {} and r.agent.health()["weather"]["rejected"] == 3


# ---------------------------------------------------------------- the model


def announcement(path: Path, model: str) -> dict:
    return {"component": announce.COMPONENT, "version": "1.0.0", "model": model, "path": str(path)}


def test_announced_models_are_swapped_live_and_a_broken_one_is_refused(running, tmp_path):
    v1 = copy_model(tmp_path / "packages" / "1.0.0" / "ashrae-lgbm")
    v2 = copy_model(tmp_path / "packages" / "1.0.1" / "ashrae-lgbm", version="test-v2")
    broken = copy_model(tmp_path / "packages" / "1.0.2" / "ashrae-lgbm", version="test-broken")
    (broken / "model.onnx").write_bytes(b"not an onnx model")

    # no model.path: the gateway waits for the model component's announcement
    r = running(component_config(model={"threshold": 3.5}), wait=False)
    assert wait_until(lambda: announce.ANNOUNCE_TOPIC in r.nucleus.handlers)
    r.nucleus.announce(announcement(v1, "v1"))
    assert wait_until(lambda: r.agent.running.is_set())
    gw = r.agent.gateway
    holder = gw.scorer.holder
    v1_version = holder.version
    assert holder.path == v1 and holder.check_every_s is None  # announcements drive it, no polling
    assert gw.scorer.weather is r.agent.weather

    done = r.agent.actions_done
    r.nucleus.announce(announcement(v2, "test-v2"))
    assert r.agent.wait_for(lambda: r.agent.actions_done > done and holder.version == "test-v2")
    assert r.agent.gateway is gw and r.agent.restarts == 0 and holder.path == v2

    done = r.agent.actions_done
    r.nucleus.announce(announcement(broken, "test-broken"))
    assert r.agent.wait_for(lambda: r.agent.actions_done > done)
    assert holder.version == "test-v2" and holder.path == v2
    assert holder.last_error.startswith("kept test-v2: ") and "cannot load" in holder.last_error
    model = r.agent.health()["model"]
    assert model["version"] == "test-v2" and "cannot load" in model["last_error"]
    assert model["announced"]["path"] == str(broken)

    r.nucleus.announce({"component": "someone.Else", "version": "1", "model": "m", "path": str(v1)})
    assert holder.version == "test-v2"  # not ours: ignored

    r.nucleus.update(model__threshold=5.0)  # live
    assert r.agent.wait_for(lambda: len(r.agent.updates) == 1)
    assert r.agent.updates[0]["restart"] == [] and "model.threshold" in r.agent.updates[0]["live"]
    assert r.agent.gateway is gw and gw.scorer.stats.threshold == 5.0 and holder.version == "test-v2"

    # a restart keeps the model in use, not the refused one, nor the config's
    r.nucleus.update(buffer__live_window_s=600)
    assert r.agent.wait_for(lambda: r.agent.restarts == 1)
    assert r.agent.gateway.scorer.holder.version == "test-v2" and v1_version != "test-v2"
    assert r.stop() == 0


def test_no_announcement_in_time_is_an_error_that_names_it(tmp_path, caplog):
    nucleus = Nucleus(component_config(model={}, greengrass={"model_wait_s": 0.05}))
    agent = GreengrassAgent(nucleus.ipc, publisher_factory=Publishers(), work_dir=tmp_path, env=ENV)
    with caplog.at_level(logging.ERROR):
        assert agent.run() == 1
    assert ("model.path: is not set, and org.metergateway.Model announced no model on "
            "metergateway/model/announce within 0.05 s") in caplog.text
    assert nucleus.states() == ["ERRORED"]


def test_a_dead_gateway_reports_errored_and_exits_1(running):
    pubs = Publishers()
    r = running(publishers=pubs)
    r.agent.gateway.health.set("forwarder", "dead", "BufferCorrupt: test")
    r.thread.join(10)
    assert r.code == 1
    assert r.nucleus.states() == ["RUNNING", "ERRORED"]


# ---------------------------------------------------------------- the components' entry points


@pytest.mark.parametrize("component", ["gateway", "model"])
def test_component_entry_points_do_nothing_at_import(component):
    path = Path(__file__).parent.parent / "components" / component / "main.py"
    spec = importlib.util.spec_from_file_location(f"component_{component}_main", path)
    module = importlib.util.module_from_spec(spec)
    with mock.patch("awsiot.greengrasscoreipc.clientv2.GreengrassCoreIPCClientV2") as client:
        spec.loader.exec_module(module)
    client.assert_not_called()
    assert callable(module.main)
    assert len(path.read_text().splitlines()) <= 30


def test_publisher_type_ipc_publishes_through_the_agents_own_client(tmp_path):
    from concurrent.futures import Future

    from awsiot.greengrasscoreipc.model import ConnectionStatus, ConnectionStatusEvent, IoTCoreConnectionStatusEvent

    from gateway.publishers.ipc import IpcPublisher
    from gateway.greengrass import ipc_publisher

    def accepted(**kwargs):
        fut = Future()
        fut.set_result(None)
        return fut

    nucleus = Nucleus(component_config(publisher={"type": "ipc"}))
    def status_stream(**kwargs):  # IoT Core is connected, as the nucleus says at once
        kwargs["on_stream_event"](IoTCoreConnectionStatusEvent(
            connection_status_event=ConnectionStatusEvent(status=ConnectionStatus.CONNECTED)))
        return mock.Mock(), mock.Mock()

    nucleus.ipc.subscribe_to_iot_core_connection_status.side_effect = status_stream
    nucleus.ipc.publish_to_iot_core_async.side_effect = accepted
    agent = GreengrassAgent(nucleus.ipc, work_dir=tmp_path, env=ENV)
    assert agent.publisher_factory.__qualname__ == ipc_publisher(nucleus.ipc).__qualname__
    t = threading.Thread(target=agent.run)
    t.start()
    try:
        assert wait_until(lambda: agent.running.is_set())
        assert isinstance(agent.gateway.publisher, IpcPublisher)
        assert wait_until(lambda: agent.gateway.idle())
        topics = {c.kwargs["topic_name"] for c in nucleus.ipc.publish_to_iot_core_async.call_args_list}
        assert HEALTH in topics and any(t.endswith(f"/{THING}/raw") for t in topics)
    finally:
        agent.stop()
        t.join(30)
    assert nucleus.states() == ["RUNNING"]
