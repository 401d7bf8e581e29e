"""Scoring in the agent: hot swap under load, statistics across restarts, anomalies, unscorable
readings, stale weather."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

from gateway.buffer import Buffer
from gateway.errors import DiskFull, ModelError
from gateway.forwarder import Forwarder
from gateway.messages import decode
from gateway.model.features import Buildings
from gateway.model.online import MeterStats
from gateway.model.paths import default_buildings, default_model
from gateway.model.scoring import ModelHolder, ReadingScorer, stored_status
from gateway.publishers import MemoryPublisher
from gateway.readings import Reading
from gateway.sources.simulator import SimulatorSource
from gateway.sources.weather import LatestWeather

from faults import DiskFullOn, FailingConnection

MODEL = default_model()
BUILDINGS = default_buildings()
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
MIN = 60_000


@pytest.fixture(scope="module")
def buildings() -> Buildings:
    assert BUILDINGS is not None and MODEL is not None, "the shipped model and metadata are part of the repo"
    return Buildings.from_csv(BUILDINGS)


def copy_model(dst: Path, version: str | None = None) -> Path:
    """A copy of the shipped model; with ``version``, the same graph under another version."""
    shutil.copytree(MODEL, dst)
    if version is not None:
        m = onnx.load(dst / "model.onnx")
        for p in m.metadata_props:
            if p.key == "model_version":
                p.value = version
        onnx.save(m, dst / "model.onnx")
    return dst


def fleet(meters: int, ticks: int, anomaly_rate: float = 0.0, seed: int = 5) -> tuple[list[Reading], SimulatorSource]:
    src = SimulatorSource("sim", meters=meters, seed=seed, start_ms=START_MS, speed=None, count=ticks,
                          anomaly_rate=anomaly_rate)
    out = [r for b in src.batches(None, threading.Event()) for r in b.readings]
    return out, src


def scored_of(messages) -> list[tuple[str, list]]:
    return [(decode(m.payload)["model"], r) for m in messages if m.topic.endswith("/scored")
            for r in decode(m.payload)["readings"]]


# ---------------------------------------------------------------- hot swap


def test_hot_swap_under_load_loses_nothing_and_scores_nothing_twice(tmp_path, buildings):
    good = copy_model(tmp_path / "v2", version="test-v2")
    bad_golden = copy_model(tmp_path / "bad-golden", version="test-bad")
    g = json.loads((bad_golden / "golden.json").read_text())
    g["expected"] = [v + 0.5 for v in g["expected"]]
    (bad_golden / "golden.json").write_text(json.dumps(g))
    broken = copy_model(tmp_path / "broken")
    (broken / "model.onnx").write_bytes(b"not an onnx model")

    holder = ModelHolder(MODEL)
    first = holder.version
    buf = Buffer(tmp_path / "buffer.db", live_window_ms=10**12)
    buf.scorer = ReadingScorer(holder, buildings, db_path=tmp_path / "buffer.db")
    pub = MemoryPublisher()
    fwd = Forwarder(buf, pub, "gw-1", claim_size=200)
    readings, _ = fleet(meters=100, ticks=120)  # 12,000 readings

    stop = threading.Event()
    runner = threading.Thread(target=fwd.run, args=(stop,))
    runner.start()
    swaps = [(3000, bad_golden, False), (5000, good, True), (8000, broken, False)]
    for i in range(0, len(readings), 500):
        buf.put(readings[i : i + 500])
        while swaps and i >= swaps[0][0]:
            _, path, ok = swaps.pop(0)
            assert holder.swap(path) is ok
            if not ok:
                assert holder.last_error.startswith(f"kept {holder.version}: ")
    with fwd.settled:
        assert fwd.settled.wait_for(lambda: buf.pending() == 0 and not fwd.messages_in_flight, timeout=60)
    stop.set()
    runner.join()

    scored = scored_of(pub.messages)
    keys = [(r[0], r[1]) for _, r in scored]
    assert len(keys) == len(set(keys)) == len(readings)  # every reading scored exactly once
    assert set(keys) == {(r.meter_id, r.ts) for r in readings}
    versions = [v for v, _ in scored]
    assert set(versions) == {first, "test-v2"}
    # One model per put: once v2 is in, no message carries the old version again.
    assert versions.index("test-v2") > 0 and first not in versions[versions.index("test-v2"):]
    assert holder.swaps == 1
    refused = [h for h in holder.history if h[0] == "refused"]
    assert len(refused) == 2
    assert "golden vectors do not match" in refused[0][1]
    assert "cannot load" in refused[1][1]
    assert holder.last_error.startswith("kept test-v2: ") and "cannot load" in holder.last_error


def test_a_changed_model_folder_is_picked_up_and_checked(tmp_path, buildings):
    live = copy_model(tmp_path / "model")
    now = [0.0]
    holder = ModelHolder(live, check_every_s=2, clock=lambda: now[0])
    v1 = holder.version
    staged = copy_model(tmp_path / "staged", version="test-v3")
    for name in ("model.onnx", "golden.json", "manifest.json"):  # a deployment writes the folder
        (staged / name).replace(live / name)
    assert holder.maybe_reload() is False  # not yet time to look
    now[0] += 3
    assert holder.maybe_reload() is True
    assert holder.version == "test-v3" and v1 != "test-v3"
    (live / "golden.json").write_text('{"rows": [[1, 2]], "expected": [0]}')
    now[0] += 3
    assert holder.maybe_reload() is False
    assert holder.version == "test-v3"
    assert "golden vectors must be rows of" in holder.last_error


def test_a_bad_first_model_refuses_to_start(tmp_path):
    from gateway.errors import ModelError

    broken = copy_model(tmp_path / "broken")
    (broken / "model.onnx").write_bytes(b"junk")
    with pytest.raises(ModelError, match=r"model\.onnx: cannot load"):
        ModelHolder(broken)


# ---------------------------------------------------------------- statistics persist


def test_meter_statistics_survive_a_restart(tmp_path, buildings):
    readings, _ = fleet(meters=30, ticks=60)
    rows_by_tick = {}
    meters = {}
    ids = {}
    for r in readings:
        mid = ids.setdefault(r.meter_id, len(ids) + 1)
        from gateway.buffer import MeterInfo

        meters[mid] = MeterInfo(r.site, r.building, r.meter)
        rows_by_tick.setdefault(r.ts, []).append((r.ts, mid, r.value))
    ticks = sorted(rows_by_tick)
    holder = ModelHolder(MODEL)

    straight = ReadingScorer(holder, buildings)
    for t in ticks:
        _, expected_rows = straight.score_rows(rows_by_tick[t], meters)

    db = tmp_path / "buffer.db"
    first = ReadingScorer(holder, buildings, db_path=db)
    for t in ticks[:-1]:
        first.score_rows(rows_by_tick[t], meters)
    first.close()  # the gateway stops (or is restarted)
    second = ReadingScorer(holder, buildings, db_path=db)
    assert len(second.stats) == 30
    _, after_restart = second.score_rows(rows_by_tick[ticks[-1]], meters)
    assert after_restart == expected_rows  # the same expectations and scores as without a restart
    second.close()


def _messages_of(buf, limit=200):
    """Every message a forwarder would send for what the buffer holds now, without acknowledging."""
    pub = MemoryPublisher()
    fwd = Forwarder(buf, pub, "gw-1", claim_size=limit)
    out = []
    while (claim := buf.claim(limit)) is not None:
        out += fwd._messages(claim)
    buf.release_all()
    return {payload for _, payload, _ in out}


def test_scores_and_batch_ids_are_the_same_across_a_resend_a_crash_and_an_outage(tmp_path, buildings):
    """Scored at ingest and stored: a message sent again carries the same bytes and batch id,
    and a flagged spike stays flagged."""
    readings, _ = fleet(meters=20, ticks=60, anomaly_rate=0.02, seed=5)
    path = tmp_path / "buffer.db"
    buf = Buffer(path, live_window_ms=10**12, scorer=ReadingScorer(ModelHolder(MODEL), buildings, db_path=path))
    for i in range(0, len(readings), 100):
        buf.put(readings[i : i + 100])
    first = _messages_of(buf)
    flags = [r[5] for p in first if "model" in (m := decode(p)) for r in m["readings"]]
    assert len(flags) == len(readings) and 0 < sum(flags) < len(flags) / 10  # spikes are flagged
    assert _messages_of(buf) == first  # a resend after a failed publish: the same bytes
    buf.close()  # a crash or a restart: claims are lost, scores are not
    buf = Buffer(path, live_window_ms=10**12, scorer=ReadingScorer(ModelHolder(MODEL), buildings, db_path=path))
    assert _messages_of(buf) == first
    buf.close()
    # After an outage, with a live lane: claimed in another order, every reading keeps its scores.
    later = Buffer(path, live_window_ms=10 * MIN, clock=lambda: (readings[-1].ts + MIN) / 1000)
    rows = {}
    while (claim := later.claim(137)) is not None:
        assert claim.lane in ("live", "backlog")
        for r in claim.rows:
            rows[(r[0], r[1])] = r
    scored = {}
    for p in first:
        msg = decode(p)
        if "model" in msg:
            for meter, ts, value, expected, score, flag in msg["readings"]:
                scored[(meter, ts)] = (value, expected, score, flag)
    meters = later.meters
    again = {(meters[mid].key, ts): (r[2], r[3], r[4], r[5]) for (ts, mid), r in rows.items()}
    assert again == scored
    later.close()


def test_a_put_that_rolls_back_forgets_what_its_scoring_learned(tmp_path, buildings, monkeypatch):
    readings, _ = fleet(meters=5, ticks=40)
    control = Buffer(tmp_path / "control.db", live_window_ms=10**12, scorer=ReadingScorer(ModelHolder(MODEL), buildings))
    for i in range(0, len(readings), 50):
        control.put(readings[i : i + 50])
    buf = Buffer(tmp_path / "buffer.db", live_window_ms=10**12, scorer=ReadingScorer(ModelHolder(MODEL), buildings))
    for i in range(0, len(readings), 50):
        if i == 100:  # this batch is scored, then its insert fails: the disk is full
            real = buf.db
            failing = FailingConnection(real, {"failed": 0, "failed_after_delete": 0})
            failing.armed = True
            monkeypatch.setattr(buf, "db", failing)
            with pytest.raises(DiskFull):
                buf.put(readings[i : i + 50])
            monkeypatch.setattr(buf, "db", real)
        buf.put(readings[i : i + 50])
    assert _messages_of(buf, 1000) == _messages_of(control, 1000)  # as if the failed put never happened
    assert buf.status()["stored"] == len(readings)


# ---------------------------------------------------------------- anomalies, unscorable, weather


def test_injected_anomalies_are_flagged_and_clean_readings_mostly_not(tmp_path, buildings):
    readings, src = fleet(meters=200, ticks=150, anomaly_rate=0.01, seed=11)
    scorer = ReadingScorer(ModelHolder(MODEL), buildings)
    buf = Buffer(tmp_path / "buffer.db", live_window_ms=10**12, scorer=scorer)
    pub = MemoryPublisher()
    fwd = Forwarder(buf, pub, "gw-1")
    for i in range(0, len(readings), 2000):
        buf.put(readings[i : i + 2000])
        fwd.drain()
    labels = {(lab.meter_id, lab.ts) for lab in src.labels}
    warm = START_MS + 30 * MIN  # after 30 readings a meter has its statistics
    flags = {(r[0], r[1]): r[5] for _, r in scored_of(pub.messages) if r[1] >= warm}
    anomalous = [flags[k] for k in labels if k in flags]
    clean = [f for k, f in flags.items() if k not in labels]
    assert len(anomalous) >= 100
    assert np.mean(anomalous) >= 0.8, f"only {np.mean(anomalous):.2f} of injected anomalies flagged"
    assert np.mean(clean) <= 0.03, f"{np.mean(clean):.3f} of clean readings flagged"


def test_a_building_without_metadata_is_forwarded_raw_and_explained(tmp_path, buildings):
    buf = Buffer(tmp_path / "buffer.db", live_window_ms=10**12)
    pub = MemoryPublisher()
    scorer = buf.scorer = ReadingScorer(ModelHolder(MODEL), buildings, db_path=tmp_path / "buffer.db")
    known = Reading("15", "1433", "electricity", START_MS, 40.0, "t")
    stranger = Reading("15", "99999", "electricity", START_MS, 12.0, "t")
    buf.put([known, stranger])
    Forwarder(buf, pub, "gw-1").drain()
    raw = [r for m in pub.messages if m.topic.endswith("/raw") for r in decode(m.payload)["readings"]]
    scored = [r for _, r in scored_of(pub.messages)]
    assert sorted(r[0] for r in raw) == ["1433:electricity", "99999:electricity"]
    assert [r[0] for r in scored] == ["1433:electricity"]
    scorer.save()
    st = stored_status(scorer._db)
    assert st["unscored"] == 1
    assert st["unscored_reasons"] == {"building 99999: no metadata": 1}
    scorer.close()


def test_stale_or_missing_weather_degrades_to_nan_never_a_stop(buildings):
    from gateway.buffer import MeterInfo

    table = LatestWeather()
    table.update([{"site_id": "15", "timestamp": START_MS - 10 * 3600_000, "air_temperature": 3.0}])
    s = ReadingScorer(ModelHolder(MODEL), buildings, weather=table, weather_max_age_ms=3600_000)
    meters = {1: MeterInfo("15", "1433", "electricity")}
    version, out = s.score_rows([(START_MS, 1, 40.0)], meters)
    assert out[0] is not None and out[0][3] > 0  # an expectation, from NaN weather
    w = s._weather(np.array([15]), np.array([START_MS]))
    assert np.isnan(w["air_temperature"][0])  # ten hours old is stale at a one-hour limit


def test_scored_message_carries_expected_score_flag_and_model(tmp_path, buildings):
    holder = ModelHolder(MODEL)
    buf = Buffer(tmp_path / "buffer.db", live_window_ms=10**12, scorer=ReadingScorer(holder, buildings))
    pub = MemoryPublisher()
    buf.put([Reading("15", "1433", "electricity", START_MS + i * MIN, 40.0 + i, "t") for i in range(3)])
    Forwarder(buf, pub, "gw-1").drain()
    [msg] = [m for m in pub.messages if m.topic.endswith("/scored")]
    assert msg.topic == "dt/meters/15/gw-1/scored"
    body = decode(msg.payload)
    assert body["model"] == holder.version and body["n"] == 3
    from gateway.buffer import MeterInfo

    _, control = ReadingScorer(holder, buildings).score_rows(  # the same readings, scored directly
        [(START_MS + i * MIN, 1, 40.0 + i) for i in range(3)], {1: MeterInfo("15", "1433", "electricity")})
    assert body["readings"] == control  # stored as integers of their unit, read back as the same floats
    for meter, ts, value, expected, score, flag in body["readings"]:
        assert meter == "1433:electricity" and expected > 0 and score >= 0 and flag in (0, 1)


def test_a_valid_but_huge_reading_is_delivered_raw_and_never_stops_delivery(tmp_path, buildings):
    """A meter with no history reading ~1e305 twice overflowed expm1(expected) to inf; the scored
    message then failed to encode and the forwarder died, on every restart."""
    buf = Buffer(tmp_path / "buffer.db", live_window_ms=10**12,
                 scorer=ReadingScorer(ModelHolder(MODEL), buildings))
    huge = [Reading("15", "1433", "electricity", START_MS + i * MIN, v, "t") for i, v in enumerate((1e305, 1.7e308))]
    normal = [Reading("15", "1434", "electricity", START_MS + i * MIN, 40.0, "t") for i in range(2)]
    buf.put(huge + normal)
    pub = MemoryPublisher()
    Forwarder(buf, pub, "gw-1").drain()
    raw = [r for m in pub.messages if m.topic.endswith("/raw") for r in decode(m.payload)["readings"]]
    assert sorted((r[0], r[2]) for r in raw) == [("1433:electricity", 1e305), ("1433:electricity", 1.7e308)] + [
        ("1434:electricity", 40.0)] * 2
    scored = [r for _, r in scored_of(pub.messages)]
    assert all(np.isfinite(r[3]) for r in scored) and {r[0] for r in scored} >= {"1434:electricity"}
    assert buf.pending() == 0


def test_a_statistics_save_on_a_full_disk_says_the_disk_is_full(tmp_path):
    """The save's own ROLLBACK, after SQLite had rolled back, raised "cannot rollback - no
    transaction is active", which hid the full disk."""
    stats = MeterStats()
    stats.update(["1433:electricity"], np.array([1.0]), np.array([1.1]))
    db = sqlite3.connect(tmp_path / "stats.db", isolation_level=None)
    with pytest.raises(ModelError, match=r"^meter_stats: cannot save: database or disk is full$"):
        stats.save(DiskFullOn(db, "INSERT INTO meter_stats"))
    assert not db.in_transaction and stats.dirty == 1  # nothing saved: still to be written
    stats.save(db)
    assert db.execute("SELECT meter_key FROM meter_stats").fetchall() == [("1433:electricity",)]
