"""``gateway bench``: each stage measured against its raw limit, in the same run.

- **ingest**: :meth:`Buffer.put` (validation, the time-first key, duplicate detection, the
  source position in the same transaction) against a bare ``executemany`` of the same tuples
  into a minimal table, with the same journal mode, synchronous setting and batch size; again
  with a forwarder claiming and acknowledging beside the puts (``ingest_claimed``: its claims
  move the frontier the late-reading check compares against); and with the buffer scoring
  what it stores as well (``ingest_scored``): what ``gateway run`` does.
- **drain**: the forwarder (claim, encode JSON, publish QoS 1, wait for PUBACKs, ack in the
  buffer) to a local mosquitto over mutual TLS, flow control off, against a bare awscrt MQTT5
  client publishing the same payloads with the same window. A stall or a retried publish
  fails the stage.
- **drain over IPC**: the same backlog, drained by the forwarder through the IPC publisher
  (handoff) over the real awsiotsdk ``GreengrassCoreIPCClientV2`` to the local nucleus, run in
  its own process as on a device, whose IoT Core bridge publishes into mosquitto (flow control
  off); timed until every reading is acknowledged and has arrived at a subscriber, against the
  direct drain of the same run. The nucleus is set up as the README recommends for draining
  backlogs: a spool that holds the whole backlog (measured: the path, not backpressure) and
  ``maxInFlightPublishes`` 100; again at the nucleus's defaults (2.5 MiB, 5 in flight),
  refusals counted.
- **wire bytes per reading**: MQTT PUBLISH packets (fixed header, topic, packet id, properties
  length, payload) divided by readings, raw and scored; TLS record overhead is not counted.
  Readings per message as the forwarder makes them, on the simulated reference fleet and on
  a replay of the bundled sample through a real :class:`~gateway.runner.Gateway` (the demo).
- **drain with IoT Core's flow control**: a backlog scored as it was stored, drained as a
  device does, through awscrt's AWS_IOT_CORE_DEFAULTS flow control (100 publishes/s, 512 KB/s).
- **capacity against IoT Core**: the readings/s one connection carries, raw and raw+scored,
  which limit binds, and how long a three-day outage of the reference fleet takes to drain;
  computed from the measured message sizes, and from the measured flow-controlled drain.
- **score** (when a model is present): the scoring ``Buffer.put`` runs (featurization,
  onnxruntime, online per-meter update) against raw onnxruntime on a prebuilt feature matrix;
  the bytes one save of the per-meter statistics writes.
- **modbus poll**: one poll cycle of the reference fleet (2,380 meters of the shipped maps in
  turn on 10 TCP ports, 247 unit ids a port at most) through the real modbus source, against
  the simulated fleet in its own process, timed from the interval boundary until the batch
  holding every meter's reading of it is yielded; against a bare pymodbus client per port
  sending the same requests, interleaved in the same run. The requests are the fleet's count.
- **keys**: bytes written per reading (``/proc/self/io``) into a time-first and a meter-first
  key, same pragmas, one tick per transaction, on a table already holding hours of readings.
- **start-up**, and a real ``gateway run`` process: its peak RSS and the bytes it wrote to
  disk per reading stored (``/proc/<pid>/io``: WAL, checkpoints, statistics, everything),
  and from those and the statistics' save an estimate of the same at the fleet's real rate.
- **model**: the shipped model's evaluation, read from its manifest.

Ratios, not seconds, are the result: the raw limit is measured on the same machine, in the
same run, so the ratio means the same on a laptop and on a gateway. Every file a stage writes
is on a real disk (``tmpfs`` reports no ``write_bytes``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import sqlite3
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gateway import topics  # IoT Core's limits have their one home there
from gateway.readings import Reading

THING = "bench-gw"
REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "readings.csv.gz"
WEATHER = REPO / "data" / "sample" / "weather_2016.json.gz"

#: The reference fleet: 2,380 meters, one reading a minute.
FLEET_METERS = 2380
FLEET_INTERVAL_S = 60
OUTAGE_HOURS = 72


class BenchError(RuntimeError):
    """A stage could not measure what it claims to (a stall, a failed process)."""


def _readings(n: int, meters: int = FLEET_METERS) -> list[Reading]:
    from gateway.sources.simulator import SimulatorSource

    ticks = max(1, -(-n // meters))
    src = SimulatorSource("bench", meters=meters, seed=7, start_ms=1_700_000_000_000, speed=None,
                          count=ticks, batch_size=meters * 10)
    out: list[Reading] = []
    for batch in src.batches(None, threading.Event()):
        out.extend(batch.readings)
    return out[:n]


# ---------------------------------------------------------------------------------- disk

def filesystem_of(path: str | Path) -> str:
    """The filesystem type ``path`` lives on (``/proc/mounts``), or "unknown"."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                    best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


def disk_tempdir() -> tempfile.TemporaryDirectory:
    """A temporary directory on a real disk: the system's, unless it is tmpfs (where nothing
    is written to a device), then ``var/bench`` in the repository."""
    base = Path(tempfile.gettempdir())
    if filesystem_of(base) in ("tmpfs", "ramfs"):
        base = REPO / "var" / "bench"
        base.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix="gateway-bench-", dir=base)


def proc_io(pid: int | str = "self") -> dict[str, int]:
    """``/proc/<pid>/io`` as a dict (``wchar``, ``write_bytes``, ``cancelled_write_bytes``...)."""
    out = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key.strip()] = int(value)
    return out


def _drain(fwd, timeout_s: float, what: str) -> float:
    """Seconds for ``fwd`` to deliver everything; a stall, or a failure that a retry hid inside
    the time, fails the stage (either would make a slow figure look like a measure)."""
    t0 = time.perf_counter()
    try:
        fwd.drain(timeout_s=timeout_s)
    except TimeoutError as exc:
        raise BenchError(f"bench: {what}: {exc}") from exc
    seconds = time.perf_counter() - t0
    if fwd.failures:
        raise BenchError(f"bench: {what}: {fwd.failures} failed publishes were retried inside the time")
    return seconds


def _await(done: threading.Event, timeout_s: float, what: str) -> None:
    """Wait for ``done``; a timeout fails the stage (a stall must not become a slow ratio)."""
    if not done.wait(timeout_s):
        raise BenchError(f"bench: {what} did not finish within {timeout_s:g} s")


# ---------------------------------------------------------------------------------- ingest

def _puts_beside_a_forwarder(path: str, readings: list[Reading], batch: int, synchronous: str,
                             scorer=None) -> tuple[float, int, int]:
    """Seconds of the puts of ``readings`` while a forwarder (in-memory publisher) claims and
    acknowledges in its own thread, as in ``gateway run``; readings acknowledged meanwhile, and
    late readings listed. The forwarder must then deliver everything, or the stage fails: a
    claimer that died would flatter the figure."""
    from gateway.forwarder import Forwarder
    from gateway.publishers import MemoryPublisher

    buf = _buffer(path, scorer, synchronous)
    fwd = Forwarder(buf, MemoryPublisher(), THING)
    stop = threading.Event()
    died: list[BaseException] = []

    def forward() -> None:
        try:
            fwd.run(stop)
        except BaseException as exc:  # reported below
            died.append(exc)

    thread = threading.Thread(target=forward, name="bench-forwarder", daemon=True)
    thread.start()
    try:
        t0 = time.perf_counter()
        for i in range(0, len(readings), batch):
            buf.put(readings[i : i + batch], source="bench", position=i + batch)
        seconds = time.perf_counter() - t0
        delivered = buf.stats["delivered"]
        deadline = time.monotonic() + 120
        while buf.pending() and not died and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        fwd.wake.set()
        thread.join(30)
    if died:
        raise BenchError(f"bench: the ingest stage's forwarder died: {died[0]!r}") from died[0]
    if thread.is_alive() or buf.pending():
        raise BenchError(f"bench: the ingest stage's forwarder left {buf.pending()} readings after 120 s")
    late = buf.status().get("resend", 0)
    buf.close()
    return seconds, delivered, late


def bench_ingest(readings: list[Reading], batch: int = FLEET_METERS, synchronous: str = "full",
                 rounds: int = 3, score: bool = True) -> dict[str, float]:
    """Readings per second: Buffer.put vs a bare executemany, same batches, same pragmas; then
    Buffer.put with a forwarder claiming beside it (``ingest_claimed``), and that again with
    the buffer scoring what it stores (``ingest_scored``: what ``gateway run`` does).

    Each side runs ``rounds`` times, alternating, into a fresh file; the best of each counts
    (the least disturbed run is the closest to what the code itself costs)."""
    from gateway.buffer import Buffer

    ids = {r.meter_id: i for i, r in enumerate({r.meter_id: r for r in readings[:5000]}.values(), 1)}
    rows = [(r.ts, ids.get(r.meter_id, 0), r.value, 1) for r in readings]
    best = {"raw": float("inf"), "ours": float("inf"), "claimed": float("inf"), "scored": float("inf")}
    claimed_during = late = 0
    warm = _scorer() if score else None
    with disk_tempdir() as d:
        for k in range(rounds):
            # Raw: the same tuples the buffer writes, into a minimal table, one commit per batch.
            db = sqlite3.connect(os.path.join(d, f"raw{k}.db"), isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            db.execute("CREATE TABLE raw(ts INTEGER, meter INTEGER, value REAL, source INTEGER)")
            t0 = time.perf_counter()
            for i in range(0, len(rows), batch):
                db.execute("BEGIN")
                db.executemany("INSERT INTO raw VALUES(?, ?, ?, ?)", rows[i : i + batch])
                db.execute("COMMIT")
            best["raw"] = min(best["raw"], time.perf_counter() - t0)
            db.close()

            buf = Buffer(os.path.join(d, f"buffer{k}.db"), synchronous=synchronous)
            t0 = time.perf_counter()
            for i in range(0, len(readings), batch):
                buf.put(readings[i : i + batch], source="bench", position=i + batch)
            best["ours"] = min(best["ours"], time.perf_counter() - t0)
            buf.close()

            seconds, delivered, listed = _puts_beside_a_forwarder(
                os.path.join(d, f"claimed{k}.db"), readings, batch, synchronous)
            if seconds < best["claimed"]:
                best["claimed"], claimed_during, late = seconds, delivered, listed
            if warm is not None:
                scorer = _scorer(holder=warm.holder)  # fresh statistics, a loaded model
                seconds, _, _ = _puts_beside_a_forwarder(
                    os.path.join(d, f"scored{k}.db"), readings, batch, synchronous, scorer)
                best["scored"] = min(best["scored"], seconds)
    n, raw = len(readings), best["raw"]
    out = {
        "ingest_readings_per_s": n / best["ours"],
        "ingest_raw_readings_per_s": n / raw,
        "ingest_ratio": raw / best["ours"],
        "ingest_claimed_readings_per_s": n / best["claimed"],
        "ingest_claimed_ratio": raw / best["claimed"],
        "ingest_claimed_delivered": claimed_during,  # acknowledged while the puts ran
        "ingest_claimed_late": late,
    }
    if warm is not None:
        out["ingest_scored_readings_per_s"] = n / best["scored"]
        out["ingest_scored_ratio"] = raw / best["scored"]
    return out


# ---------------------------------------------------------------------------------- messages

def _mqtt_packet_bytes(topic: str, payload: bytes) -> int:
    """Size of an MQTT5 QoS 1 PUBLISH carrying ``payload`` on ``topic`` (no properties)."""
    body = 2 + len(topic.encode()) + 2 + 1 + len(payload)  # topic, packet id, properties length
    length_bytes = 1 if body < 128 else 2 if body < 16384 else 3 if body < 2_097_152 else 4
    return 1 + length_bytes + body


def message_figures(messages, prefix: str = "") -> dict[str, Any]:
    """Messages, readings per message and wire bytes per reading, raw and scored, of ``messages``
    (``(topic, payload)`` pairs as the forwarder published them)."""
    from gateway.messages import decode

    out: dict[str, Any] = {}
    for kind in ("raw", "scored"):
        mine = [(t, p) for t, p in messages if t.endswith("/" + kind)]
        if not mine:
            continue
        readings = sum(decode(p)["n"] for _, p in mine)
        out[f"{prefix}{kind}_messages"] = len(mine)
        out[f"{prefix}{kind}_readings_per_message"] = readings / len(mine)
        out[f"{prefix}wire_bytes_per_{kind}_reading"] = sum(_mqtt_packet_bytes(t, p) for t, p in mine) / readings
        out[f"{prefix}payload_bytes_per_{kind}_reading"] = sum(len(p) for _, p in mine) / readings
    return out


def _scorer(db_path: str | Path | None = None, holder=None):
    """The forwarder's scorer with the shipped model (or ``holder``'s) and the sample's weather,
    or None when there is no model."""
    from gateway.model.features import Buildings
    from gateway.model.online import MeterStats
    from gateway.model.paths import default_buildings, default_model
    from gateway.model.scoring import ModelHolder, ReadingScorer
    from gateway.sources.weather import WeatherReplay

    model_dir, buildings_csv = default_model(), default_buildings()
    if model_dir is None or buildings_csv is None:
        return None
    weather = WeatherReplay(WEATHER).table(retain_ms=None) if WEATHER.exists() else None
    return ReadingScorer(holder or ModelHolder(model_dir, threads=1), Buildings.from_csv(buildings_csv),
                         stats=MeterStats(), weather=weather, db_path=db_path)


def _buffer(path: str | Path, scorer=None, synchronous: str = "normal"):
    """A buffer that scores what it stores with ``scorer``, as the gateway's does."""
    from gateway.buffer import Buffer

    return Buffer(path, synchronous=synchronous) if scorer is None else \
        Buffer(path, synchronous=synchronous, scorer=scorer)


def _fill(buf, readings: list[Reading], batch: int = FLEET_METERS) -> None:
    """Put ``readings`` in puts of one tick of the fleet, as a source stores them."""
    for i in range(0, len(readings), batch):
        buf.put(readings[i : i + batch])


def _captured(readings: list[Reading], d: str, name: str, scorer=None, window: int = 64) -> list[tuple[str, bytes]]:
    """The messages the forwarder makes of ``readings``, captured through the in-memory twin."""
    from gateway.forwarder import Forwarder
    from gateway.publishers import MemoryPublisher

    twin = MemoryPublisher()
    buf = _buffer(os.path.join(d, name), scorer)
    _fill(buf, readings)
    Forwarder(buf, twin, THING, window=window).drain(timeout_s=600)
    buf.close()
    return [(m.topic, m.payload) for m in twin.messages]


def bench_drain(readings: list[Reading], window: int = 64, timeout_s: float = 600) -> dict[str, Any]:
    """Forwarder to a local mosquitto (mTLS, flow control off) vs a bare awscrt publish; the wire
    bytes and readings per message of the same readings, raw and (with a model) scored."""
    from awscrt import mqtt5

    from emulator.broker import Mosquitto, make_certs
    from gateway.forwarder import Forwarder
    from gateway.publishers.mqtt import MqttPublisher

    figures: dict[str, Any] = {}
    with disk_tempdir() as d:
        certs = make_certs(Path(d) / "certs", [THING])
        client = certs.client(THING)
        with Mosquitto(Path(d) / "broker", certs) as broker:
            buf = _buffer(os.path.join(d, "buffer.db"))
            _fill(buf, readings)

            messages = _captured(readings, d, "shadow.db", window=window)
            scorer = _scorer()
            if scorer is not None:  # the scored messages' sizes (not sent below: drain is raw)
                figures.update(message_figures(_captured(readings, d, "scored.db", scorer, window)))
            figures.update(message_figures(messages))

            # Raw: a bare awscrt MQTT5 client, the same payloads, the same window.
            raw_pub = MqttPublisher("localhost", THING + "-raw", client.cert, client.key, certs.ca,
                                    port=broker.port, local=True)
            raw_pub.start()
            if not raw_pub.wait_connected(10):
                raise BenchError("bench: raw client could not connect to the local broker")
            crt = raw_pub._client
            sem = threading.Semaphore(window)
            done = threading.Event()
            left = [len(messages)]
            failed: list[BaseException] = []
            lock = threading.Lock()

            def finished(f: Future) -> None:
                sem.release()
                with lock:
                    if f.exception() is not None:
                        failed.append(f.exception())
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

            t0 = time.perf_counter()
            for topic, payload in messages:
                sem.acquire()
                crt.publish(mqtt5.PublishPacket(topic=topic, payload=payload, qos=mqtt5.QoS.AT_LEAST_ONCE)
                            ).add_done_callback(finished)
            _await(done, timeout_s, f"the bare awscrt publish of {len(messages)} messages")
            raw_s = time.perf_counter() - t0
            raw_pub.close()
            if failed:
                raise BenchError(f"bench: {len(failed)} bare publishes failed: {failed[0]!r}")

            pub = MqttPublisher("localhost", THING, client.cert, client.key, certs.ca, port=broker.port, local=True)
            pub.start()
            if not pub.wait_connected(10):
                raise BenchError("bench: forwarder client could not connect to the local broker")
            fwd = Forwarder(buf, pub, THING, window=window)
            ours_s = _drain(fwd, timeout_s, "the forwarder's drain to mosquitto")
            pub.close()
            buf.close()
    n = len(readings)
    return {
        "drain_readings_per_s": n / ours_s,
        "drain_raw_readings_per_s": n / raw_s,
        "drain_ratio": raw_s / ours_s,
        "drain_target": "local mosquitto 2.0, mutual TLS, flow control off (local=True)",
        "messages": len(messages),
        "wire_bytes_per_reading": figures["wire_bytes_per_raw_reading"],
        "payload_bytes_per_reading": figures["payload_bytes_per_raw_reading"],
        **figures,
    }


# ---------------------------------------------------------------------------------- drain over IPC

#: The nucleus's ``mqtt.spooler.maxSizeInBytes`` default (2.5 MiB).
NUCLEUS_DEFAULT_SPOOL_BYTES = int(2.5 * 1024 * 1024)
#: The component the gateway runs as, and the one policy the drain needs.
IPC_COMPONENT = "org.metergateway.Gateway"
IPC_ACL = {"aws.greengrass.ipc.mqttproxy": {"bench:mqtt:1": {
    "operations": ["aws.greengrass#PublishToIoTCore"], "resources": ["dt/meters/+/{iot:thingName}/#"]}}}
IPC_SUBSCRIBER = "bench-subscriber"
_HEAD = re.compile(rb'\{"batch":"([0-9a-f]{16})".*?"n":(\d+),', re.S)


NUCLEUS_DEFAULT_IN_FLIGHT, NUCLEUS_MAX_IN_FLIGHT = 5, 100  # mqtt.maxInFlightPublishes: default, largest


def ipc_spool_bytes(payload_bytes: int) -> int:
    """A spool that never refuses: room for the whole backlog at once (twice its payload bytes,
    in whole MiB, never below the nucleus's default), so the drain measures the path, not the
    backpressure of a full spool. (Only payload bytes count against ``maxSizeInBytes``.)"""
    mib = 1024 * 1024
    return max(NUCLEUS_DEFAULT_SPOOL_BYTES, -(-2 * payload_bytes // mib) * mib)


def _nucleus_main() -> None:
    """The local nucleus for :func:`bench_ipc_drain`, in its own process as on a device: an
    :class:`~emulator.nucleus.ipc.IPCServer` whose PublishToIoTCore spools into an
    :class:`~emulator.nucleus.iotcore.IotCoreBridge` to the bench's mosquitto (IoT Core's flow
    control off). Its settings come as one JSON line on stdin; it answers one JSON line with the
    component's environment, then one line per command: ``settle`` waits until the spool is
    empty (every PUBACK in) and reports the spool's figures. End of stdin stops it."""
    import logging
    import sys
    from dataclasses import asdict

    from emulator.nucleus.iotcore import IotCoreBridge, MqttProxyBridge, SpoolConfig
    from emulator.nucleus.ipc import IPCServer

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    conf = json.loads(sys.stdin.readline())
    bridge = IotCoreBridge("localhost", conf["port"], conf["thing"], conf["cert"], conf["key"], conf["ca"],
                           spool=SpoolConfig(max_size_bytes=conf["spool_bytes"]), iot_core_limits=False,
                           max_in_flight=conf["max_in_flight"]).start()
    server = None
    try:
        if not bridge.wait_connected(10):
            print(json.dumps({"error": f"the bridge did not connect to the broker: {bridge.last_error!r}"}), flush=True)
            return
        server = IPCServer(conf["socket"], thing_name=conf["thing"], iotcore=MqttProxyBridge(bridge)).start()
        server.register_component(IPC_COMPONENT, access_control=IPC_ACL)
        print(json.dumps({"env": server.environment(IPC_COMPONENT), "max_in_flight": bridge.max_in_flight}),
              flush=True)
        for line in sys.stdin:
            if line.strip() == "settle":
                empty = bridge.wait_spool_empty(conf["timeout_s"])
                print(json.dumps({"empty": bool(empty), **asdict(bridge.spool_stats)}), flush=True)
    finally:
        if server is not None:
            server.stop()
        bridge.close()


class _Child:
    """A ``main`` of this module (its settings as one JSON line on stdin, one JSON line per
    answer) as a child process; :meth:`ask` sends a command and reads the answer."""

    what = "a child process"
    main = ""

    def __init__(self, conf: dict[str, Any], log_path: Path, timeout_s: float):
        import queue
        import subprocess
        import sys

        self.timeout_s = timeout_s
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", f"from gateway.bench import {self.main}; {self.main}()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     cwd=REPO)
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name="bench-nucleus-out", daemon=True).start()
        self.log_path = log_path
        self.proc.stdin.write(json.dumps(conf) + "\n")
        self.proc.stdin.flush()
        self.hello = self._answer("start")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _answer(self, what: str) -> dict[str, Any]:
        import queue

        try:
            line = self._lines.get(timeout=self.timeout_s)
        except queue.Empty:
            line = ""
        answer = json.loads(line) if line else {"error": f"no answer to {what} within {self.timeout_s:g} s"}
        if "error" in answer:
            self._log.flush()
            raise BenchError(f"bench: {self.what}: {answer['error']}: "
                             f"{self.log_path.read_text()[-2000:]}")
        return answer

    def ask(self, command: str) -> dict[str, Any]:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer(command)

    def close(self) -> None:
        import subprocess

        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class _Nucleus(_Child):
    """:func:`_nucleus_main` as a child process."""

    what = "the nucleus process"
    main = "_nucleus_main"


def _arrivals(endpoint: str, port: int, cert, key, ca, topic_filter: str):
    """A subscriber that counts the distinct batches and readings arriving on ``topic_filter``
    (a repeated batch, which QoS 1 allows, counts once) and notes when the last one it waits
    for arrived; it keeps no messages."""
    from awscrt import mqtt5

    from gateway.publishers.mqtt import MqttSubscriber

    class Arrivals(MqttSubscriber):
        def __init__(self) -> None:
            super().__init__(endpoint, IPC_SUBSCRIBER, cert, key, ca, port=port, topic_filter=topic_filter)
            self.batches: set[bytes] = set()
            self.readings = self.duplicates = 0
            self.expected: int | None = None
            self.last = 0.0
            self.all_in = threading.Event()

        def _on_publish(self, data: mqtt5.PublishReceivedData) -> None:
            head = _HEAD.match(bytes(data.publish_packet.payload[:200]))
            at = time.perf_counter()
            with self._cond:
                if head is None or head.group(1) in self.batches:
                    self.duplicates += head is not None
                    return
                self.batches.add(head.group(1))
                self.readings += int(head.group(2))
                self.last = at
                if self.expected is not None and self.readings >= self.expected:
                    self.all_in.set()

        def expect(self, readings: int) -> None:
            with self._cond:
                self.expected = readings
                if self.readings >= readings:
                    self.all_in.set()

    return Arrivals()


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Only errors from ``loggers`` meanwhile: the warnings a stage expects (a full spool's
    refusals) are counted in its figures, not printed a hundred times."""
    import logging

    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


class _Watched:
    """A publisher that notes the first publish that failed, so a stage that must not see one
    fails at once, naming it, instead of waiting out the forwarder's backoffs."""

    def __init__(self, publisher):
        self._publisher = publisher
        self.error: BaseException | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._publisher, name)

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> Future:
        fut = self._publisher.publish(topic, payload, qos)
        fut.add_done_callback(self._note)
        return fut

    def _note(self, fut: Future) -> None:
        if self.error is None and fut.exception() is not None:
            self.error = fut.exception()


def _drain_failing_fast(fwd, watched: _Watched, timeout_s: float, what: str) -> float:
    """Seconds for ``fwd`` to deliver everything (as :meth:`Forwarder.drain`); the first failed
    publish fails the stage with its reason."""
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    while True:
        if watched.error is not None:
            raise BenchError(f"bench: {what}: a publish failed: {watched.error}")
        if not fwd.step():
            if fwd.messages_in_flight == 0 and fwd.buffer.pending() == 0:
                return time.perf_counter() - t0
            fwd.wake.wait(0.05)
            fwd.wake.clear()
        if time.monotonic() > deadline:
            raise BenchError(f"bench: {what} did not finish within {timeout_s:g} s: "
                             f"{fwd.buffer.pending()} readings pending")


def bench_ipc_drain(readings: list[Reading], spool_bytes: int, *, max_in_flight: int = NUCLEUS_DEFAULT_IN_FLIGHT,
                    window: int = 64, timeout_s: float = 600, refusals_fail: bool = True) -> dict[str, Any]:
    """The forwarder drains a buffer prefilled as in :func:`bench_drain` through
    :class:`~gateway.publishers.ipc.IpcPublisher` (handoff delivery) over the real awsiotsdk
    ``GreengrassCoreIPCClientV2`` to the local nucleus's IPC server, in its own process (as on a
    device: the client and the server never share a GIL), whose IoT Core bridge publishes into
    a real mosquitto over mutual TLS; IoT Core's flow control off on the bridge's connection
    (the gateway's IPC side has none). Spool: Memory, ``spool_bytes``; in flight to the broker:
    ``max_in_flight`` (the nucleus's ``mqtt.maxInFlightPublishes``, 5 by default).

    Timed from the first claim until every reading is acknowledged in the buffer (the nucleus
    accepted its message) AND has arrived at a subscriber on the broker: a handoff says only
    that the nucleus spooled the message, arrival says it crossed the whole path. The spool is
    then waited empty (every PUBACK in) and checked, outside the time. A refused publish (a full
    spool) fails the stage when ``refusals_fail``, else is counted: then the figure includes the
    forwarder's backoffs, which is what that spool size costs."""
    from awsiot.greengrasscoreipc import connect
    from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

    from emulator.broker import Mosquitto, make_certs
    from emulator.nucleus.ipc import SOCKET_ENV, TOKEN_ENV
    from gateway.forwarder import Forwarder
    from gateway.publishers.ipc import IpcPublisher

    n = len(readings)
    with disk_tempdir() as d, tempfile.TemporaryDirectory(prefix="ggb-", dir="/tmp") as short:
        certs = make_certs(Path(d) / "certs", [THING, IPC_SUBSCRIBER])
        gw, sub_cert = certs.client(THING), certs.client(IPC_SUBSCRIBER)
        with Mosquitto(Path(d) / "broker", certs) as broker:
            buf = _buffer(os.path.join(d, "buffer.db"))
            _fill(buf, readings)
            arrivals = _arrivals("localhost", broker.port, sub_cert.cert, sub_cert.key, certs.ca,
                                 f"dt/meters/+/{THING}/#")
            arrivals.start()
            nucleus = client = pub = None
            try:
                if not arrivals.wait_subscribed(10):
                    raise BenchError("bench: the subscriber could not subscribe on the local broker")
                nucleus = _Nucleus({"port": broker.port, "thing": THING, "cert": str(gw.cert), "key": str(gw.key),
                                    "ca": str(certs.ca), "spool_bytes": spool_bytes, "max_in_flight": max_in_flight,
                                    "socket": os.path.join(short, "ipc.socket"), "timeout_s": timeout_s},
                                   Path(d) / "nucleus.log", timeout_s=60)
                env = nucleus.hello["env"]
                client = GreengrassCoreIPCClientV2(client=connect(ipc_socket=env[SOCKET_ENV],
                                                                  authtoken=env[TOKEN_ENV]))
                pub = IpcPublisher(client, THING, delivery="handoff").start()
                deadline = time.monotonic() + 10
                while not pub.connected and time.monotonic() < deadline:
                    time.sleep(0.01)
                if not pub.connected:
                    raise BenchError("bench: the IPC publisher never saw IoT Core connected through the nucleus")
                watched = _Watched(pub)
                fwd = Forwarder(buf, watched if refusals_fail else pub, THING, window=window)
                arrivals.expect(n)
                t0 = time.perf_counter()
                if refusals_fail:
                    acked_s = _drain_failing_fast(fwd, watched, timeout_s, "the forwarder's drain over IPC")
                else:
                    with _quiet("gateway.publishers.ipc", "gateway.forwarder"):  # refusals are expected here
                        fwd.drain(timeout_s=timeout_s)
                    acked_s = time.perf_counter() - t0
                _await(arrivals.all_in, timeout_s, f"the arrival of {n} readings through the nucleus")
                seconds = max(acked_s, arrivals.last - t0)
                spool = nucleus.ask("settle")
            finally:
                if pub is not None:
                    pub.close()
                if client is not None:
                    # The connection first, with its streams' last callbacks, then the executor they
                    # run on (GreengrassCoreIPCClientV2.close shuts the executor down first and
                    # awsiotsdk prints a traceback for each callback that comes after).
                    try:
                        client.client.close().result(10)
                    except Exception:  # closed by the server already: the stage's result stands
                        pass
                    client.executor.shutdown(wait=True)
                if nucleus is not None:
                    nucleus.close()
                arrivals.close()
            buf.close()
    if not spool["empty"] or spool["dropped_failed"]:
        raise BenchError(f"bench: the nucleus's spool did not empty cleanly after the drain: {spool}")
    if arrivals.readings != n:
        raise BenchError(f"bench: {arrivals.readings} readings arrived through the nucleus, {n} were drained")
    return {
        "readings_per_s": n / seconds,
        "acked_readings_per_s": n / acked_s,
        "seconds": seconds,
        "messages": fwd.published,
        "refusals": pub.spool_full,
        "duplicates": arrivals.duplicates,
        "spool_max_bytes": spool_bytes,
        "max_in_flight": nucleus.hello["max_in_flight"],
    }


def bench_rules(drain_per_s: float, n_messages: int = 3_000) -> dict[str, Any]:
    """The emulated cloud's rules engine on the raw-reading rule of ``cloud/analytics.yaml`` and
    its Firehose action (the real local Firehose, gzip objects written into a temporary
    emulation root), over messages as the gateway makes them; its ratio to the gateway's drain
    of the same run (the emulated cloud must never be the demo's bottleneck). Beside it, the
    engine alone (a Firehose that only counts)."""
    from emulator.rules.bench import make_messages, run as run_rules

    messages = make_messages(n_messages)
    with disk_tempdir() as d:
        real = run_rules(messages, root=d)
    alone = run_rules(messages)
    return {
        "rules_readings_per_s": real["readings_per_s"],
        "rules_ratio": real["readings_per_s"] / drain_per_s,
        "rules_engine_alone_readings_per_s": alone["readings_per_s"],
        "rules_messages": real["messages"],
        "rules_firehose_objects": real["objects"],
    }


def bench_ipc(readings: list[Reading], payload_bytes: int, direct_per_s: float, **kwargs) -> dict[str, Any]:
    """:func:`bench_ipc_drain` as the README recommends configuring a nucleus that drains backlogs
    (a spool that never refuses, :func:`ipc_spool_bytes`, and ``mqtt.maxInFlightPublishes`` at its
    maximum, 100), its ratio to the direct drain measured in the same run, and again at the
    nucleus's defaults: 2.5 MiB of spool (the backlog does not fit: refusals and backoffs are
    counted, not failed) and 5 publishes in flight, which bind at about 1,000 messages/s (a
    publish of 4-16 KB waits out the broker's TCP acknowledgement, and only 5 are in flight)."""
    big = bench_ipc_drain(readings, ipc_spool_bytes(payload_bytes), max_in_flight=NUCLEUS_MAX_IN_FLIGHT, **kwargs)
    default = bench_ipc_drain(readings, NUCLEUS_DEFAULT_SPOOL_BYTES, refusals_fail=False, **kwargs)
    return {
        "ipc_drain_readings_per_s": big["readings_per_s"],
        "ipc_drain_ratio": big["readings_per_s"] / direct_per_s,
        "ipc_drain_acked_readings_per_s": big["acked_readings_per_s"],
        "ipc_drain_messages": big["messages"],
        "ipc_drain_spool_max_bytes": big["spool_max_bytes"],
        "ipc_drain_max_in_flight": big["max_in_flight"],
        "ipc_drain_duplicates": big["duplicates"],
        "ipc_drain_target": "gateway → IpcPublisher(handoff) → GreengrassCoreIPCClientV2 → local nucleus "
                            "(own process) → IotCoreBridge → local mosquitto, mTLS, flow control off; "
                            "timed until every reading is acknowledged and has arrived at a subscriber",
        "ipc_drain_default_spool_readings_per_s": default["readings_per_s"],
        "ipc_drain_default_max_in_flight": default["max_in_flight"],
        "ipc_drain_default_spool_refusals": default["refusals"],
        "ipc_drain_default_spool_duplicates": default["duplicates"],
    }


def bench_sample_messages() -> dict[str, Any]:
    """The demo's messages: the bundled sample replayed through a real Gateway (sources, buffer,
    forwarder, scoring with the sample's weather) into the in-memory twin; readings per message
    and wire bytes per reading as they come out."""
    if not SAMPLE.exists():
        return {}
    from gateway.config import validate
    from gateway.model.paths import default_buildings, default_model
    from gateway.publishers import MemoryPublisher
    from gateway.runner import Gateway

    model, buildings = default_model(), default_buildings()
    with disk_tempdir() as d:
        raw: dict[str, Any] = {
            "thing": "demo-gw", "log_level": "WARNING",
            "buffer": {"path": str(Path(d) / "buffer.db")},
            "sources": [{"type": "replay", "name": "sample", "path": str(SAMPLE)}],
            "publisher": {"type": "memory"},
        }
        if model is not None and buildings is not None:
            raw["model"] = {"path": str(model), "buildings": str(buildings)}
            if WEATHER.exists():
                raw["weather"] = {"path": str(WEATHER)}
        twin = MemoryPublisher()
        gw = Gateway(validate(raw, base=Path(d)), publisher=twin).start()
        try:
            if not gw.wait(until_idle=True, timeout=300):
                raise BenchError("bench: the sample replay did not finish within 300 s")
        finally:
            gw.stop()
    return message_figures([(m.topic, m.payload) for m in twin.messages], prefix="sample_")


def bench_iotcore(readings: list[Reading], window: int = 64, timeout_s: float = 120) -> dict[str, Any]:
    """A backlog scored as it was stored (when a model is present), drained by the forwarder as
    a device runs it: raw and scored messages through awscrt's IoT Core flow control
    (``local=False``) to a local mosquitto."""
    from emulator.broker import Mosquitto, make_certs
    from gateway.forwarder import Forwarder
    from gateway.publishers.mqtt import MqttPublisher

    with disk_tempdir() as d:
        certs = make_certs(Path(d) / "certs", [THING])
        client = certs.client(THING)
        with Mosquitto(Path(d) / "broker", certs) as broker:
            scorer = _scorer()  # scored as stored, during the outage; then the backlog drains
            buf = _buffer(os.path.join(d, "buffer.db"), scorer)
            _fill(buf, readings)
            pub = MqttPublisher("localhost", THING, client.cert, client.key, certs.ca, port=broker.port, local=False)
            pub.start()
            if not pub.wait_connected(10):
                raise BenchError("bench: the flow-controlled client could not connect to the local broker")
            fwd = Forwarder(buf, pub, THING, window=window)
            seconds = _drain(fwd, timeout_s, "the drain through IoT Core's flow control")
            published = fwd.published
            pub.close()
            buf.close()
    return {
        "drain_iotcore_readings_per_s": len(readings) / seconds,
        "drain_iotcore_publishes_per_s": published / seconds,
        "drain_iotcore_readings": len(readings),
        "drain_iotcore_scored": scorer is not None,
        "drain_iotcore_seconds": seconds,
    }


def capacity(raw_bytes: float, raw_per_message: float, scored_bytes: float | None = None,
             scored_per_message: float | None = None, *, meters: int = FLEET_METERS,
             interval_s: float = FLEET_INTERVAL_S, outage_h: float = OUTAGE_HOURS,
             measured_per_s: float | None = None, measured_key: str = "") -> dict[str, Any]:
    """Readings/s one connection carries under IoT Core's 100 publishes/s and 512 KB/s, raw and
    raw+scored (each claim publishes both), which limit binds, and how long a backlog of
    ``outage_h`` hours of the fleet takes to drain while the fleet keeps reading."""
    fleet = meters / interval_s
    backlog = fleet * outage_h * 3600
    out: dict[str, Any] = {"fleet_readings_per_s": fleet, "outage_hours": outage_h, "outage_readings": round(backlog)}
    cases = [("raw", 1 / raw_per_message, raw_bytes)]
    if scored_bytes is not None and scored_per_message is not None:
        cases.append(("scored", 1 / raw_per_message + 1 / scored_per_message, raw_bytes + scored_bytes))
    for name, publishes_per_reading, bytes_per_reading in cases:
        by_publishes = topics.MAX_PUBLISHES_PER_S / publishes_per_reading
        by_bytes = topics.MAX_BYTES_PER_S / bytes_per_reading
        per_s = min(by_publishes, by_bytes)
        out[f"iotcore_{name}_readings_per_s"] = per_s
        out[f"iotcore_{name}_binds"] = (f"{topics.MAX_PUBLISHES_PER_S} publishes/s" if by_publishes <= by_bytes
                                        else f"{topics.MAX_BYTES_PER_S // 1024} KB/s")
        out[f"iotcore_{name}_outage_drain_min"] = backlog / (per_s - fleet) / 60 if per_s > fleet else None
    if measured_per_s is not None:
        out[f"{measured_key}_outage_drain_min"] = (
            backlog / (measured_per_s - fleet) / 60 if measured_per_s > fleet else None)
    return out


# ---------------------------------------------------------------------------------- keys

def bench_keys(ticks: int = 30, prefill_ticks: int = 300, meters: int = FLEET_METERS) -> dict[str, Any]:
    """Bytes written to disk per reading (``/proc/self/io`` write_bytes, WAL and a final
    checkpoint included) by one-tick transactions into a time-first and a meter-first
    ``WITHOUT ROWID`` key, WAL and synchronous=FULL, on a table already holding
    ``prefill_ticks`` ticks of the fleet (a small table hides the meter-first key's cost)."""
    out: dict[str, Any] = {"keys_ticks": ticks, "keys_prefill_ticks": prefill_ticks}
    t0 = 1_767_225_600_000
    rng = np.random.default_rng(3)
    with disk_tempdir() as d:
        for name, key in (("time_first", "ts, meter"), ("meter_first", "meter, ts")):
            db = sqlite3.connect(os.path.join(d, f"{name}.db"), isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=OFF")
            db.execute("CREATE TABLE readings(ts INTEGER NOT NULL, meter INTEGER NOT NULL, value REAL NOT NULL,"
                       f" source INTEGER NOT NULL, PRIMARY KEY({key})) WITHOUT ROWID")
            db.execute("BEGIN")
            for t in range(prefill_ticks):
                values = rng.lognormal(3.0, 1.0, meters).tolist()
                db.executemany("INSERT INTO readings VALUES(?, ?, ?, 1)",
                               zip([t0 + t * 60_000] * meters, range(1, meters + 1), values))
            db.execute("COMMIT")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            db.execute("PRAGMA synchronous=FULL")
            before = proc_io()
            for t in range(prefill_ticks, prefill_ticks + ticks):
                values = rng.lognormal(3.0, 1.0, meters).tolist()
                db.execute("BEGIN")
                db.executemany("INSERT INTO readings VALUES(?, ?, ?, 1)",
                               zip([t0 + t * 60_000] * meters, range(1, meters + 1), values))
                db.execute("COMMIT")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            after = proc_io()
            db.close()
            out[f"keys_{name}_bytes_written_per_reading"] = (after["write_bytes"] - before["write_bytes"]) / (ticks * meters)
    return out


# ---------------------------------------------------------------------------------- start-up

def bench_startup(n: int = 3_000_000, meters: int = FLEET_METERS) -> dict[str, Any]:
    """Opening a buffer that holds ``n`` unsent readings and claiming the first batch: what a
    gateway does at start-up after days offline."""
    from gateway.buffer import Buffer

    with disk_tempdir() as d:
        path = os.path.join(d, "buffer.db")
        buf = Buffer(path, synchronous="normal")
        t0 = 1_767_225_600_000
        buf.put([Reading(str(m % 16), str(m), "electricity", t0, 1.0, "bench") for m in range(meters)])
        db = buf.db
        db.execute("BEGIN")
        ticks = n // meters
        for t in range(1, ticks):
            ts = t0 + t * 60_000
            db.executemany("INSERT INTO readings(ts, meter, value, source) VALUES(?, ?, 1.0, 1)",
                           [(ts, m) for m in range(1, meters + 1)])
        db.execute("COMMIT")
        buf.close()
        begin = time.perf_counter()
        buf = Buffer(path)
        claim = buf.claim(1000)
        seconds = time.perf_counter() - begin
        assert claim is not None and len(claim) == 1000
        buf.close()
    return {"startup_readings_buffered": ticks * meters, "startup_s": seconds}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------- gateway run

def _exited(pid: int) -> bool:
    """Whether ``pid`` (our child) has exited, without reaping it: its /proc entry stays."""
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None


def bench_gateway(n: int, meters: int = FLEET_METERS, timeout_s: float = 600) -> dict[str, Any]:
    """A real ``gateway run`` process, end to end: the simulated fleet faster than real time but
    one tick (``meters`` readings) per put, as it arrives → buffer on disk → scoring with the
    shipped model → mosquitto over mTLS, until everything is acknowledged.

    Its peak RSS is the gateway's memory under load (the bench process itself holds test data
    and is no measure). ``/proc/<pid>/io`` read after it exits (before it is reaped) gives what
    it wrote: ``write_bytes`` reached the disk (WAL, checkpoints, statistics), ``wchar`` went
    through write() calls."""
    import subprocess
    import sys

    import yaml

    from emulator.broker import Mosquitto, make_certs
    from gateway.buffer import Buffer
    from gateway.model.paths import default_buildings, default_model

    ticks = max(1, n // meters)
    with disk_tempdir() as d:
        certs = make_certs(Path(d) / "certs", [THING])
        client = certs.client(THING)
        db_path = os.path.join(d, "buffer.db")
        with Mosquitto(Path(d) / "broker", certs) as broker:
            conf: dict[str, Any] = {
                "thing": THING,
                "log_level": "WARNING",
                "buffer": {"path": db_path},
                # A speed far above what the gateway can follow: as fast as it goes, one tick per put.
                "sources": [{"type": "simulator", "name": "sim", "meters": meters, "speed": 1_000_000.0,
                             "count": ticks, "start": "2026-01-01T00:00:00Z"}],
                "publisher": {"type": "mqtt", "endpoint": "localhost", "port": broker.port,
                              "cert": str(client.cert), "key": str(client.key), "ca": str(certs.ca), "local": True},
            }
            model, buildings = default_model(), default_buildings()
            if model is not None and buildings is not None:
                conf["model"] = {"path": str(model), "buildings": str(buildings)}
            path = Path(d) / "gateway.yaml"
            path.write_text(yaml.safe_dump(conf))
            env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # count the gateway's writes, not .pyc files
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(path),
                                     "--exit-when-idle"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=env)
            # VmHWM is the process's own high-water mark since exec (ru_maxrss of a child would
            # count the parent's pages it held between fork and exec). Read it until exit.
            hwm_kb = 0
            status_file = Path(f"/proc/{proc.pid}/status")
            try:
                while not _exited(proc.pid):
                    try:
                        for line in status_file.read_text().splitlines():
                            if line.startswith("VmHWM:"):
                                hwm_kb = max(hwm_kb, int(line.split()[1]))
                    except (OSError, ValueError):
                        pass
                    if time.perf_counter() - t0 > timeout_s:
                        raise BenchError(f"bench: gateway run did not finish within {timeout_s:g} s")
                    time.sleep(0.05)
                seconds = time.perf_counter() - t0
                io = proc_io(proc.pid)  # a zombie's counters: everything it wrote, closing included
            finally:
                if proc.poll() is None:
                    proc.kill()
                out = proc.communicate()
            if proc.returncode != 0:
                raise BenchError(f"bench: gateway run failed: {(out[0] + out[1])[-2000:]}")
        buf = Buffer(db_path, readonly=True)
        stored = buf.stats["stored"]
        buf.close()
    if stored != ticks * meters:
        raise BenchError(f"bench: gateway run stored {stored} readings, the simulator made {ticks * meters}")
    return {
        "gateway_readings": stored,
        "gateway_scored": "model" in conf,
        "gateway_readings_per_s": stored / seconds,
        "gateway_seconds": seconds,
        "peak_rss_mb": hwm_kb / 1024,
        "disk_bytes_written_per_reading": io["write_bytes"] / stored,
        "wchar_per_reading": io["wchar"] / stored,
        "gateway_cancelled_write_bytes": io.get("cancelled_write_bytes", 0),
        "disk_filesystem": filesystem_of(db_path if os.path.exists(db_path) else Path(db_path).parent),
    }


# ---------------------------------------------------------------------------------- scoring

def _score_call(scorer) -> Callable[[list, dict], Any]:
    """What production calls to score a batch: the buffer's ``score`` at put, else the
    forwarder's ``score_rows`` at claim."""
    return getattr(scorer, "score", None) or scorer.score_rows


def bench_score(readings: list[Reading], batch: int = FLEET_METERS) -> dict[str, Any]:
    """The gateway's scoring path (ReadingScorer.score, as Buffer.put calls it: metadata,
    weather look-up, featurize, onnxruntime, online update) on put-sized batches (one tick of
    the fleet), against raw onnxruntime on the same rows' prebuilt feature matrix in the same
    batches. Then the bytes one save of what it learned writes to disk, and what that costs
    per reading at the reference fleet's real rate (it saves every ``save_every_s``)."""
    from gateway.buffer import MeterInfo
    from gateway.model.features import Buildings, featurize
    from gateway.model.paths import default_buildings, default_model
    from gateway.readings import METER_CODE

    model_dir, buildings_csv = default_model(), default_buildings()
    if model_dir is None or buildings_csv is None:
        return {}
    buildings = Buildings.from_csv(buildings_csv)
    meters: dict[int, MeterInfo] = {}
    ids: dict[str, int] = {}
    rows = []
    for r in readings:
        mid = ids.get(r.meter_id)
        if mid is None:
            mid = ids[r.meter_id] = len(ids) + 1
            meters[mid] = MeterInfo(r.site, r.building, r.meter)
        rows.append((r.ts, mid, r.value))
    scorer = _scorer()
    _score_call(scorer)(rows[:batch], meters)  # warm up: holiday tables, first allocations
    holder = scorer.holder
    scorer = _scorer(holder=holder)  # fresh statistics, the warmed-up session
    score = _score_call(scorer)
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch):
        score(rows[i : i + batch], meters)
    ours_s = time.perf_counter() - t0

    b = buildings.ids(np.array([r.building for r in readings]))
    ok = buildings.is_known(b)
    X = featurize(buildings, b[ok], np.array([METER_CODE[r.meter] for r in readings])[ok],
                  np.array([r.ts for r in readings])[ok], {})
    session, name = holder.current._session, holder.current._input
    t0 = time.perf_counter()
    for i in range(0, len(X), batch):
        session.run(None, {name: X[i : i + batch]})
    raw_s = time.perf_counter() - t0
    result = {
        "score_readings_per_s": len(rows) / ours_s,
        "score_raw_rows_per_s": len(X) / raw_s,
        "score_ratio": (len(rows) / ours_s) / (len(X) / raw_s),
        "score_batch": batch,
    }
    result.update(_stats_save_bytes(scorer, rows, meters))
    return result


def _stats_save_bytes(trained, rows: list[tuple[int, int, float]], meters: dict) -> dict[str, Any]:
    """Bytes written (WAL and checkpoint) by one periodic save of ``trained``'s statistics into
    a database on disk, after the first save and then the readings the fleet makes between two
    saves that find something new at real time: one tick (every meter) when saves come at
    least once a tick, else ``save_every_s`` of readings (the last of ``rows``, moved later).
    SQLite leaves a page that an update does not change unwritten, so a save with nothing new
    costs next to nothing, and these bytes are spread over the readings between."""
    fleet = FLEET_METERS / FLEET_INTERVAL_S
    with disk_tempdir() as d:
        path = os.path.join(d, "stats.db")
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")  # as the buffer's file is
        db.close()
        scorer = _scorer(db_path=path, holder=trained.holder)
        every = float(getattr(scorer, "save_every_s", 30.0))
        scorer.stats, scorer.last_ts = trained.stats, trained.last_ts
        scorer.save()
        scorer._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        later = FLEET_INTERVAL_S * 1000 * (len(rows) // FLEET_METERS + 1)
        n_between = max(1, round(max(every, FLEET_INTERVAL_S) * fleet))
        between = [(ts + later, mid, value) for ts, mid, value in rows[-n_between:]]
        _score_call(scorer)(between, meters)
        before = proc_io()
        scorer.save()
        scorer._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        written = proc_io()["write_bytes"] - before["write_bytes"]
        scorer.close()
    return {
        "stats_save_bytes": written,
        "stats_save_every_s": every,
        "stats_save_bytes_per_reading_at_1x": written / len(between),
    }


def model_figures(model_dir: str | Path | None = None) -> dict[str, Any]:
    """The shipped model's evaluation on unseen buildings, from its manifest (the model card's
    figures): RMSLE of the model alone, on all readings and on working meters' readings, and
    after the gateway's online per-meter learning; the anomaly AUC."""
    from gateway.model.paths import default_model

    model_dir = model_dir or default_model()
    if model_dir is None or not (Path(model_dir) / "manifest.json").exists():
        return {}
    manifest = json.loads((Path(model_dir) / "manifest.json").read_text())
    metrics = manifest.get("metrics", {})
    out: dict[str, Any] = {"model_version": manifest.get("version")}
    for key, name in (("rmsle_model", "model_rmsle_alone"), ("rmsle_model_clean", "model_rmsle_alone_working_meters"),
                      ("rmsle_online", "model_rmsle_online"), ("rmsle_naive", "model_rmsle_naive")):
        if isinstance(metrics.get(key), dict) and "overall" in metrics[key]:
            out[name] = metrics[key]["overall"]
    if "auc" in metrics.get("anomaly", {}):
        out["model_anomaly_auc"] = metrics["anomaly"]["auc"]
    return out


# ---------------------------------------------------------------------------------- modbus poll

#: The reference fleet's buses as a site spreads them: 247 unit ids a port at most, so 10 ports.
MODBUS_PORTS = -(-FLEET_METERS // 247)


def _fleet_main() -> None:
    """The simulated Modbus fleet for :func:`bench_modbus_poll` in its own process, as meters are
    other machines: a :class:`~emulator.modbus_fleet.FleetServer` of the shipped maps in turn on
    ``ports`` free ports, writing its devices CSV. Its settings come as one JSON line on stdin;
    it answers one JSON line with its ports, then ``requests`` with the read requests it has
    received. End of stdin stops it."""
    import sys

    from emulator.modbus_fleet import FleetServer
    from gateway.registermap import shipped

    conf = json.loads(sys.stdin.readline())
    try:
        fleet = FleetServer(meters=conf["meters"], ports=conf["ports"], base_port=0, maps=shipped(),
                            devices_csv=conf["devices_csv"]).start()
    except Exception as exc:  # noqa: BLE001 - handed to the bench, which fails the stage with it
        print(json.dumps({"error": f"the fleet did not start: {exc}"}), flush=True)
        return
    try:
        print(json.dumps({"ports": fleet.ports}), flush=True)
        for line in sys.stdin:
            if line.strip() == "requests":
                print(json.dumps({"requests": fleet.requests}), flush=True)
    finally:
        fleet.stop()


class _FleetProcess(_Child):
    """:func:`_fleet_main` as a child process."""

    what = "the modbus fleet process"
    main = "_fleet_main"

    def requests(self) -> int:
        return self.ask("requests")["requests"]


class _FleetThread:
    """The same fleet in a thread of this process (its server loop shares the GIL with the source)."""

    def __init__(self, conf: dict[str, Any]):
        from emulator.modbus_fleet import FleetServer
        from gateway.registermap import shipped

        self.fleet = FleetServer(meters=conf["meters"], ports=conf["ports"], base_port=0, maps=shipped(),
                                 devices_csv=conf["devices_csv"]).start()

    def requests(self) -> int:
        return self.fleet.requests

    def close(self) -> None:
        self.fleet.stop()


class _BoundaryClock:
    """The wall clock a source aligns to: waiting for the boundary moves it there at once, and
    notes when (``perf_counter``), so a cycle is timed from its boundary."""

    def __init__(self) -> None:
        self.t = time.time()
        self.boundary_at = 0.0

    def wall(self) -> float:
        return self.t

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        self.t += seconds
        self.boundary_at = time.perf_counter()
        return stop.is_set()


def _raw_poll(devices: list, plans: dict[str, list[tuple[str, int, int]]], timeout_s: float) -> tuple[float, int]:
    """The raw limit: a bare pymodbus ``AsyncModbusTcpClient`` per port, connected first, reading
    every device's requests (``plans``, by device name) in turn on its port, all ports at once
    on one asyncio loop, as the source's buses are. Seconds and requests."""
    import asyncio

    from pymodbus.client import AsyncModbusTcpClient

    buses: dict[tuple[str, int], list] = {}
    for d in devices:
        buses.setdefault((d.host, d.port), []).append(d)

    async def run() -> tuple[float, int]:
        clients = {bus: AsyncModbusTcpClient(bus[0], port=bus[1], timeout=timeout_s, retries=0, reconnect_delay=0)
                   for bus in buses}
        try:
            for bus, client in clients.items():
                if not await client.connect():
                    raise BenchError(f"bench: the raw pymodbus client cannot connect to {bus[0]}:{bus[1]}")

            async def poll(bus: tuple[str, int]) -> int:
                client, n = clients[bus], 0
                for d in buses[bus]:
                    for kind, start, count in plans[d.name]:
                        read = client.read_holding_registers if kind == "holding" else client.read_input_registers
                        rr = await read(start, count=count, device_id=d.unit_id)
                        if rr.isError():
                            raise BenchError(f"bench: the raw pymodbus client: {d.name} answered {rr}")
                        n += 1
                return n

            t0 = time.perf_counter()
            counts = await asyncio.gather(*(poll(bus) for bus in buses))
            return time.perf_counter() - t0, sum(counts)
        finally:
            for client in clients.values():
                client.close()

    return asyncio.run(run())


class _SourcePolls:
    """A real :class:`~gateway.sources.modbus.ModbusSource`, built from ``spec`` as ``gateway run``
    builds it, polling cycle by cycle: :meth:`cycle` is one, timed from its interval boundary
    until its batch is yielded. The first poll (connecting, and each meter's baseline) is made
    when it starts and is not timed."""

    def __init__(self, spec: dict):
        from gateway.runner import build_source

        self.source = build_source(spec)
        self.clock = _BoundaryClock()
        self.source.wall, self.source.wait = self.clock.wall, self.clock.wait
        self._batches = self.source.batches(None, threading.Event())
        next(self._batches)

    def cycle(self) -> tuple[float, Any]:
        batch = next(self._batches)
        seconds = time.perf_counter() - self.clock.boundary_at
        down = {name: s for name, s in self.source.status().items() if s["state"] != "ok"}
        if down:
            name, s = next(iter(down.items()))
            raise BenchError(f"bench: the modbus poll: {len(down)} meters did not answer, e.g. {name}: {s['error']}")
        return seconds, batch

    def close(self) -> None:
        self._batches.close()  # closes its clients


def bench_modbus_poll(meters: int = FLEET_METERS, ports: int = MODBUS_PORTS, *, own_process: bool = True,
                      rounds: int = 5) -> dict[str, Any]:
    """One poll cycle of the reference fleet through the real modbus source, from the interval
    boundary until every meter's reading of that boundary is in the yielded batch, against the
    simulated fleet (:mod:`emulator.modbus_fleet`: the shipped maps in turn, the meters spread
    over ``ports`` TCP ports as a site's buses) on this machine, with the default timeout and
    retries and no jitter.

    The fleet runs in its own process (``own_process``): on a device the meters are other
    machines. In the bench's process its pymodbus servers would share the source's GIL, and
    they take about as much CPU a cycle as the source does, so the cycle would time the
    simulated meters as much as the source.

    ``rounds`` times, one source cycle then a bare pymodbus poll of the same requests
    (:func:`_raw_poll`), interleaved so both see the same load on the machine; the best of
    each. ``modbus_poll_ratio`` = raw seconds / source seconds (1.0: the source adds nothing).
    The fleet counts the requests each received: both must send exactly the planned ones."""
    from gateway.config import validate
    from gateway.sources.modbus import Device

    with disk_tempdir() as d:
        csv_path = Path(d) / "devices.csv"
        conf = {"meters": meters, "ports": ports, "devices_csv": str(csv_path)}
        fleet = _FleetProcess(conf, Path(d) / "fleet.log", timeout_s=60) if own_process else _FleetThread(conf)
        polls = None
        try:
            # as a site configures it: one modbus source reading the fleet's devices CSV
            cfg = validate({"thing": THING, "buffer": {"path": str(Path(d) / "buffer.db")},
                            "sources": [{"type": "modbus", "name": "fleet", "devices_csv": str(csv_path)}],
                            "publisher": {"type": "memory"}}, Path(d))
            spec = cfg.sources[0]
            devices = [Device.from_spec(dev) for dev in spec["devices"]]
            plans = {dev.name: dev.map.plan(dev.to_read) for dev in devices}
            planned = sum(len(p) for p in plans.values())
            timeout = max(dev.timeout_s for dev in devices)
            polls = _SourcePolls(spec)
            ours, raws = [], []
            for _ in range(rounds):
                before = fleet.requests()
                seconds, batch = polls.cycle()
                between = fleet.requests()
                raw_s, raw_n = _raw_poll(devices, plans, timeout)
                after = fleet.requests()
                if between - before != planned or after - between != planned or raw_n != planned:
                    raise BenchError(f"bench: the modbus poll: {planned} requests planned a cycle; the source sent "
                                     f"{between - before}, the raw client {after - between}")
                if len(batch.readings) != len(devices) or batch.rejected:
                    raise BenchError(f"bench: the modbus poll: a cycle yielded {len(batch.readings)} readings and "
                                     f"{len(batch.rejected)} rejected for {len(devices)} meters")
                ours.append(seconds)
                raws.append(raw_s)
        finally:
            if polls is not None:
                polls.close()
            fleet.close()
    best, raw_best = min(ours), min(raws)
    return {
        "modbus_poll_s": best,
        "modbus_poll_requests": planned,
        "modbus_poll_raw_s": raw_best,
        "modbus_poll_ratio": raw_best / best,
        "modbus_poll_meters": len(devices),
        "modbus_poll_ports": ports,
        "modbus_poll_fleet": "its own process" if own_process else "the bench's process (sharing its GIL)",
    }


# ---------------------------------------------------------------------------------- all

def run(n: int = 200_000, *, score: bool = True, startup_n: int = 3_000_000, iotcore_n: int = 40_000,
        key_ticks: int = 30, key_prefill_ticks: int = 300, gateway_n: int | None = None,
        progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run every stage; return one flat dict of results."""
    result: dict[str, Any] = {"readings": n}
    progress(f"generating {n:,} simulated readings (2,380 meters)")
    readings = _readings(n)
    progress("ingest: Buffer.put vs bare executemany, then with a forwarder claiming beside it")
    result.update(bench_ingest(readings, score=score))
    progress("drain: forwarder → mosquitto vs bare awscrt publish; wire bytes raw and scored")
    result.update(bench_drain(readings))
    progress("drain over IPC: forwarder → IpcPublisher → GreengrassCoreIPCClientV2 → the local nucleus in its own "
             "process → mosquitto, until every reading has arrived; again at the nucleus's default 2.5 MiB spool")
    result.update(bench_ipc(readings, round(result["payload_bytes_per_reading"] * n), result["drain_readings_per_s"]))
    progress("rules: the raw-reading rule and its Firehose action, in the emulated cloud, against the drain")
    result.update(bench_rules(result["drain_readings_per_s"]))
    progress("messages: the bundled sample through a Gateway, as the demo sends it")
    result.update(bench_sample_messages())
    if score:
        progress("score: the scoring path Buffer.put runs vs raw onnxruntime, one tick (2,380 readings) a batch")
        result.update(bench_score(readings))
    progress(f"drain with IoT Core's flow control (awscrt, local=False): {iotcore_n:,} readings")
    result.update(bench_iotcore(readings[:iotcore_n] if iotcore_n <= n else _readings(iotcore_n)))
    result.update(capacity(result["wire_bytes_per_raw_reading"], result["raw_readings_per_message"],
                           result.get("wire_bytes_per_scored_reading"), result.get("scored_readings_per_message"),
                           measured_per_s=result["drain_iotcore_readings_per_s"], measured_key="drain_iotcore"))
    del readings
    progress(f"modbus poll: one cycle of {FLEET_METERS:,} meters on {MODBUS_PORTS} ports through the modbus source "
             "vs a bare pymodbus client, the simulated fleet in its own process")
    result.update(bench_modbus_poll())
    progress(f"keys: bytes written per reading, time-first vs meter-first ({key_prefill_ticks} ticks stored first)")
    result.update(bench_keys(key_ticks, key_prefill_ticks))
    progress(f"startup: open a buffer holding {startup_n:,} unsent readings and claim")
    result.update(bench_startup(startup_n))
    gateway_n = n if gateway_n is None else gateway_n
    progress("gateway: a real `gateway run` end to end (simulator → buffer → scoring → mosquitto), "
             "its peak RSS and disk writes")
    result.update(bench_gateway(gateway_n))
    if "stats_save_bytes_per_reading_at_1x" in result and result["gateway_scored"]:
        result["disk_bytes_written_per_reading_at_1x"] = at_real_time(result)
    result["bench_process_peak_rss_mb"] = peak_rss_mb()
    result.update(model_figures())
    return result


def at_real_time(result: dict[str, Any]) -> float:
    """Bytes written per reading by a gateway at the fleet's real rate, estimated from the fast
    run: it saved the meter statistics only once per ``save_every_s`` of its short wall time
    (and at the end) for all its readings, where a gateway at real time saves them for every
    ``save_every_s`` of readings. So: the run's bytes without its saves, plus one save's bytes
    spread over the readings between two saves at real time."""
    saves = 1 + int(result["gateway_seconds"] // result["stats_save_every_s"])
    rest = result["disk_bytes_written_per_reading"] * result["gateway_readings"] - saves * result["stats_save_bytes"]
    return max(rest, 0) / result["gateway_readings"] + result["stats_save_bytes_per_reading_at_1x"]


GOALS = {
    "ingest_ratio": (">=", 0.5),
    "drain_readings_per_s": (">=", 50_000),
    "ipc_drain_readings_per_s": (">=", 50_000),
    "ipc_drain_ratio": (">=", 0.5),
    "wire_bytes_per_reading": ("<=", 60),
    "peak_rss_mb": ("<=", 150),
    "startup_s": ("<=", 2.0),
    "modbus_poll_s": ("<=", 10.0),
    "rules_ratio": (">=", 1.0),
    "score_ratio": (">=", 0.5),
    "disk_bytes_written_per_reading": ("<=", 256),
    "disk_bytes_written_per_reading_at_1x": ("<=", 256),
}


def verdicts(result: dict[str, Any]) -> dict[str, bool]:
    out = {}
    for key, (op, goal) in GOALS.items():
        if key in result:
            out[key] = result[key] >= goal if op == ">=" else result[key] <= goal
    return out


def to_json(result: dict[str, Any]) -> str:
    return json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()})
