"""The real components, built by ``gateway build``, on the local nucleus with mosquitto as IoT Core.

One nucleus for the module, ``gateway nucleus --broker --certs --config`` in its own process,
with the Disk spooler and unlimited retries that ``delivery: handoff`` needs. Both components
are built once (full wheelhouses, ``--version 0.1.0``, plus a model 0.2.0 whose model has
another version) and deployed with the greengrass-cli verbs; their Install steps build their
venvs for real. A subscriber on the broker counts what arrives by reading key ``(meter, ts)``.
The tests share the running gateway, in order: the bundled sample (handoff), a rejected
configuration, receipt delivery, and a model update under load. Then the wiring of the bridge
itself: a nucleus in this process with the real bridge to mosquitto (connection status over IPC
across a cut link), and what ``gateway nucleus`` says about bad certificates and configurations.
A component that crashes, or keeps crashing, is tests/test_nucleus_runner.py's.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time

import pytest

from e2e_helpers import (GATEWAY, MODEL, SAMPLE, Delivered, NucleusProcess, build_components, cli, component_pids,
                         log_time)
from emulator.broker import Mosquitto
from gateway.publishers.mqtt import MqttSubscriber
from gateway.sources.replay import ReplaySource
from gateway.sources.simulator import SimulatorSource
from nucleus_helpers import remove, short_dir

from conftest import SUBSCRIBER, THING

GATEWAY_MAIN = "components/gateway/main.py"
TIMINGS: dict[str, float] = {}
NUCLEUS_CONFIG = """\
# greengrass's config.yaml shape: the nucleus's own configuration
services:
  aws.greengrass.Nucleus:
    configuration:
      mqtt:
        maxPublishRetry: -1
        spooler:
          storageType: Disk
          pluginName: aws.greengrass.DiskSpooler
          maxSizeInBytes: 104857600
          keepQos0WhenOffline: false
"""


def merge(config: dict) -> str:
    return json.dumps({GATEWAY: {"MERGE": config}})


@pytest.fixture(scope="module", autouse=True)
def timings(request):
    """What the module measured, written to the terminal at its end."""
    yield TIMINGS
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not TIMINGS:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for k, v in TIMINGS.items():
            reporter.write_line(f"e2e timing: {k}: {v:.2f}" if isinstance(v, float) else f"e2e timing: {k}: {v}")


@pytest.fixture(scope="module")
def base():
    d = short_dir()
    yield d
    remove(d)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    t = time.monotonic()
    b = build_components(tmp_path_factory.mktemp("e2e-build"))
    TIMINGS["build, both components and model 0.2.0 (s)"] = time.monotonic() - t
    return b


@pytest.fixture(scope="module")
def iot(base, certs):
    with Mosquitto(base / "broker", certs) as broker:
        yield broker


@pytest.fixture(scope="module")
def cloud(iot, certs):
    """A subscriber on the broker collecting dt/#, for the whole module."""
    client = certs.client(SUBSCRIBER)
    sub = MqttSubscriber("localhost", SUBSCRIBER, client.cert, client.key, certs.ca, port=iot.port,
                         topic_filter="dt/#")
    sub.start()
    yield sub
    sub.close()


@pytest.fixture(scope="module")
def nucleus(base, iot, certs):
    (base / "nucleus.yaml").write_text(NUCLEUS_CONFIG)
    n = NucleusProcess(base / "root", THING, iot.port, certs.ca.parent, base / "nucleus.yaml").start()
    yield n
    assert n.stop() == 0, n.output.read_text()


def sample_keys() -> set:
    expected, rejected = set(), 0
    for batch in ReplaySource("sample", SAMPLE).batches(None, threading.Event()):
        expected |= {(r.meter_id, r.ts) for r in batch.readings}
        rejected += len(batch.rejected)
    assert (rejected, len(expected)) == (1, 11_133)  # one truncated row, quarantined
    return expected


def simulated_keys(**kwargs) -> set:
    src = SimulatorSource("keys", speed=None, **kwargs)
    return {(r.meter_id, r.ts) for b in src.batches(None, threading.Event()) for r in b.readings}


@pytest.fixture(scope="module")
def deployed(nucleus, builds, cloud):
    """Both components deployed in one local deployment; the gateway replays the sample."""
    work = nucleus.work(GATEWAY)
    work.mkdir(parents=True)
    shutil.copy2(SAMPLE, work / "sample.csv.gz")  # a relative path is relative to the work folder
    config = {"sources": [{"type": "replay", "name": "sample", "path": "sample.csv.gz"}],
              "publisher": {"delivery": "handoff"}, "greengrass": {"defer_recheck_s": 1}}
    t0 = time.monotonic()
    d, out = nucleus.deploy(builds, "--merge", f"{MODEL}=0.1.0", "--merge", f"{GATEWAY}=0.1.0",
                            "--update-config", merge(config))
    TIMINGS["deployment to SUCCEEDED, first Install included (s)"] = time.monotonic() - t0
    assert f"{d}: SUCCEEDED" in out, out
    log = nucleus.log(GATEWAY)
    start = log_time(log, r"shell-runner-start.*lifecycle\.Install")
    TIMINGS["gateway Install step, full wheelhouse (s)"] = log_time(log, "Install script exited") - start
    TIMINGS["gateway Install end to RUNNING (s)"] = log_time(log, "newState=RUNNING") - log_time(
        log, "Install script exited")
    mlog = nucleus.log(MODEL)
    TIMINGS["model Install step (s)"] = log_time(mlog, "Install script exited") - log_time(
        mlog, r"shell-runner-start.*lifecycle\.Install")
    pids = component_pids(work, GATEWAY_MAIN)
    assert len(pids) == 1, pids
    return {"pid": pids[0], "t0": t0}


def gateway_pid(nucleus) -> int:
    pids = component_pids(nucleus.work(GATEWAY), GATEWAY_MAIN)
    assert len(pids) == 1, pids
    return pids[0]


def test_the_built_components_install_for_real_and_deliver_the_whole_sample(nucleus, deployed, cloud, builds):
    assert builds.wheels["gateway"] > 10 and builds.wheels["model"] == 4  # the full wheelhouse; the model's four
    assert nucleus.state(GATEWAY) == "RUNNING" and nucleus.state(MODEL) == "RUNNING"
    # the recipe's variables were interpolated: the Install ran the unpacked artifact's install.py
    unpacked = nucleus.root / "packages" / "artifacts-unarchived" / GATEWAY / "0.1.0" / "meter-gateway"
    install = [x for x in nucleus.log(GATEWAY).read_text().splitlines() if "lifecycle.Install" in x
               and "shell-runner-start" in x][0]
    assert f"python3 {unpacked}/gateway/install.py --wheelhouse {unpacked}/wheelhouse" in install
    assert f"--venv {nucleus.work(GATEWAY)}/venv" in install and "{" not in install.split("'")[1]
    assert (nucleus.work(GATEWAY) / "venv" / "bin" / "python").exists()
    # the nucleus configuration was read: its Disk spooler
    assert (nucleus.root / "work" / "aws.greengrass.DiskSpooler" / "spooler.db").is_file()

    expected = sample_keys()
    got = Delivered(cloud)
    assert cloud.wait_for(got.covers(expected), timeout=90), got.missing(expected)
    TIMINGS["sample, deployment start to every reading raw and scored (s)"] = time.monotonic() - deployed["t0"]
    assert {v for k in expected for v in got.scored[k]} == {builds.model_versions["0.1.0"]}
    assert gateway_pid(nucleus) == deployed["pid"]


def test_a_bad_configuration_is_rejected_with_the_validators_message_and_the_gateway_keeps_running(
        nucleus, deployed, cloud, builds):
    live = {"sources": [{"type": "simulator", "name": "live", "meters": 3, "interval_s": 1, "speed": 1.0}]}
    d, out = nucleus.deploy(builds, "--update-config", merge(live))
    assert f"{d}: SUCCEEDED" in out, out

    d, out = nucleus.deploy(builds, "--update-config", merge({"buffer": {"policy": "drop_newest"}}), ok=False)
    failed_at_ms = int(time.time() * 1000)
    status = cli("deployment", "status", "--root", str(nucleus.root), d)
    assert f"{d}: FAILED" in status
    assert ("Failure cause: Components reported that their to-be-deployed configuration is invalid "
            f"{{ name = {GATEWAY}, message = buffer.policy: 'drop_newest' is not one of drop_oldest, "
            "reject_newest }") in status, status

    listed = cli("component", "list", "--root", str(nucleus.root))
    config = json.loads(re.search(rf"Component Name: {GATEWAY}\n.*\n    State: RUNNING\n    Configuration: (.*)\n",
                                  listed).group(1))
    assert config["buffer"]["policy"] == "drop_oldest" and config["sources"] == live["sources"]
    assert gateway_pid(nucleus) == deployed["pid"]
    # still delivering: live readings newer than the rejection arrive, raw and scored
    got = Delivered(cloud)

    def fresh(messages) -> bool:
        got.update(messages)
        newer = {k for k in got.raw if k[1] > failed_at_ms + 1000}
        return bool(newer & got.scored.keys())
    assert cloud.wait_for(fresh, timeout=30), "nothing delivered after the rejected deployment"


def test_receipt_delivery_through_the_receipt_rule(nucleus, deployed, cloud, builds, iot, certs):
    from emulator.receipts import ReceiptRule

    client = certs.client(SUBSCRIBER)
    rule = ReceiptRule("localhost", iot.port, client.cert, client.key, certs.ca).start()
    try:
        assert rule.wait_subscribed(10)
        sim = {"meters": 20, "interval_s": 60, "seed": 7, "count": 50, "start_ms": 1_704_067_200_000}  # 2024
        config = {"sources": [{"type": "simulator", "name": "receipts", "meters": 20, "interval_s": 60, "seed": 7,
                               "count": 50, "speed": None, "start": "2024-01-01T00:00:00Z"}],
                  "publisher": {"delivery": "receipt", "receipt_timeout_s": 30},
                  "greengrass": {"health_every_s": 1}}
        d, out = nucleus.deploy(builds, "--update-config", merge(config))
        assert f"{d}: SUCCEEDED" in out, out
        expected = simulated_keys(**sim)
        got = Delivered(cloud)
        assert cloud.wait_for(got.covers(expected), timeout=60), got.missing(expected)
        assert rule.received >= 2 * len(expected) // 100

        def settled(messages) -> bool:  # acknowledged in the buffer: only by receipts
            for m in reversed(messages):
                if m.topic.endswith("/health"):
                    h = json.loads(m.payload)
                    return h["buffer"]["pending"] == 0 and h["forwarder"]["in_flight_messages"] == 0
            return False
        assert cloud.wait_for(settled, timeout=30)
    finally:
        rule.close()
    assert gateway_pid(nucleus) == deployed["pid"]


def test_a_new_model_under_load_swaps_live_with_nothing_lost_or_scored_twice(nucleus, deployed, cloud, builds):
    old, new = builds.model_versions["0.1.0"], builds.model_versions["0.2.0"]
    # 100,000 readings at 5,000 a second: 20 s of ingest, each reading scored as it is stored,
    # and the new model's deployment (offer, Install, start, announcement) in the middle of it
    sim = {"meters": 100, "interval_s": 60, "seed": 3, "count": 1000, "start_ms": 1_735_689_600_000}  # 2025
    config = {"sources": [{"type": "simulator", "name": "load", "meters": 100, "interval_s": 60, "seed": 3,
                           "count": 1000, "speed": 3000, "start": "2025-01-01T00:00:00Z"}],
              "publisher": {"delivery": "handoff"}}
    expected = simulated_keys(**sim)
    got = Delivered(cloud)
    t_load = time.monotonic()
    d, out = nucleus.deploy(builds, "--update-config", merge(config))
    assert f"{d}: SUCCEEDED" in out, out
    # under load: the first scored readings of the new source are out, and more are coming
    assert cloud.wait_for(lambda ms: len(got.update(ms).scored.keys() & expected) >= 1000, timeout=60)
    t = time.monotonic()
    d, out = nucleus.deploy(builds, "--merge", f"{MODEL}=0.2.0")
    assert f"{d}: SUCCEEDED" in out, out
    TIMINGS["model 0.2.0 deployment, Install included (s)"] = time.monotonic() - t
    assert cloud.wait_for(got.covers(expected), timeout=120), got.missing(expected)
    TIMINGS["load, 100,000 readings from the source's start to every one raw and scored (s)"] = \
        time.monotonic() - t_load
    assert gateway_pid(nucleus) == deployed["pid"]  # not restarted
    versions = {k: set(got.scored[k]) for k in expected}
    twice = {k: v for k, v in versions.items() if len(v) != 1}
    assert not twice, f"{len(twice)} readings scored by both models, e.g. {list(twice.items())[:3]}"
    used = {v for vs in versions.values() for v in vs}
    swaps = [x for x in nucleus.log(GATEWAY).read_text().splitlines() if "model" in x.lower()][-8:]
    assert used == {old, new}, f"{used}\n" + "\n".join(swaps)  # the swap came while the readings were being scored
    TIMINGS["load readings scored by the new model"] = f"{sum(v == {new} for v in versions.values())} of {len(expected)}"
    TIMINGS["load readings delivered more than once (raw, scored)"] = (
        f"{sum(got.raw[k] > 1 for k in expected)}, {sum(len(got.scored[k]) > 1 for k in expected)}")
    assert nucleus.state(GATEWAY) == "RUNNING" and nucleus.state(MODEL) == "RUNNING"


# ---------------------------------------------------------------- the bridge wiring itself


def test_the_nucleus_bridges_to_the_broker_and_streams_its_connection_status(link, certs, subscriber, monkeypatch):
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

    from emulator.nucleus.kernel import Endpoint, Nucleus

    base = short_dir()
    endpoint = Endpoint.from_certs("localhost", link.port, certs.ca.parent, THING)  # a relay the test can cut
    config = {"mqtt": {"spooler": {"storageType": "Disk", "maxSizeInBytes": 1_048_576}, "maxInFlightPublishes": 10}}
    acl = {"aws.greengrass.ipc.mqttproxy": {"t:pub": {"operations": ["aws.greengrass#PublishToIoTCore"],
                                                      "resources": ["dt/meters/+/{iot:thingName}/raw"]}}}
    try:
        with Nucleus(base / "root", THING, endpoint=endpoint, config=config,
                     bridge_options={"min_reconnect_delay": 0.05, "max_reconnect_delay": 0.5}) as n:
            spool = n.bridge.spool_config
            assert (spool.storage_type, spool.max_size_bytes, n.bridge.max_in_flight) == ("Disk", 1_048_576, 10)
            assert spool.path == n.root / "work" / "aws.greengrass.DiskSpooler" / "spooler.db"
            assert json.loads(n.config_file.read_text()) == config
            assert n.bridge.wait_connected(10)
            n.server.register_component("t.C", access_control=acl)
            for key, value in n.server.environment("t.C").items():
                monkeypatch.setenv(key, value)
            ipc = GreengrassCoreIPCClientV2()
            events: list[str] = []
            changed = threading.Condition()

            def on_status(event) -> None:
                with changed:
                    events.append(event.connection_status_event.status)
                    changed.notify_all()

            def saw(*states: str) -> bool:
                with changed:
                    return changed.wait_for(lambda: events == list(states), 20)
            ipc.subscribe_to_iot_core_connection_status(on_stream_event=on_status)
            assert saw("CONNECTED")
            topic = f"dt/meters/s1/{THING}/raw"
            ipc.publish_to_iot_core(topic_name=topic, qos="1", payload=b'{"n": 1}')
            assert subscriber.wait_for(lambda ms: any(m.topic == topic for m in ms), 10)
            link.cut()
            assert saw("CONNECTED", "DISCONNECTED")
            ipc.publish_to_iot_core(topic_name=topic, qos="1", payload=b'{"n": 2}')  # spooled, offline
            link.restore()
            assert saw("CONNECTED", "DISCONNECTED", "CONNECTED")
            assert subscriber.wait_for(lambda ms: any(m.payload == b'{"n": 2}' for m in ms), 20)
            ipc.close()
    finally:
        remove(base)


def test_gateway_nucleus_says_what_is_wrong_with_its_broker_certs_or_config(tmp_path, certs):
    from emulator.nucleus.kernel import read_config

    root = short_dir()
    try:
        out = cli("--root", str(root), "--thing", THING, "--broker", "localhost:1", "--certs", str(tmp_path), ok=False)
        assert f"error: --certs: {tmp_path}/client-{THING}.crt is missing" in out
        bad = tmp_path / "nucleus.json"
        bad.write_text('{"mqtt": {"spooler": {"storageType": "Flash"}}}')
        out = cli("--root", str(root), "--thing", THING, "--broker", "localhost:1", "--certs", str(certs.ca.parent),
                  "--config", str(bad), ok=False)
        assert f"error: --config {bad}: mqtt.spooler.storageType: 'Flash' is not one of Memory, Disk" in out
        bad.write_text('{"mqtt": {"maxInflight": 3}}')
        out = cli("--root", str(root), "--thing", THING, "--config", str(bad), ok=False)
        assert "mqtt.maxInflight: unknown key" in out
    finally:
        remove(root)
    (tmp_path / "config.yaml").write_text(NUCLEUS_CONFIG)
    assert read_config(tmp_path / "config.yaml")["mqtt"]["spooler"]["storageType"] == "Disk"
