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


def bench_ingest(readings: list[Reading], batch: int = 2380, synchronous: str = "full") -> dict[str, float]:
    """Readings per second: Buffer.put vs a bare executemany, same batches, same pragmas."""
    from gateway.buffer import Buffer

    with tempfile.TemporaryDirectory() as d:
        # Raw: the same tuples the buffer writes, into a minimal table, one commit per batch.
        db = sqlite3.connect(os.path.join(d, "raw.db"), isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        db.execute("CREATE TABLE raw(ts INTEGER, meter INTEGER, value REAL, source INTEGER)")
        ids = {r.meter_id: i for i, r in enumerate({r.meter_id: r for r in readings[:5000]}.values(), 1)}
        rows = [(r.ts, ids.get(r.meter_id, 0), r.value, 1) for r in readings]
        t0 = time.perf_counter()
        for i in range(0, len(rows), batch):
            db.execute("BEGIN")
            db.executemany("INSERT INTO raw VALUES(?, ?, ?, ?)", rows[i : i + batch])
            db.execute("COMMIT")
        raw_s = time.perf_counter() - t0
        db.close()
        del rows

        buf = Buffer(os.path.join(d, "buffer.db"), synchronous=synchronous)
        t0 = time.perf_counter()
        for i in range(0, len(readings), batch):
            buf.put(readings[i : i + batch], source="bench", position=i + batch)
        ours_s = time.perf_counter() - t0
        buf.close()
    n = len(readings)
    return {
        "ingest_readings_per_s": n / ours_s,
        "ingest_raw_readings_per_s": n / raw_s,
        "ingest_ratio": raw_s / ours_s,
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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run(n: int = 200_000, *, score: bool = True, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run every stage; return one flat dict of results."""
    result: dict[str, Any] = {"readings": n}
    progress(f"generating {n:,} simulated readings (2,380 meters)")
    readings = _readings(n)
    progress("ingest: Buffer.put vs bare executemany")
    result.update(bench_ingest(readings))
    progress("drain: forwarder → mosquitto vs bare awscrt publish")
    result.update(bench_drain(readings))
    del readings
    if score:
        result.update(_score())
        if "score_ratio" in result:
            progress("score: featurize + onnxruntime + online update vs raw onnxruntime")
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def _score() -> dict[str, Any]:
    try:
        from gateway.model.bench import bench_score
        from gateway.model.paths import default_buildings, default_model
    except ImportError:
        return {}
    model, buildings = default_model(), default_buildings()
    if model is None or buildings is None:
        return {}
    return bench_score(model, buildings)


GOALS = {
    "ingest_ratio": (">=", 0.5),
    "drain_readings_per_s": (">=", 50_000),
    "wire_bytes_per_reading": ("<=", 60),
    "peak_rss_mb": ("<=", 150),
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
