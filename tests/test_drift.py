"""Drift of the model alone: the figure per site and meter type and fleet-wide, its window, the
threshold that marks the model stale, the partition by model version, a put that rolls back, a
restart, the config keys, the Greengrass health message, and what it costs the scorer."""

from __future__ import annotations

import json
import logging
import math
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gateway.buffer import Buffer, MeterInfo
from gateway.config import validate
from gateway.errors import ConfigErrors, DiskFull
from gateway.model.drift import BINS, Drift
from gateway.model.features import FEATURE_NAMES, Buildings
from gateway.model.paths import default_buildings, default_model
from gateway.model.scorer import Scorer
from gateway.model.scoring import ModelHolder, ReadingScorer, stored_status
from gateway.readings import Reading
from gateway.runner import build_scorer
from gateway.sources.replay import ReplaySource
from gateway.sources.simulator import SimulatorSource
from gateway.sources.weather import WeatherReplay

from faults import FailingConnection
from test_greengrass import HEALTH, Running, component_config, copy_model, wait_until

MODEL = default_model()
BUILDINGS = default_buildings()
SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
H = 3_600_000
DAY = 24 * H
#: The sample holds about one reading per meter a day: a 30-day window holds about 30 a meter.
WINDOW_H = 30 * 24
#: Building 1331 (site 15): the model alone fits its electricity well (RMSLE ~0.14, no bias), so
#: a level shift either way shows. Building 875 (site 9) is left as it is.
SHIFTED, KEPT = "1331", "875"
MAY, SEP = 1_462_060_800_000, 1_472_688_000_000  # 2016-05-01, 2016-09-01 UTC


@pytest.fixture(scope="module")
def buildings() -> Buildings:
    assert BUILDINGS is not None and MODEL is not None, "the shipped model and metadata are part of the repo"
    return Buildings.from_csv(BUILDINGS)


@pytest.fixture(scope="module")
def sample() -> list[Reading]:
    """The 2016 readings of the two buildings, in time order."""
    src = ReplaySource("sample", SAMPLE / "readings.csv.gz")
    return [r for b in src.batches(None, threading.Event()) for r in b.readings if r.building in (SHIFTED, KEPT)]


@pytest.fixture(scope="module")
def weather():
    return WeatherReplay(SAMPLE / "weather_2016.json.gz").table(retain_ms=None)


@pytest.fixture(scope="module")
def holder() -> ModelHolder:
    return ModelHolder(MODEL, check_every_s=None)


class Feed:
    """A scorer fed the way the buffer feeds it: (ts, meter id, value) rows, batch by batch."""

    def __init__(self, holder: ModelHolder, buildings: Buildings, weather, **drift):
        self.scorer = ReadingScorer(holder, buildings, weather=weather,
                                    drift=Drift(**{"window_h": WINDOW_H, "min_readings": 10, **drift}))
        self.ids: dict[tuple, int] = {}
        self.meters: dict[int, MeterInfo] = {}
        self.expected: list[tuple[Reading, float, float | None]] = []  # (reading, value fed, online expectation)

    def put(self, readings: list[Reading], factor: float = 1.0) -> dict:
        rows = []
        for r in readings:
            key = (r.site, r.building, r.meter)
            mid = self.ids.setdefault(key, len(self.ids))
            self.meters[mid] = MeterInfo(*key)
            rows.append((r.ts, mid, r.value * factor if r.building == SHIFTED else r.value))
        for i in range(0, len(rows), 500):
            _, scores, _ = self.scorer.score(rows[i : i + 500], self.meters)
            self.expected += [(r, row[2], s and s[0]) for r, row, s in zip(readings[i : i + 500], rows[i : i + 500], scores)]
        return self.scorer.drift.report()


def phases(sample: list[Reading]) -> tuple[list[Reading], list[Reading], list[Reading]]:
    """January-April, May-August (the shift), September-December."""
    return ([r for r in sample if r.ts < MAY], [r for r in sample if MAY <= r.ts < SEP],
            [r for r in sample if r.ts >= SEP])


def rmsle(a, b) -> float:
    return float(np.sqrt(np.mean((np.log1p(np.asarray(a)) - np.log1p(np.asarray(b))) ** 2)))


# ---------------------------------------------------------------- the figure


def test_the_figure_is_the_rmsle_of_the_model_alone_over_its_window_per_site_and_meter_type():
    d = Drift(window_h=24, threshold=10, min_readings=1)
    a, b = d.group("15", "electricity"), d.group("9", "steam")
    rng = np.random.default_rng(3)
    ts = np.arange(48) * H + 1_700_000_000_000 // DAY * DAY  # 48 hours from midnight
    pred = rng.normal(3.0, 1.0, 48)
    actual = np.log1p(rng.gamma(5.0, 5.0, 48))
    pred[0] = -1.0  # a prediction below 0 counts as 0, as the model card's RMSLE does
    d.update("v1", np.full(48, a), ts, pred, actual)
    d.update("v1", np.array([b, b]), ts[:2], np.array([1.0, 1.0]), np.array([2.0, np.inf]))  # inf: not counted
    r = d.report()
    se = (actual - np.maximum(pred, 0.0)) ** 2
    assert r["groups"]["15/electricity"]["count"] == 24  # the last 24 hourly steps: hours 24..47
    assert r["groups"]["15/electricity"]["rmsle"] == round(math.sqrt(se[24:].mean()), 4)
    assert r["groups"]["15/electricity"]["until_ts"] == int(ts[-1] + H)
    assert r["groups"]["9/steam"] == {"rmsle": 1.0, "count": 1, "until_ts": int(ts[0] + H)}  # its own window
    assert r["fleet"] == {"rmsle": round(math.sqrt((se[24:].sum() + 1.0) / 25), 4), "count": 25}
    assert r["window_h"] == 24 and r["version"] == "v1" and r["previous"] is None and r["stale"] is False

    d.update("v1", np.array([a]), np.array([ts[10]]), np.array([0.0]), np.array([100.0]))  # older than its window
    assert d.report()["groups"]["15/electricity"]["count"] == 24
    d.update("v1", np.array([a]), np.array([ts[-1] + 12 * H]), np.array([0.0]), np.array([0.0]))  # half a day on
    assert d.report()["groups"]["15/electricity"]["count"] == 24 - 12 + 1


def test_the_threshold_marks_the_model_stale_and_names_what_passed_it():
    d = Drift(window_h=24, threshold=1.0, min_readings=5)
    hot, cold, few = d.group("1", "steam"), d.group("2", "electricity"), d.group("3", "hotwater")
    ts = 1_700_000_000_000 + np.arange(10) * H
    d.update("v1", np.full(10, cold), ts, np.full(10, 2.0), np.full(10, 2.5))  # RMSLE 0.5
    assert d.report()["stale"] is False and d.report()["stale_keys"] == []
    d.update("v1", np.full(10, hot), ts, np.full(10, 2.0), np.full(10, 4.0))  # RMSLE 2.0
    d.update("v1", np.full(4, few), ts[:4], np.full(4, 0.0), np.full(4, 9.0))  # above, but 4 < min_readings
    r = d.report()
    assert r["stale"] is True and r["stale_keys"] == ["1/steam", "fleet"]
    assert r["groups"]["3/hotwater"]["rmsle"] == 9.0 and r["threshold"] == 1.0 and r["min_readings"] == 5
    d.threshold = 2.5  # a live config change
    assert d.report()["stale_keys"] == ["fleet"]  # fleet: sqrt((10×0.25 + 10×4 + 4×81)/24) ≈ 3.9


# ---------------------------------------------------------------- a building whose level shifts


@pytest.mark.parametrize("factor", [2.0, 0.5])
def test_drift_rises_on_a_building_whose_level_shifts_and_falls_when_it_ends(factor, sample, holder, buildings,
                                                                            weather):
    before, during, after = phases(sample)
    control, shifted = Feed(holder, buildings, weather), Feed(holder, buildings, weather)
    assert shifted.put(before) == control.put(before)
    base = control.put(during)
    moved = shifted.put(during, factor)
    print(f"x{factor}: 15/electricity {base['groups']['15/electricity']} -> {moved['groups']['15/electricity']}")
    # the shifted building's site and meter type rises by about |log(factor)| ...
    assert base["groups"]["15/electricity"]["rmsle"] < 0.3
    assert moved["groups"]["15/electricity"]["rmsle"] > base["groups"]["15/electricity"]["rmsle"] + 0.35
    assert moved["groups"]["15/electricity"]["count"] == base["groups"]["15/electricity"]["count"] >= 20
    # ... the other building's sites and meter types do not move, and the fleet figure rises
    for key, fig in base["groups"].items():
        if key.startswith("9/"):
            assert moved["groups"][key] == fig
    assert moved["fleet"]["rmsle"] > base["fleet"]["rmsle"]
    # the figure is the model alone's: the online expectation has learned the new level meanwhile
    late = [(v, e) for r, v, e in shifted.expected if r.building == SHIFTED and r.meter == "electricity"
            and r.ts >= SEP - 30 * DAY]
    assert rmsle(*zip(*late)) < 0.25 < moved["groups"]["15/electricity"]["rmsle"]

    # the shift ends: once its readings leave the window, the figure is the control's again
    assert shifted.put(after) == control.put(after)


def fitted_loader(path, intra_op_threads: int = 1) -> Scorer:
    """The shipped model, or (folder named ``fitted``) one that fits site 15's new level: ×2."""
    scorer = Scorer(path, intra_op_threads=intra_op_threads)
    if Path(path).name == "fitted":
        site, plain = FEATURE_NAMES.index("site_id"), scorer.predict_log
        scorer.version = "fitted-x2"
        scorer.predict_log = lambda X: np.where(np.asarray(X)[:, site] == 15, np.log1p(2 * np.expm1(plain(X))), plain(X))
    return scorer


def test_after_a_swap_the_figure_is_the_new_models_and_the_old_ones_last_figure_is_kept(tmp_path, sample,
                                                                                         buildings, weather):
    before, during, _ = phases(sample)
    fitted = shutil.copytree(MODEL, tmp_path / "fitted")
    swapping = ModelHolder(MODEL, check_every_s=None, loader=fitted_loader)
    old_version = swapping.version
    feed = Feed(swapping, buildings, weather)
    feed.put(before)
    stale = feed.put(during[: len(during) // 2], 2.0)
    assert swapping.swap(fitted) and swapping.version == "fitted-x2"
    fresh = feed.put(during[len(during) // 2 :], 2.0)
    print(f"15/electricity {old_version}: {stale['groups']['15/electricity']}, fitted-x2: {fresh['groups']['15/electricity']}")
    assert fresh["version"] == "fitted-x2"
    prev = fresh["previous"]
    assert prev["version"] == old_version and "previous" not in prev
    assert prev["groups"] == stale["groups"] and prev["fleet"] == stale["fleet"]
    assert fresh["groups"]["15/electricity"]["rmsle"] < prev["groups"]["15/electricity"]["rmsle"] - 0.35
    # only what the new model scored counts: the same as a gateway that ran it from the swap on
    alone = Feed(ModelHolder(fitted, check_every_s=None, loader=fitted_loader), buildings, weather)
    since = alone.put(during[len(during) // 2 :], 2.0)
    assert (fresh["groups"], fresh["fleet"]) == (since["groups"], since["fleet"])
    assert feed.scorer.status()["drift"] == fresh


# ---------------------------------------------------------------- through the buffer


def test_drift_counts_each_reading_once_forgets_a_rolled_back_put_and_survives_a_restart(tmp_path, sample,
                                                                                          buildings, weather,
                                                                                          monkeypatch, caplog):
    readings = [r for r in sample if r.ts < MAY]
    db = tmp_path / "buffer.db"

    def scorer(model: Path = MODEL) -> ReadingScorer:
        return ReadingScorer(ModelHolder(model, check_every_s=None), buildings, weather=weather, db_path=db,
                             drift=Drift(window_h=WINDOW_H, min_readings=10))

    buf = Buffer(db, live_window_ms=10**13)
    buf.scorer = scorer()
    buf.put(readings[:300])
    first = buf.scorer.drift.report()
    buf.put(readings[:300])  # offered again: judged, stored once, not counted twice
    assert buf.scorer.drift.report() == first and first["fleet"]["count"] > 0

    real = buf.db
    failing = FailingConnection(real, {"failed": 0, "failed_after_delete": 0})
    failing.armed = True  # this put is scored, then its insert fails: the disk is full
    monkeypatch.setattr(buf, "db", failing)
    with pytest.raises(DiskFull):
        buf.put(readings[300:400])
    monkeypatch.setattr(buf, "db", real)
    assert buf.scorer.drift.report() == first  # forgotten with the put

    buf.put(readings[300:])
    kept = buf.scorer.drift.report()
    buf.scorer.save_every_s = 0.0
    buf.put(readings[-1:])  # a put that saves
    assert stored_status(buf.db)["drift"] == kept  # what `gateway status --json` shows under scoring
    buf.scorer.close()
    buf.close()
    from click.testing import CliRunner

    from gateway.cli import main

    shown = CliRunner().invoke(main, ["status", "--db", str(db)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert (f"RMSLE of the model alone {kept['fleet']['rmsle']} over {kept['window_h']:g} h "
            f"({kept['fleet']['count']:,} readings)") in " ".join(shown.output.split()), shown.output

    buf = Buffer(db, live_window_ms=10**13)
    buf.scorer = scorer()
    assert buf.scorer.drift.report() == kept
    buf.scorer.close()
    buf.close()

    other = copy_model(tmp_path / "v2", version="test-v2")  # a restart with another model: a fresh figure
    s = scorer(other)
    r = s.drift.report()
    assert r["version"] == "test-v2" and r["fleet"] == {"rmsle": None, "count": 0} and r["groups"] == {}
    assert r["previous"]["version"] == kept["version"] and r["previous"]["groups"] == kept["groups"]
    s.close()

    with sqlite3.connect(db) as conn:  # a saved figure that cannot be read is not worth a stop
        conn.execute("UPDATE scoring_status SET value = '{\"format\": 99}' WHERE key = 'drift'")
    with caplog.at_level(logging.WARNING, logger="gateway.model.scoring"):
        s = scorer()
    assert s.drift.report()["groups"] == {} and s.drift.window_h == WINDOW_H
    assert "drift: the saved figure in" in caplog.text and "format 99 is not 1" in caplog.text
    s.close()


# ---------------------------------------------------------------- config


def test_the_drift_keys_are_validated_and_reach_the_scorer(tmp_path):
    base = {"thing": "gw-1", "sources": [{"type": "simulator", "name": "sim"}], "publisher": {"type": "memory"},
            "buffer": {"path": str(tmp_path / "buffer.db")}}
    cfg = validate({**base, "model": {"path": str(MODEL)}}, tmp_path)
    assert (cfg.model["drift_window_h"], cfg.model["drift_threshold"], cfg.model["drift_min_readings"]) == (24, 2.5, 24)
    with pytest.raises(ConfigErrors) as err:
        validate({**base, "model": {"path": str(MODEL), "drift_window_h": 9000, "drift_threshold": 0,
                                    "drift_min_readings": 0}}, tmp_path)
    text = str(err.value)
    assert "model.drift_window_h: 9000 must be <= 8760" in text
    assert "model.drift_threshold: 0 must be > 0" in text
    assert "model.drift_min_readings: 0 must be >= 1" in text
    cfg = validate({**base, "model": {"path": str(MODEL), "drift_window_h": 168, "drift_threshold": 1.5,
                                      "drift_min_readings": 12}}, tmp_path)
    scorer = build_scorer(cfg, tmp_path / "buffer.db")
    try:
        d = scorer.drift
        assert (d.window_h, d.threshold, d.min_readings, d.step_ms) == (168.0, 1.5, 12, 168 * H // BINS)
        assert scorer.stats.threshold == cfg.model["threshold"]
    finally:
        scorer.close()


# ---------------------------------------------------------------- health


def test_the_health_message_carries_drift_per_site_and_meter_type(tmp_path):
    model = copy_model(tmp_path / "model")
    r = Running(tmp_path, component_config(model={"path": str(model), "drift_threshold": 0.01,
                                                  "drift_min_readings": 1},
                                           greengrass={"health_every_s": 0.05})).start()
    try:
        gw = r.agent.gateway
        assert wait_until(lambda: gw.scorer.scored == 5 * 20)
        health = r.agent.health()
        drift = health["drift"]
        assert drift["version"] == health["model"]["version"] == gw.scorer.holder.version
        assert drift["window_h"] == 24 and drift["threshold"] == 0.01 and drift["previous"] is None
        meters = {(m.site, m.meter) for m in gw.buffer.meters.values()}
        assert set(drift["groups"]) == {f"{s}/{t}" for s, t in meters}
        assert drift["fleet"]["count"] == sum(g["count"] for g in drift["groups"].values()) == 100
        assert drift["stale"] is True and "fleet" in drift["stale_keys"]

        def published() -> dict | None:
            msgs = [m for p in r.publishers.made for m in list(p.messages) if m.topic == HEALTH]
            last = msgs and json.loads(msgs[-1].payload)
            return last if last and last["drift"]["fleet"]["count"] == 100 else None

        assert wait_until(lambda: published() is not None)
        assert published()["drift"]["groups"] == drift["groups"]
    finally:
        assert r.stop() == 0


# ---------------------------------------------------------------- cost


def test_scoring_rate_with_and_without_drift(buildings):
    """Prints readings/s of the scorer with the drift figure and with its update made a no-op."""
    src = SimulatorSource("sim", meters=1000, seed=7, start_ms=1_767_225_600_000, speed=None, count=24, interval_s=3600)
    readings = [r for b in src.batches(None, threading.Event()) for r in b.readings]
    holder = ModelHolder(MODEL, check_every_s=None)

    def run(with_drift: bool) -> tuple[float, ReadingScorer]:
        s = ReadingScorer(holder, buildings)
        if not with_drift:
            s.drift.update = lambda *a, **k: None
            s.drift.snapshot = lambda: None
            s.drift.restore = lambda snap: None
        ids: dict[tuple, int] = {}
        meters: dict[int, MeterInfo] = {}
        rows = []
        for r in readings:
            mid = ids.setdefault((r.site, r.building, r.meter), len(ids))
            meters[mid] = MeterInfo(r.site, r.building, r.meter)
            rows.append((r.ts, mid, r.value))
        own = [0.0]
        if with_drift:  # the drift figure's own share, timed inside the run
            update, snapshot = s.drift.update, s.drift.snapshot

            def timed(f):
                def call(*a):
                    t = time.perf_counter()
                    try:
                        return f(*a)
                    finally:
                        own[0] += time.perf_counter() - t
                return call

            s.drift.update, s.drift.snapshot = timed(update), timed(snapshot)
        t0 = time.perf_counter()
        for i in range(0, len(rows), batch):
            s.score(rows[i : i + batch], meters)
        took = time.perf_counter() - t0
        return len(rows) / took, own[0] / took, s

    for batch in (100, 1000):
        rates: dict[bool, list[float]] = {True: [], False: []}
        shares = []
        for _ in range(3):  # interleaved, best of 3
            for flag in (False, True):
                rate, share, s = run(flag)
                rates[flag].append(rate)
                shares.append(share) if flag else None
        on, off = max(rates[True]), max(rates[False])
        print(f"scorer, batches of {batch}: {off:,.0f} readings/s without drift, {on:,.0f} with; "
              f"drift's own share of the time {min(shares) * 100:.1f} %")
        assert s.drift.report()["fleet"]["count"] == len(readings) == 24_000  # 24 h in a 24 h window
