"""``gateway bench``: each stage measured against its raw limit, in the same run.

- **ingest**: :meth:`Buffer.put` (validation, the time-first key, duplicate detection, the
  source position in the same transaction) against a bare ``executemany`` of the same tuples
  into a minimal table, with the same journal mode, synchronous setting and batch size.
- **drain**: the forwarder (claim, encode JSON, publish QoS 1, wait for PUBACKs, ack in the
  buffer) to a local mosquitto over mutual TLS, flow control off, against a bare awscrt MQTT5
  client publishing the same payloads with the same window.
- **wire bytes per reading**: MQTT PUBLISH packets (fixed header, topic, packet id, properties
  length, payload) divided by readings; TLS record overhead is not counted.
- **score** (when a model is present): featurization + onnxruntime + online per-meter update
  against raw onnxruntime on a prebuilt feature matrix.
- **peak RSS** of this process.

Ratios, not seconds, are the result: the raw limit is measured on the same machine, in the
same run, so the ratio means the same on a laptop and on a gateway.
"""

from __future__ import annotations

import json
import os
import resource
import sqlite3
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gateway.readings import Reading

THING = "bench-gw"


def _readings(n: int, meters: int = 2380) -> list[Reading]:
    from gateway.sources.simulator import SimulatorSource

    ticks = max(1, -(-n // meters))
    src = SimulatorSource("bench", meters=meters, seed=7, start_ms=1_700_000_000_000, speed=None,
                          count=ticks, batch_size=meters * 10)
    out: list[Reading] = []
    for batch in src.batches(None, threading.Event()):
        out.extend(batch.readings)
    return out[:n]


def bench_ingest(readings: list[Reading], batch: int = 2380, synchronous: str = "full",
                 rounds: int = 3) -> dict[str, float]:
    """Readings per second: Buffer.put vs a bare executemany, same batches, same pragmas.

    Each side runs ``rounds`` times, alternating, into a fresh file; the best of each counts
    (the least disturbed run is the closest to what the code itself costs)."""
    from gateway.buffer import Buffer

    ids = {r.meter_id: i for i, r in enumerate({r.meter_id: r for r in readings[:5000]}.values(), 1)}
    rows = [(r.ts, ids.get(r.meter_id, 0), r.value, 1) for r in readings]
    raw_best = ours_best = float("inf")
    with tempfile.TemporaryDirectory() as d:
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
            raw_best = min(raw_best, time.perf_counter() - t0)
            db.close()

            buf = Buffer(os.path.join(d, f"buffer{k}.db"), synchronous=synchronous)
            t0 = time.perf_counter()
            for i in range(0, len(readings), batch):
                buf.put(readings[i : i + batch], source="bench", position=i + batch)
            ours_best = min(ours_best, time.perf_counter() - t0)
            buf.close()
    n = len(readings)
    return {
        "ingest_readings_per_s": n / ours_best,
        "ingest_raw_readings_per_s": n / raw_best,
        "ingest_ratio": raw_best / ours_best,
    }


def _mqtt_packet_bytes(topic: str, payload: bytes) -> int:
    """Size of an MQTT5 QoS 1 PUBLISH carrying ``payload`` on ``topic`` (no properties)."""
    body = 2 + len(topic.encode()) + 2 + 1 + len(payload)  # topic, packet id, properties length
    length_bytes = 1 if body < 128 else 2 if body < 16384 else 3 if body < 2_097_152 else 4
    return 1 + length_bytes + body


def bench_drain(readings: list[Reading], window: int = 64) -> dict[str, Any]:
    """Forwarder to a local mosquitto (mTLS, flow control off) vs a bare awscrt publish."""
    from awscrt import mqtt5

    from gateway.broker import Mosquitto, make_certs
    from gateway.buffer import Buffer
    from gateway.forwarder import Forwarder
    from gateway.publishers import MemoryPublisher
    from gateway.publishers.mqtt import MqttPublisher

    with tempfile.TemporaryDirectory() as d:
        certs = make_certs(Path(d) / "certs", [THING])
        client = certs.client(THING)
        with Mosquitto(Path(d) / "broker", certs) as broker:
            buf = Buffer(os.path.join(d, "buffer.db"), synchronous="normal")
            for i in range(0, len(readings), 10_000):
                buf.put(readings[i : i + 10_000])

            # The payloads the forwarder will send, captured through the in-memory twin on a copy.
            twin = MemoryPublisher()
            shadow = Buffer(os.path.join(d, "shadow.db"), synchronous="normal")
            for i in range(0, len(readings), 10_000):
                shadow.put(readings[i : i + 10_000])
            Forwarder(shadow, twin, THING, window=window).drain(timeout_s=600)
            shadow.close()
            messages = [(m.topic, m.payload) for m in twin.messages]
            wire = sum(_mqtt_packet_bytes(t, p) for t, p in messages)

            # Raw: a bare awscrt MQTT5 client, the same payloads, the same window.
            raw_pub = MqttPublisher("localhost", THING + "-raw", client.cert, client.key, certs.ca,
                                    port=broker.port, local=True)
            raw_pub.start()
            if not raw_pub.wait_connected(10):
                raise RuntimeError("bench: raw client could not connect to the local broker")
            crt = raw_pub._client
            sem = threading.Semaphore(window)
            done = threading.Event()
            left = [len(messages)]
            lock = threading.Lock()

            def finished(_f: Future) -> None:
                sem.release()
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

            t0 = time.perf_counter()
            for topic, payload in messages:
                sem.acquire()
                crt.publish(mqtt5.PublishPacket(topic=topic, payload=payload, qos=mqtt5.QoS.AT_LEAST_ONCE)
                            ).add_done_callback(finished)
            done.wait(600)
            raw_s = time.perf_counter() - t0
            raw_pub.close()

            pub = MqttPublisher("localhost", THING, client.cert, client.key, certs.ca, port=broker.port, local=True)
            pub.start()
            if not pub.wait_connected(10):
                raise RuntimeError("bench: forwarder client could not connect to the local broker")
            fwd = Forwarder(buf, pub, THING, window=window)
            t0 = time.perf_counter()
            fwd.drain(timeout_s=600)
            ours_s = time.perf_counter() - t0
            pub.close()
            buf.close()
    n = len(readings)
    return {
        "drain_readings_per_s": n / ours_s,
        "drain_raw_readings_per_s": n / raw_s,
        "drain_ratio": raw_s / ours_s,
        "drain_target": "local mosquitto 2.0, mutual TLS, flow control off (local=True)",
        "messages": len(messages),
        "wire_bytes_per_reading": wire / n,
        "payload_bytes_per_reading": sum(len(p) for _, p in messages) / n,
    }


def bench_startup(n: int = 3_000_000, meters: int = 2380) -> dict[str, Any]:
    """Opening a buffer that holds ``n`` unsent readings and claiming the first batch: what a
    gateway does at start-up after days offline."""
    from gateway.buffer import Buffer

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "buffer.db")
        buf = Buffer(path, synchronous="normal")
        t0 = 1_767_225_600_000
        buf.put([Reading(str(m % 16), str(m), "electricity", t0, 1.0, "bench") for m in range(meters)])
        db = buf.db
        db.execute("BEGIN")
        ticks = n // meters
        for t in range(1, ticks):
            ts = t0 + t * 60_000
            db.executemany("INSERT INTO readings VALUES(?, ?, 1.0, 1)", [(ts, m) for m in range(1, meters + 1)])
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


def bench_gateway(n: int, meters: int = 2380) -> dict[str, Any]:
    """A real ``gateway run`` process, end to end: simulated fleet as fast as possible → buffer →
    scoring → mosquitto over mTLS, until everything is acknowledged. Its peak RSS is the
    gateway's memory under load (the bench process itself holds test data and is no measure)."""
    import subprocess
    import sys

    import yaml

    from gateway.broker import Mosquitto, make_certs
    from gateway.model.paths import default_buildings, default_model

    ticks = max(1, n // meters)
    with tempfile.TemporaryDirectory() as d:
        certs = make_certs(Path(d) / "certs", [THING])
        client = certs.client(THING)
        with Mosquitto(Path(d) / "broker", certs) as broker:
            conf: dict[str, Any] = {
                "thing": THING,
                "log_level": "WARNING",
                "buffer": {"path": os.path.join(d, "buffer.db")},
                "sources": [{"type": "simulator", "name": "sim", "meters": meters, "speed": None,
                             "count": ticks, "start": "2026-01-01T00:00:00Z"}],
                "publisher": {"type": "mqtt", "endpoint": "localhost", "port": broker.port,
                              "cert": str(client.cert), "key": str(client.key), "ca": str(certs.ca), "local": True},
            }
            model, buildings = default_model(), default_buildings()
            if model is not None and buildings is not None:
                conf["model"] = {"path": str(model), "buildings": str(buildings)}
            path = Path(d) / "gateway.yaml"
            path.write_text(yaml.safe_dump(conf))
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(path),
                                     "--exit-when-idle"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            # VmHWM is the process's own high-water mark since exec (ru_maxrss of a child would
            # count the parent's pages it held between fork and exec). Read it until exit.
            hwm_kb = 0
            status_file = Path(f"/proc/{proc.pid}/status")
            while proc.poll() is None:
                try:
                    for line in status_file.read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            hwm_kb = max(hwm_kb, int(line.split()[1]))
                except (OSError, ValueError):
                    pass
                try:
                    proc.wait(0.05)
                except subprocess.TimeoutExpired:
                    pass
            seconds = time.perf_counter() - t0
            out = proc.stdout.read() + proc.stderr.read()
            if proc.returncode != 0:
                raise RuntimeError(f"bench: gateway run failed: {out[-2000:]}")
    return {
        "gateway_readings": ticks * meters,
        "gateway_scored": "model" in conf,
        "gateway_readings_per_s": ticks * meters / seconds,
        "peak_rss_mb": hwm_kb / 1024,
    }


def run(n: int = 200_000, *, score: bool = True, startup_n: int = 3_000_000,
        progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run every stage; return one flat dict of results."""
    result: dict[str, Any] = {"readings": n}
    progress(f"generating {n:,} simulated readings (2,380 meters)")
    readings = _readings(n)
    progress("ingest: Buffer.put vs bare executemany")
    result.update(bench_ingest(readings))
    progress("drain: forwarder → mosquitto vs bare awscrt publish")
    result.update(bench_drain(readings))
    if score:
        progress("score: the forwarder's scoring path vs raw onnxruntime, 1,000-reading claims")
        result.update(bench_score(readings))
    del readings
    progress(f"startup: open a buffer holding {startup_n:,} unsent readings and claim")
    result.update(bench_startup(startup_n))
    progress("gateway: a real `gateway run` end to end (simulator → buffer → scoring → mosquitto), its peak RSS")
    result.update(bench_gateway(n))
    result["bench_process_peak_rss_mb"] = peak_rss_mb()
    return result


def bench_score(readings: list[Reading], claim: int = 1000) -> dict[str, Any]:
    """The forwarder's scoring path (ReadingScorer.score_rows: metadata, weather look-up,
    featurize, onnxruntime, online update, scored rows) on claim-sized batches, against raw
    onnxruntime on the same rows' prebuilt feature matrix in the same batches."""
    from gateway.buffer import MeterInfo
    from gateway.model.features import Buildings, featurize
    from gateway.model.online import MeterStats
    from gateway.model.paths import default_buildings, default_model
    from gateway.model.scoring import ModelHolder, ReadingScorer
    from gateway.readings import METER_CODE
    from gateway.sources.weather import WeatherReplay

    model_dir, buildings_csv = default_model(), default_buildings()
    if model_dir is None or buildings_csv is None:
        return {}
    buildings = Buildings.from_csv(buildings_csv)
    weather_path = Path(__file__).resolve().parents[1] / "data" / "sample" / "weather_2016.json.gz"
    weather = WeatherReplay(weather_path).table(retain_ms=None) if weather_path.exists() else None
    meters: dict[int, MeterInfo] = {}
    ids: dict[str, int] = {}
    rows = []
    for r in readings:
        mid = ids.get(r.meter_id)
        if mid is None:
            mid = ids[r.meter_id] = len(ids) + 1
            meters[mid] = MeterInfo(r.site, r.building, r.meter)
        rows.append((r.ts, mid, r.value))
    holder = ModelHolder(model_dir, threads=1)
    scorer = ReadingScorer(holder, buildings, stats=MeterStats(), weather=weather)
    scorer.score_rows(rows[:claim], meters)  # warm up: holiday tables, first allocations
    scorer = ReadingScorer(holder, buildings, stats=MeterStats(), weather=weather)
    t0 = time.perf_counter()
    for i in range(0, len(rows), claim):
        scorer.score_rows(rows[i : i + claim], meters)
    ours_s = time.perf_counter() - t0

    b = buildings.ids(np.array([r.building for r in readings]))
    ok = buildings.is_known(b)
    X = featurize(buildings, b[ok], np.array([METER_CODE[r.meter] for r in readings])[ok],
                  np.array([r.ts for r in readings])[ok], {})
    session, name = holder.current._session, holder.current._input
    t0 = time.perf_counter()
    for i in range(0, len(X), claim):
        session.run(None, {name: X[i : i + claim]})
    raw_s = time.perf_counter() - t0
    return {
        "score_readings_per_s": len(rows) / ours_s,
        "score_raw_rows_per_s": len(X) / raw_s,
        "score_ratio": (len(rows) / ours_s) / (len(X) / raw_s),
        "score_batch": claim,
    }


GOALS = {
    "ingest_ratio": (">=", 0.5),
    "drain_readings_per_s": (">=", 50_000),
    "wire_bytes_per_reading": ("<=", 60),
    "peak_rss_mb": ("<=", 150),
    "startup_s": ("<=", 2.0),
    "score_ratio": (">=", 0.5),
}


def verdicts(result: dict[str, Any]) -> dict[str, bool]:
    out = {}
    for key, (op, goal) in GOALS.items():
        if key in result:
            out[key] = result[key] >= goal if op == ">=" else result[key] <= goal
    return out


def to_json(result: dict[str, Any]) -> str:
    return json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()})
