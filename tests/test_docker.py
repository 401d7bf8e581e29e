"""Docker for real: the images built from nothing on our own dockerd, the demo and the gateway in them.

The module starts its own engine (emulator.docker.Engine: own socket, ``--bridge=none``, no
iptables), builds the base image (debootstrap, cached in var/docker/), the wheelhouse and
both images once, and stops the engine by its PID at the end. Containers use the host's
network only and run the commands the native tests run: ``gateway demo --workdir W --port 0
--exit`` (tests/test_demo.py) and ``gateway run --config X --exit-when-idle`` (tests/test_cli.py).

A missing dockerd, docker-compose or debootstrap fails here with the apt-get line that
installs it (``make test`` installs them through ``make system-deps``); it is never a skip.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from emulator import docker as d
from gateway.messages import decode

from conftest import THING

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "readings.csv.gz"
VALID = 11_133  # readings in the sample (one of its 11,134 rows is cut short)

SUMMARY = re.compile(r"^sent=(\d+) delivered=(\d+) anomalies=(\d+)$", re.M)  # as tests/test_demo.py reads it


def test_engine_answers_then_stops_by_its_pid_leaving_nothing(tmp_path):
    """Our own dockerd: ready when ``docker info`` answers; after stop() its process, socket,
    run folder and mounts are gone."""
    engine = d.Engine(tmp_path / "root").start()
    pid, run_dir = engine.proc.pid, engine.run_dir
    try:
        info = json.loads(engine.docker("info", "--format", "{{json .}}").stdout)
        assert info["DockerRootDir"] == str(tmp_path / "root")
    finally:
        engine.stop()
    assert not Path(f"/proc/{pid}").exists() and not run_dir.exists()
    assert str(run_dir) not in Path("/proc/self/mountinfo").read_text()


@pytest.fixture(scope="module")
def engine():
    """Our dockerd with both images built; the seconds each step took are in ``engine.timings``."""
    with d.Engine() as eng:
        eng.timings = d.build(eng, say=lambda line: None)
        yield eng


@pytest.mark.timeout(900)  # a fresh machine debootstraps the base image first (about a minute)
def test_demo_in_docker_delivers_every_reading(engine):
    """The compose stack's ``demo`` service runs ``gateway demo --workdir W --port 0 --exit`` (the
    whole chain, as tests/test_demo.py runs it) in the emulator image, over the host's network."""
    done = engine.compose("run", "--rm", "-T", "demo", what="the demo in docker")
    lines = done.stdout.rstrip("\n").splitlines()
    found = SUMMARY.findall(done.stdout)
    assert found, f"no summary line in the demo's output:\n{done.stdout}\n{done.stderr}"
    sent, delivered, anomalies = map(int, found[-1])
    assert lines[-1] == f"sent={sent} delivered={delivered} anomalies={anomalies}"
    assert delivered == sent > VALID  # the sample and the fleet's readings, all in the analytics store
    assert anomalies > 0
    assert "IoT Core: mosquitto with mutual TLS on 127.0.0.1:" in done.stdout


def test_device_image_holds_the_gateway_and_no_emulator(engine):
    """The device image is what a device runs: the gateway installed from the wheelhouse, nothing of emulator/."""
    done = engine.docker("run", "--rm", "--network", "host", d.DEVICE_IMAGE, "python", "-c",
                         "import importlib.util as u, gateway; "
                         "print(gateway.__file__, u.find_spec('emulator'), u.find_spec('release'))")
    path, emulator, release = done.stdout.split()
    assert path.startswith("/opt/meter-gateway/lib/") and (emulator, release) == ("None", "None")


def test_device_image_runs_the_gateway_against_a_broker(engine, tmp_path, certs, broker, subscriber):
    """``gateway run --config X --exit-when-idle`` in the device container (the compose ``gateway``
    service) delivers every reading of the sample to a mosquitto on the host's 127.0.0.1."""
    client = certs.client(THING)
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "thing": THING,
        "buffer": {"path": str(tmp_path / "buffer.db")},
        "sources": [{"type": "replay", "name": "sample", "path": str(SAMPLE)}],
        "publisher": {"type": "mqtt", "endpoint": "localhost", "port": broker.port, "cert": str(client.cert),
                      "key": str(client.key), "ca": str(certs.ca), "local": True},
    }))
    certs_dir = Path(certs.ca).parent
    done = engine.compose(
        "--profile", "device", "run", "--rm", "-T",
        "-v", f"{tmp_path}:{tmp_path}", "-v", f"{certs_dir}:{certs_dir}:ro", "-v", f"{SAMPLE.parent}:{SAMPLE.parent}:ro",
        "gateway", "gateway", "run", "--config", str(config), "--exit-when-idle", what="the gateway in docker")
    assert f"stopped: {VALID} stored, {VALID} delivered, 1 quarantined" in done.stdout  # the cut-short row

    def raw(messages) -> int:
        return sum(decode(m.payload)["n"] for m in messages if m.topic.endswith("/raw"))

    subscriber.wait_for(lambda messages: raw(messages) >= VALID, timeout=30)
    assert raw(subscriber.snapshot()) == VALID


def test_the_engine_has_no_bridge_network(engine):
    """After the stack ran, the engine knows only ``host`` and ``none``: nothing made a bridge."""
    done = engine.docker("network", "ls", "--format", "{{.Name}} {{.Driver}}")
    assert sorted(done.stdout.split("\n")[:-1]) == ["host host", "none null"]
