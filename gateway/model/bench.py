"""Scoring throughput against its raw limit, measured in the same run.

``score``: featurize + :meth:`Scorer.predict_log` + :meth:`MeterStats.update` on batches of
synthetic readings (real buildings, hourly timestamps, plausible weather), one thread.
``score_raw``: onnxruntime alone on the same, prebuilt feature matrix with the same batches.
The ratio says how much the gateway's own work costs on top of the model.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from gateway.model.features import FEATURE_NAMES, WEATHER_FIELDS, Buildings, featurize
from gateway.model.online import MeterStats
from gateway.model.score_file import meter_keys
from gateway.model.scorer import Scorer


def synthetic_batch(buildings: Buildings, n: int, seed: int = 0) -> dict:
    """``n`` readings of real buildings over consecutive hours, with weather and values."""
    rng = np.random.default_rng(seed)
    ids = np.flatnonzero(buildings.known)
    fleet = rng.choice(ids, size=min(len(ids), 1000), replace=False)
    b = fleet[np.arange(n) % len(fleet)]
    meter = rng.integers(0, 4, size=len(fleet))[np.arange(n) % len(fleet)]
    ts = 1_514_764_800_000 + (np.arange(n) // len(fleet)) * 3_600_000  # 2018-01-01 onward, hourly
    weather = {name: rng.normal(10.0, 5.0, n) for name in WEATHER_FIELDS}
    weather["cloud_coverage"][rng.random(n) < 0.3] = np.nan
    value = rng.lognormal(4.0, 1.5, n)
    fleet_keys = meter_keys(b[: len(fleet)], meter[: len(fleet)]).tolist()
    keys = [fleet_keys[i % len(fleet)] for i in range(n)]  # n references to len(fleet) strings
    return {"building_id": b, "meter": meter, "ts_ms": ts, "weather": weather, "value": value, "keys": keys}


def bench_score(model_dir: str | Path, buildings_csv: str | Path, n: int = 200_000, batch: int = 10_000) -> dict:
    """``{"score_rows_per_s", "score_raw_rows_per_s", "score_ratio", "rows", "batch"}``."""
    buildings = Buildings.from_csv(buildings_csv)
    scorer = Scorer(model_dir, intra_op_threads=1)
    data = synthetic_batch(buildings, n)
    keys = data["keys"]
    log_value = np.log1p(data["value"])
    X_all = np.empty((n, len(FEATURE_NAMES)), dtype=np.float32)
    for lo in range(0, n, batch):  # batch by batch: featurizing 200k rows at once doubles peak memory
        hi = lo + batch
        X_all[lo:hi] = featurize(
            buildings, data["building_id"][lo:hi], data["meter"][lo:hi], data["ts_ms"][lo:hi],
            {k: v[lo:hi] for k, v in data["weather"].items()},
        )  # fmt: skip
    session, inp = scorer._session, scorer._input

    # warm up both paths (first-run allocations, holiday tables)
    session.run(None, {inp: X_all[:batch]})
    stats = MeterStats()
    t0 = time.perf_counter()
    for lo in range(0, n, batch):
        hi = lo + batch
        X = featurize(
            buildings, data["building_id"][lo:hi], data["meter"][lo:hi], data["ts_ms"][lo:hi],
            {k: v[lo:hi] for k, v in data["weather"].items()},
        )  # fmt: skip
        stats.update(keys[lo:hi], scorer.predict_log(X), log_value[lo:hi])
    score_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    for lo in range(0, n, batch):
        session.run(None, {inp: X_all[lo : lo + batch]})
    raw_s = time.perf_counter() - t0

    score, raw = n / score_s, n / raw_s
    return {
        "score_rows_per_s": round(score),
        "score_raw_rows_per_s": round(raw),
        "score_ratio": round(score / raw, 3),
        "rows": n,
        "batch": batch,
    }
