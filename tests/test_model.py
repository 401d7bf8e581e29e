"""Training, ONNX export, the verified scorer, online per-meter learning, score_file and bench."""

from __future__ import annotations

import gzip
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from gateway.errors import ModelError
from gateway.model.features import FEATURE_NAMES
from gateway.model.online import MeterStats
from gateway.model.scorer import Scorer

ROOT = Path(__file__).resolve().parent.parent
METADATA = ROOT / "data" / "building_metadata.csv"
SAMPLE = ROOT / "data" / "sample" / "readings.csv.gz"
SHIPPED = ROOT / "models" / "ashrae-lgbm"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A small model trained on the committed extract, with its 2-fold evaluation."""
    from gateway.model.train import train

    out = tmp_path_factory.mktemp("models") / "tiny"
    train(SAMPLE, out, METADATA, rounds=20, folds=2, threads=1)
    return out


def test_train_writes_a_checked_model_folder(tiny_model):
    assert sorted(p.name for p in tiny_model.iterdir()) == ["golden.json", "manifest.json", "model.onnx"]
    manifest = json.loads((tiny_model / "manifest.json").read_text())
    assert manifest["feature_names"] == list(FEATURE_NAMES)
    assert manifest["parity_max_abs_diff"] <= 1e-4
    assert manifest["training_data"]["rows"] == 11_133
    metrics = manifest["metrics"]
    assert set(metrics["rmsle_model"]) >= {"overall", "electricity"}
    assert 0.5 < metrics["anomaly"]["auc"] <= 1.0
    assert metrics["rmsle_online"]["overall"] < metrics["rmsle_model"]["overall"]


def test_onnx_matches_lightgbm_and_a_different_model_is_refused():
    from gateway.model.train import _fit, check_parity, load_training_data, to_onnx

    _, _, X, ly = load_training_data(SAMPLE, METADATA)
    X, ly = X[:3000], ly[:3000]
    booster = _fit(X, ly, 10.0, {"objective": "regression", "num_leaves": 7, "verbose": -1}, 15, 1)
    body = to_onnx(booster, X.shape[1], 10.0).SerializeToString()
    assert check_parity(body, booster, X, 10.0) <= 1e-4
    other = _fit(X, ly, 10.0, {"objective": "regression", "num_leaves": 7, "verbose": -1}, 30, 1)
    with pytest.raises(ModelError, match=r"^ONNX parity check failed: max abs diff .* > 0.0001 in log space$"):
        check_parity(body, other, X, 10.0)


def test_a_zero_state_model_is_one_graph_the_scorer_runs(tmp_path):
    """--zero-state: level regression and zero classifier in one ONNX graph with the plain model's
    input and output; the output is (1 - p_zero) * level, as LightGBM computes it."""
    from gateway.model.train import load_training_data, train

    out = tmp_path / "zs"
    manifest = train(SAMPLE, out, METADATA, rounds=20, folds=2, threads=1, zero_state=True)
    assert manifest["zero_state"] is True and manifest["parity_max_abs_diff"] <= 1e-4
    assert manifest["training_data"]["rows_fitted"] == 11_133  # the classifier sees every reading
    metrics = manifest["metrics"]
    assert metrics["rmsle_online"]["overall"] < metrics["rmsle_model"]["overall"]
    assert 0.0 <= metrics["anomaly"]["f1"] <= 1.0 and 0.5 < metrics["anomaly"]["auc"] <= 1.0
    scorer = Scorer(out, intra_op_threads=1)
    assert scorer.version == manifest["version"]
    _, _, X, ly = load_training_data(SAMPLE, METADATA)
    pred = scorer.predict_log(X[:2000].astype(np.float32))
    assert np.isfinite(pred).all() and (pred >= 0).all()
    zeros = ly[:2000] == 0
    assert pred[zeros].mean() < pred[~zeros].mean()  # the classifier pulls readings like the zeros down


def test_scorer_loads_and_predicts(tiny_model):
    scorer = Scorer(tiny_model, intra_op_threads=1)
    manifest = json.loads((tiny_model / "manifest.json").read_text())
    assert scorer.version == manifest["version"]
    golden = json.loads((tiny_model / "golden.json").read_text())
    X = np.array([[np.nan if v is None else v for v in row] for row in golden["rows"]], dtype=np.float32)
    np.testing.assert_allclose(scorer.predict_log(X), golden["expected"], atol=1e-5)
    assert scorer.predict_log(np.empty((0, len(FEATURE_NAMES)), np.float32)).shape == (0,)


def test_scorer_refuses_features_in_another_order(tiny_model, tmp_path):
    import onnx

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    model = onnx.load(str(bad / "model.onnx"))
    names = list(FEATURE_NAMES)
    names[1], names[2] = names[2], names[1]
    for prop in model.metadata_props:
        if prop.key == "feature_names":
            prop.value = json.dumps(names)
    onnx.save(model, str(bad / "model.onnx"))
    with pytest.raises(ModelError, match=r"feature_names differ from features.FEATURE_NAMES at column 1: model has 'primary_use', gateway has 'site_id'$"):
        Scorer(bad)


def test_scorer_refuses_golden_vectors_that_do_not_match(tiny_model, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    golden = json.loads((bad / "golden.json").read_text())
    golden["expected"][3] += 0.01
    (bad / "golden.json").write_text(json.dumps(golden))
    with pytest.raises(ModelError, match=r"golden.json: golden vectors do not match: max abs diff 0.01 > 0.0001$"):
        Scorer(bad)


def test_scorer_refuses_a_missing_model(tmp_path):
    with pytest.raises(ModelError, match=r"model.onnx: cannot load"):
        Scorer(tmp_path)


def test_the_shipped_model_passes_its_own_checks():
    scorer = Scorer(SHIPPED)
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    assert scorer.version == manifest["version"]
    assert (SHIPPED / "model.onnx").stat().st_size < 5_000_000
    assert manifest["metrics"]["rmsle_model"]["overall"] < manifest["metrics"]["rmsle_naive"]["overall"]


# -- online learning -------------------------------------------------------------------------


def _steady(n: int, seed: int = 0, level: float = 5.0) -> np.ndarray:
    return level + np.random.default_rng(seed).normal(0.0, 0.05, n)


def test_meter_learns_its_offset_from_earlier_readings_only():
    stats = MeterStats()
    actual = _steady(40, level=6.0)
    pred = np.full(40, 4.0)  # the model is 2.0 too low for this meter
    expected, _ = stats.update(["1:electricity"] * 40, pred, actual)
    assert expected[0] == 4.0  # no history: the model's prediction
    assert abs(expected[-1] - 6.0) < 0.1


def test_a_batch_equals_the_same_readings_one_by_one():
    keys = ["a", "b", "a", "a", "c", "b"]
    pred = np.array([1.0, 2.0, 1.0, 1.0, 3.0, 2.0])
    actual = np.array([1.5, 2.2, 1.7, 9.0, 3.1, 2.1])
    together = MeterStats().update(keys, pred, actual)
    one = MeterStats()
    alone = [one.update([k], pred[i : i + 1], actual[i : i + 1]) for i, k in enumerate(keys)]
    np.testing.assert_allclose(together[0], [e[0] for e, _ in alone])
    np.testing.assert_allclose(together[1], [s[0] for _, s in alone])


@pytest.mark.parametrize("factor", [3.0, 10.0, 0.0])
def test_an_injected_spike_or_dropout_is_flagged_and_clean_readings_are_not(factor):
    n = 200
    actual = np.expm1(_steady(n, seed=1))
    pred = np.full(n, 4.6)
    injected = actual.copy()
    injected[150] *= factor
    stats = MeterStats()
    _, score = stats.update(["7:steam"] * n, pred, np.log1p(injected))
    flags = stats.flag(score)
    assert flags[150]
    clean = np.r_[flags[30:150], flags[151:]]
    assert clean.mean() < 0.02


def test_meter_stats_survive_save_and_load(tmp_path):
    rng = np.random.default_rng(5)
    keys = [f"{b}:electricity" for b in rng.integers(0, 30, 500)]
    pred = rng.normal(4, 1, 500)
    actual = pred + rng.normal(0.5, 0.3, 500)
    stats = MeterStats()
    stats.update(keys, pred, actual)
    with sqlite3.connect(tmp_path / "state.db") as conn:
        stats.save(conn)
        stats.save(conn)  # saving twice replaces, it does not duplicate
        assert conn.execute("SELECT COUNT(*) FROM meter_stats").fetchone()[0] == len(stats)
    restored = MeterStats()
    with sqlite3.connect(tmp_path / "state.db") as conn:
        assert restored.load(conn) == len(stats)
    nxt = (keys[:50], pred[:50], actual[:50] + 3.0)
    a, b = stats.update(*nxt), restored.update(*nxt)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_loading_from_an_empty_database_gives_empty_stats():
    conn = sqlite3.connect(":memory:")
    stats = MeterStats()
    assert stats.load(conn) == 0
    assert len(stats) == 0


# -- score_file and bench --------------------------------------------------------------------


def test_score_file_writes_scored_rows_in_time_order_and_counts_rejections(tmp_path):
    from gateway.model.score_file import OUTPUT_COLUMNS, score_file

    out = tmp_path / "scored.csv.gz"
    result = score_file(SAMPLE, out, SHIPPED, METADATA, progress=False)
    assert result["rows"] == 11_134
    assert result["scored"] == 11_133
    assert result["rejected_reasons"] == {"columns": 1}
    assert result["rejected_rows"] == [(10_578, "columns: 17 instead of 19")]
    with gzip.open(out, "rt") as f:
        header = f.readline().rstrip("\n").split(",")
        rows = [line.rstrip("\n").split(",") for line in f]
    with gzip.open(SAMPLE, "rt") as f:
        assert header == f.readline().rstrip("\n").split(",") + list(OUTPUT_COLUMNS)
    assert len(rows) == 11_133
    col = {name: i for i, name in enumerate(header)}
    anomaly = [int(r[col["anomaly"]]) for r in rows]
    assert sum(anomaly) == result["anomalies"]
    assert all(float(r[col["expected"]]) >= 0 and float(r[col["anomaly_score"]]) >= 0 for r in rows)
    # within a site (one UTC offset), local timestamps are non-decreasing when rows are in UTC order
    site14 = [r[col["timestamp"]] for r in rows if r[col["site_id"]] == "14"]
    assert site14 == sorted(site14)


def test_score_file_rejects_unknown_buildings(tmp_path):
    from gateway.model.score_file import score_file

    with gzip.open(SAMPLE, "rt") as f:
        lines = [f.readline() for _ in range(6)]
    lines[2] = "99999" + lines[2][lines[2].index(",") :]
    src = tmp_path / "in.csv"
    src.write_text("".join(lines))
    result = score_file(src, tmp_path / "out.csv", SHIPPED, METADATA, progress=False)
    assert result["scored"] == 4
    assert result["rejected_rows"] == [(3, "unknown building: 99999 is not in building_metadata.csv")]


def test_bench_reports_both_rates():
    from gateway.model.bench import bench_score

    result = bench_score(SHIPPED, METADATA, n=20_000, batch=5_000)
    assert result["score_rows_per_s"] > 0 and result["score_raw_rows_per_s"] > 0
    assert result["score_ratio"] == pytest.approx(result["score_rows_per_s"] / result["score_raw_rows_per_s"], rel=0.01)


def test_default_paths_find_the_shipped_model_and_honour_overrides(monkeypatch, tmp_path):
    from gateway.model.paths import default_buildings, default_model

    assert default_model() == SHIPPED
    assert default_buildings() == METADATA
    monkeypatch.setenv("GATEWAY_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("GATEWAY_BUILDINGS_CSV", str(tmp_path / "none.csv"))
    assert default_model() is None
    assert default_buildings() is None


def test_readings_not_to_learn_are_judged_but_leave_the_history_alone():
    pred, actual = np.full(10, 4.0), _steady(10, level=5.0)
    learned, judged = MeterStats(), MeterStats()
    learned.update(["m"] * 10, pred, actual)
    judged.update(["m"] * 10, pred, actual)
    replay = judged.update(["m"] * 3, pred[:3], actual[:3] + 2.0, learn=np.zeros(3, bool))
    np.testing.assert_array_equal(replay[0], np.full(3, replay[0][0]))  # each judged on the same history
    assert (judged.flag(replay[1])).all()
    nxt = (["m"], pred[:1], actual[:1])
    assert learned.update(*nxt)[1][0] == judged.update(*nxt)[1][0]


def test_save_on_an_autocommit_connection_is_one_transaction(tmp_path):
    stats = MeterStats()
    stats.update(["a", "b"], np.array([1.0, 2.0]), np.array([1.5, 2.5]))
    conn = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    stats.save(conn)
    assert not conn.in_transaction
    assert sorted(r[0] for r in conn.execute("SELECT meter_key FROM meter_stats")) == ["a", "b"]


def test_a_table_saved_before_the_zero_flags_still_loads(tmp_path):
    rng = np.random.default_rng(3)
    pred = np.full(30, 4.0)
    actual = _steady(30, level=5.0)
    resid = (actual - pred)[-24:]
    conn = sqlite3.connect(tmp_path / "old.db")
    conn.execute(
        "CREATE TABLE meter_stats (meter_key TEXT PRIMARY KEY, n_seen INTEGER NOT NULL, "
        "window INTEGER NOT NULL, residuals BLOB NOT NULL, errors BLOB NOT NULL)"
    )
    conn.execute(
        "INSERT INTO meter_stats VALUES (?, ?, ?, ?, ?)",
        ("m", 30, 24, resid.astype("<f8").tobytes(), np.abs(rng.normal(0, 0.05, 24)).astype("<f8").tobytes()),
    )
    conn.commit()
    stats = MeterStats()
    assert stats.load(conn) == 1
    expected, score = stats.update(["m"], pred[:1], actual[-1:])
    assert abs(expected[0] - 5.0) < 0.1 and not stats.flag(score)[0]
    assert stats.flag(stats.update(["m"], pred[:1], np.zeros(1))[1])[0]  # a dropout is still seen
    stats.save(conn)  # adds the zeros column and fills it
    again = MeterStats()
    assert again.load(conn) == 1
    nxt = (["m"], pred[:1], actual[:1])
    assert again.update(*nxt)[1][0] == stats.update(*nxt)[1][0]


def test_a_zero_is_less_anomalous_on_a_meter_that_often_reads_zero():
    n = 48
    pred = np.full(n, 3.0)
    steady = _steady(n, seed=2, level=3.0)
    on_off = steady * (np.arange(n) % 3 != 0)  # every third reading is 0
    stats = MeterStats()
    _, s_steady = stats.update(["steady"] * n + ["on_off"] * n, np.r_[pred, pred], np.r_[steady, on_off])
    _, s = stats.update(["steady", "on_off"], pred[:2], np.zeros(2))
    assert s[0] > s[1]
    assert stats.flag(s[:1])[0]


def test_known_bad_zeros_are_long_zero_stretches_and_the_site0_gap():
    from types import SimpleNamespace

    from gateway.model.train import known_bad_zeros

    hour = 3_600_000
    t0 = 1_451_606_400_000 + 10 * 86_400_000  # 2016-01-11 UTC
    # meter 1:0 (site 1): 4 zeros over 24 h, then 4 zeros over 96 h; meter 2:0 (site 0): one zero in January
    ts = np.r_[t0 + np.arange(4) * 8 * hour, t0 + 10 * 86_400_000 + np.arange(4) * 32 * hour, t0]
    table = SimpleNamespace(
        building_id=np.r_[np.ones(8, np.int64), 2], meter=np.zeros(9, np.int64), site_id=np.r_[np.ones(8, np.int64), 0],
        ts_ms=ts, meter_reading=np.zeros(9),
    )  # fmt: skip
    table.meter_reading[4:8] = [0, 0, 0, 0]
    table.meter_reading[:4] = [0, 0, 0, 0]
    # a non-zero reading between the two runs splits them
    table.building_id = np.r_[table.building_id, 1]
    table.meter = np.r_[table.meter, 0]
    table.site_id = np.r_[table.site_id, 1]
    table.ts_ms = np.r_[table.ts_ms, t0 + 5 * 86_400_000]
    table.meter_reading = np.r_[table.meter_reading, 12.0]
    mask = known_bad_zeros(table)
    assert mask.tolist() == [False] * 4 + [True] * 4 + [True, False]
