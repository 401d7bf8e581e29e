"""gateway bench --json: one JSON object as the last line, with every measure the issues name.

Speed is what the bench measures, as ratios against raw limits in the same run; these tests only
check that every stage ran and reported, and the arithmetic the README quotes, never how fast."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gateway import bench

REPO = Path(__file__).resolve().parents[1]


def test_bench_json_reports_every_stage():
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "bench", "--readings", "5000",
                          "--startup-readings", "50000", "--iotcore-readings", "3000", "--key-ticks", "2",
                          "--key-prefill-ticks", "5", "--json"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("ingest_ratio", "ingest_claimed_ratio", "ingest_claimed_readings_per_s", "drain_readings_per_s",
                "wire_bytes_per_reading", "wire_bytes_per_raw_reading", "wire_bytes_per_scored_reading",
                "raw_readings_per_message", "scored_readings_per_message", "sample_raw_readings_per_message",
                "sample_wire_bytes_per_raw_reading", "sample_wire_bytes_per_scored_reading",
                "peak_rss_mb", "score_ratio", "startup_s", "drain_ratio", "gateway_readings_per_s",
                "drain_iotcore_readings_per_s", "iotcore_raw_readings_per_s", "iotcore_scored_readings_per_s",
                "iotcore_scored_outage_drain_min", "drain_iotcore_outage_drain_min",
                "disk_bytes_written_per_reading", "wchar_per_reading", "stats_save_bytes",
                "ingest_scored_ratio", "stats_save_bytes_per_reading_at_1x", "disk_bytes_written_per_reading_at_1x",
                "keys_time_first_bytes_written_per_reading", "keys_meter_first_bytes_written_per_reading",
                "model_rmsle_alone", "model_rmsle_online", "ipc_drain_readings_per_s", "ipc_drain_ratio",
                "ipc_drain_acked_readings_per_s", "ipc_drain_spool_max_bytes", "ipc_drain_max_in_flight", "ipc_drain_default_max_in_flight",
                "ipc_drain_default_spool_readings_per_s", "modbus_poll_s", "modbus_poll_requests", "modbus_poll_raw_s",
                "modbus_poll_ratio", "rules_readings_per_s", "rules_ratio", "rules_engine_alone_readings_per_s",
                "rules_firehose_objects"):
        assert isinstance(result[key], (int, float)) and result[key] > 0, key
    assert result["readings"] == 5000
    assert result["gateway_scored"] is True
    assert result["drain_iotcore_scored"] is True
    assert result["drain_iotcore_readings"] == 3000
    assert result["drain_target"].startswith("local mosquitto")
    assert result["ipc_drain_target"].startswith("gateway → IpcPublisher(handoff) → GreengrassCoreIPCClientV2")
    assert result["ipc_drain_messages"] == result["messages"]  # the same backlog as the direct drain
    assert result["ipc_drain_duplicates"] == 0  # a spool that holds the backlog never refuses
    assert result["ipc_drain_spool_max_bytes"] >= 2 * 1024 * 1024 + 512 * 1024
    assert result["disk_filesystem"] not in ("tmpfs", "ramfs")  # else write_bytes would be 0
    assert result["wire_bytes_per_reading"] > result["payload_bytes_per_reading"]  # MQTT framing counted
    assert result["wire_bytes_per_scored_reading"] > result["wire_bytes_per_raw_reading"]
    assert (result["modbus_poll_meters"], result["modbus_poll_ports"]) == (2380, 10)  # the reference fleet
    assert result["modbus_poll_fleet"] == "its own process"
    assert result["iotcore_raw_binds"] in ("100 publishes/s", "512 KB/s")
    assert result["model_version"].startswith("ashrae-lgbm-")
    assert "· ingest: Buffer.put vs bare executemany" in out.stderr  # progress goes to stderr with --json


def test_capacity_names_the_binding_limit_and_the_outage_drain():
    # 100 readings a message: 512 KB/s binds (524288 / 53.6 = 9,781 < 100 x 100).
    full = bench.capacity(53.6, 100, 69.4, 100)
    assert full["iotcore_raw_binds"] == "512 KB/s"
    assert full["iotcore_raw_readings_per_s"] == pytest.approx(524288 / 53.6)
    assert full["iotcore_scored_readings_per_s"] == pytest.approx(524288 / (53.6 + 69.4))
    # 2,380 meters x 1/min for 72 h, drained while the fleet keeps reading.
    assert full["outage_readings"] == 2380 * 60 * 72
    fleet = 2380 / 60
    assert full["iotcore_scored_outage_drain_min"] == pytest.approx(
        2380 * 60 * 72 / (524288 / 123.0 - fleet) / 60)
    # 40 readings a message: the 100 publishes/s bind (4,000 < 9,781), and raw+scored is half of it.
    split = bench.capacity(53.6, 40, 69.4, 40, measured_per_s=1000, measured_key="drain_iotcore")
    assert split["iotcore_raw_binds"] == "100 publishes/s"
    assert split["iotcore_raw_readings_per_s"] == pytest.approx(4000)
    assert split["iotcore_scored_readings_per_s"] == pytest.approx(2000)
    assert split["drain_iotcore_outage_drain_min"] == pytest.approx(2380 * 60 * 72 / (1000 - fleet) / 60)
    # A connection slower than the fleet never drains.
    assert bench.capacity(53.6, 40, measured_per_s=10, measured_key="x")["x_outage_drain_min"] is None


def test_capacity_takes_iot_cores_limits_from_their_one_home(monkeypatch):
    """gateway.topics holds IoT Core's limits; the bench had a second copy, which a change to one
    would have left behind."""
    from gateway import topics

    monkeypatch.setattr(topics, "MAX_PUBLISHES_PER_S", 50)
    monkeypatch.setattr(topics, "MAX_BYTES_PER_S", 256 * 1024)
    assert bench.capacity(53.6, 40)["iotcore_raw_readings_per_s"] == pytest.approx(2000)
    assert bench.capacity(53.6, 100)["iotcore_raw_readings_per_s"] == pytest.approx(262144 / 53.6)


def test_a_stalled_stage_fails_loudly():
    with pytest.raises(bench.BenchError, match=r"^bench: the bare awscrt publish did not finish within 0.01 s$"):
        bench._await(threading.Event(), 0.01, "the bare awscrt publish")


def test_model_figures_come_from_the_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({
        "version": "m-1", "metrics": {"rmsle_model": {"overall": 1.75}, "rmsle_model_clean": {"overall": 1.29},
                                      "rmsle_online": {"overall": 0.8}, "anomaly": {"auc": 0.98}}}))
    assert bench.model_figures(tmp_path) == {
        "model_version": "m-1", "model_rmsle_alone": 1.75, "model_rmsle_alone_working_meters": 1.29,
        "model_rmsle_online": 0.8, "model_anomaly_auc": 0.98}


def test_bench_files_go_to_a_real_disk():
    with bench.disk_tempdir() as d:
        assert bench.filesystem_of(d) not in ("tmpfs", "ramfs")


def test_real_time_estimate_spreads_one_save_over_the_readings_between_saves():
    # A 10 s run of 100,000 readings wrote 20 MB, one 3 MB save of the statistics among them;
    # at real time a save comes every 300 s of the fleet's readings (11,900), 250 bytes each.
    result = {"gateway_seconds": 10.0, "gateway_readings": 100_000, "disk_bytes_written_per_reading": 200.0,
              "stats_save_every_s": 300.0, "stats_save_bytes": 3_000_000, "stats_save_bytes_per_reading_at_1x": 250.0}
    assert bench.at_real_time(result) == pytest.approx((20_000_000 - 3_000_000) / 100_000 + 250)


def test_a_drain_that_stalls_or_retries_fails_loudly(tmp_path):
    from gateway.buffer import Buffer
    from gateway.forwarder import Forwarder
    from gateway.publishers import MemoryPublisher

    buf = Buffer(tmp_path / "buffer.db", synchronous="normal")
    buf.put(bench._readings(10, meters=10))
    twin = MemoryPublisher()
    twin.online = False  # every publish fails and is retried after a backoff: never drains
    with pytest.raises(bench.BenchError, match=r"^bench: the drain: forwarder did not drain within 0.2 s"):
        bench._drain(Forwarder(buf, twin, "gw"), 0.2, "the drain")
    twin.online = True
    fwd = Forwarder(buf, twin, "gw")
    fwd.failures = 1  # as if a publish had failed and been retried inside the time
    with pytest.raises(bench.BenchError, match=r"^bench: the drain: 1 failed publishes were retried inside the time$"):
        bench._drain(fwd, 30, "the drain")
    buf.close()


def test_the_ipc_drains_spool_holds_twice_the_backlog_and_never_less_than_the_nucleus_default():
    mib = 1024 * 1024
    assert bench.ipc_spool_bytes(10_700_000) == 21 * mib  # 2 x 10.7 MB = 20.4 MiB, whole MiB up
    assert bench.ipc_spool_bytes(1000) == bench.NUCLEUS_DEFAULT_SPOOL_BYTES == 2_621_440


@pytest.mark.parametrize("own_process", [True, False], ids=["fleet-in-its-own-process", "fleet-in-the-bench"])
def test_the_modbus_poll_sends_each_meters_planned_requests_once_a_cycle(own_process):
    # 50 meters of the shipped maps in turn (sorted: EM24, SDM630, iEM3000): 17 EM24 and 16
    # iEM3000 read in 2 requests each, 17 SDM630 in 3; the fleet counts what it received.
    result = bench.bench_modbus_poll(meters=50, ports=2, own_process=own_process, rounds=1)
    assert result["modbus_poll_requests"] == 17 * 2 + 17 * 3 + 16 * 2
    assert (result["modbus_poll_meters"], result["modbus_poll_ports"]) == (50, 2)
    for key in ("modbus_poll_s", "modbus_poll_raw_s", "modbus_poll_ratio"):
        assert isinstance(result[key], float) and result[key] > 0, key
    where = "its own process" if own_process else "the bench's process (sharing its GIL)"
    assert result["modbus_poll_fleet"] == where
