"""The local Firehose, configured by cloud/analytics.yaml: dynamic partitioning with the template's
JQ query, the Prefix and ErrorOutputPrefix expressions, the delimiter, GZIP, buffering by size and
by interval (an injected clock, never a sleep), and nothing lost under concurrent writers."""

from __future__ import annotations

import base64
import gzip
import json
import re
import threading
import time
from pathlib import Path

import pytest

from emulator.firehose import FirehoseError, LocalFirehose
from emulator.s3 import LocalBucket

TEMPLATE = Path(__file__).resolve().parent.parent / "cloud" / "analytics.yaml"
STREAM = "metergateway-readings"
T0 = 1740787200.0  # 2025-03-01T00:00:00Z
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(kind: str = "raw", site: str = "15", n: int = 1) -> bytes:
    """What the raw/scored rule forwards: the message plus kind, topic and received_ms."""
    readings = [["1433:electricity", 1483246800000 + i * 3600_000, 41.35] for i in range(n)]
    return json.dumps({"batch": "9f2c61d0a4b7e311", "thing": "gw-1", "site": site, "n": n,
                       "readings": readings, "kind": kind, "topic": f"dt/meters/{site}/gw-1/{kind}",
                       "received_ms": int(T0 * 1000)}, separators=(",", ":")).encode()


def lines(root: Path, key: str) -> list[bytes]:
    data = gzip.decompress(LocalBucket(root, "metergateway-data").get(key))
    assert data.endswith(b"\n")
    return data.split(b"\n")[:-1]


def small_template(tmp_path: Path, size_mb: float | None = None, interval_s: int | None = None) -> Path:
    text = TEMPLATE.read_text()
    if size_mb is not None:
        text = text.replace("SizeInMBs: 64", f"SizeInMBs: {size_mb}")
    if interval_s is not None:
        text = text.replace("IntervalInSeconds: 300", f"IntervalInSeconds: {interval_s}")
    path = tmp_path / "analytics.yaml"
    path.write_text(text)
    return path


def test_stream_is_configured_from_the_template(tmp_path):
    hose = LocalFirehose(tmp_path, timer=False)
    cfg = hose.streams[STREAM]
    assert cfg.bucket == "metergateway-data"
    assert cfg.prefix == "readings/kind=!{partitionKeyFromQuery:kind}/dt=!{timestamp:yyyy-MM-dd}/"
    assert cfg.error_prefix == "errors/firehose/!{firehose:error-output-type}/dt=!{timestamp:yyyy-MM-dd}/"
    assert (cfg.compression, cfg.size_bytes, cfg.interval_s) == ("GZIP", 64 * 1024 * 1024, 300.0)
    assert (cfg.partitioning, cfg.query, cfg.delimiter) == (True, "{kind: .kind}", b"\n")


def test_records_are_partitioned_by_kind_and_arrival_day_gzip_newline_delimited(tmp_path):
    clock = Clock()
    hose = LocalFirehose(tmp_path, clock=clock, timer=False)
    raw1, raw2, scored = record("raw"), record("raw", site="16"), record("scored")
    hose.put_record_batch(STREAM, [raw1, scored])
    clock.now += 60
    hose.put_record_batch(STREAM, [raw2])
    keys = sorted(hose.flush())
    assert len(keys) == 2
    assert re.fullmatch(rf"readings/kind=raw/dt=2025-03-01/{STREAM}-1-2025-03-01-00-00-00-{UUID}\.gz", keys[0])
    assert re.fullmatch(rf"readings/kind=scored/dt=2025-03-01/{STREAM}-1-2025-03-01-00-00-00-{UUID}\.gz", keys[1])
    assert lines(tmp_path, keys[0]) == [raw1, raw2]
    assert lines(tmp_path, keys[1]) == [scored]
    assert (hose.records_in, hose.records_delivered, hose.pending()) == (3, 3, 0)
    assert hose.flush() == []


def test_the_timestamp_prefix_is_the_oldest_records_arrival_in_utc(tmp_path):
    clock = Clock(T0 - 1)  # 2025-02-28T23:59:59Z
    hose = LocalFirehose(tmp_path, clock=clock, timer=False)
    hose.put_record_batch(STREAM, [record()])
    clock.now = T0 + 5
    hose.put_record_batch(STREAM, [record()])
    (key,) = hose.flush()
    assert key.startswith(f"readings/kind=raw/dt=2025-02-28/{STREAM}-1-2025-02-28-23-59-59-")
    assert len(lines(tmp_path, key)) == 2


def test_a_buffer_is_delivered_when_it_reaches_size_in_mbs(tmp_path):
    hose = LocalFirehose(tmp_path, small_template(tmp_path, size_mb=1), clock=Clock(), timer=False)
    big = record(n=300)  # about 11 KB
    per_object = -(-1024 * 1024 // (len(big) + 1))  # records that reach 1 MiB (before compression)
    hose.put_record_batch(STREAM, [big] * (per_object - 1))
    assert hose.objects == [] and hose.pending() == per_object - 1
    hose.put_record_batch(STREAM, [big, record("scored")])
    assert len(hose.objects) == 1 and "kind=raw" in hose.objects[0]
    assert len(lines(tmp_path, hose.objects[0])) == per_object
    assert hose.pending() == 1  # the scored partition has its own buffer


def test_a_buffer_is_delivered_when_its_oldest_record_is_interval_seconds_old(tmp_path):
    clock = Clock()
    hose = LocalFirehose(tmp_path, clock=clock, timer=False)
    hose.put_record_batch(STREAM, [record("raw")])
    clock.now += 200
    hose.put_record_batch(STREAM, [record("scored")])
    clock.now = T0 + 299.9
    assert hose.flush_due() == []
    clock.now = T0 + 300
    (key,) = hose.flush_due()
    assert "kind=raw" in key
    clock.now = T0 + 499
    assert hose.flush_due() == []
    clock.now = T0 + 500
    (key,) = hose.flush_due()
    assert "kind=scored" in key and hose.pending() == 0


def test_the_timer_thread_delivers_due_buffers(tmp_path):
    clock = Clock()
    hose = LocalFirehose(tmp_path, clock=clock)
    try:
        hose.put_record_batch(STREAM, [record()])
        clock.now += 300
        deadline = time.monotonic() + 10
        while hose.pending() and time.monotonic() < deadline:
            threading.Event().wait(0.02)
        assert hose.pending() == 0 and len(hose.objects) == 1
    finally:
        hose.close()


def test_close_delivers_everything(tmp_path):
    hose = LocalFirehose(tmp_path, clock=Clock())
    hose.put_record_batch(STREAM, [record("raw"), record("scored")])
    assert len(hose.close()) == 2
    assert len(LocalBucket(tmp_path, "metergateway-data").keys("readings/")) == 2


def test_records_without_a_partition_key_go_to_the_error_prefix_intact(tmp_path):
    hose = LocalFirehose(tmp_path, clock=Clock(), timer=False)
    no_kind = json.dumps({"batch": "x", "readings": []}).encode()
    hose.put_record_batch(STREAM, [no_kind, b"not json", record()])
    keys = sorted(hose.flush())
    assert len(keys) == 2
    assert re.fullmatch(rf"errors/firehose/processing-failed/dt=2025-03-01/{STREAM}-1-2025-03-01-00-00-00-{UUID}\.gz",
                        keys[0])
    docs = [json.loads(line) for line in lines(tmp_path, keys[0])]
    assert [base64.b64decode(d["rawData"]) for d in docs] == [no_kind, b"not json"]
    assert {d["errorCode"] for d in docs} == {"DynamicPartitioning.MetadataExtractionFailed"}
    assert "'kind' is null" in docs[0]["errorMessage"]
    assert (hose.records_in, hose.records_delivered, hose.records_failed) == (3, 1, 2)


def test_unknown_stream_and_oversized_batches_are_refused(tmp_path):
    hose = LocalFirehose(tmp_path, timer=False)
    with pytest.raises(FirehoseError, match=r"^ResourceNotFoundException: delivery stream 'other' not found"):
        hose.put_record_batch("other", [record()])
    with pytest.raises(FirehoseError, match=r"at most 500"):
        hose.put_record_batch(STREAM, [record()] * 501)
    assert hose.records_in == 0


def test_concurrent_writers_lose_nothing(tmp_path):
    hose = LocalFirehose(tmp_path, small_template(tmp_path, size_mb=0.05), clock=Clock(), timer=False)
    payloads = [[record(kind, site=str(t)) for _ in range(200)] for t, kind in
                enumerate(["raw", "scored", "raw", "scored"])]
    threads = [threading.Thread(target=lambda p=p: [hose.put_record_batch(STREAM, p[i:i + 20])
                                                   for i in range(0, len(p), 20)]) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    hose.close()
    written = [line for key in hose.objects for line in lines(tmp_path, key)]
    assert len(hose.objects) > 2
    assert sorted(written) == sorted(p for ps in payloads for p in ps)
