"""Train the expected-consumption model, evaluate it on unseen buildings, export it to ONNX.

The model predicts ``log1p(reading) − log(square feet)`` with LightGBM from
:func:`gateway.model.features.featurize`; the exported ONNX graph adds ``log(square feet)`` back,
so its one output is log1p(expected reading) and no caller can forget the transform. By default
the model is a zero-state model (:mod:`gateway.model.zero_state`): that regression fitted on the
non-zero readings, times the chance of a reading above 0 from a classifier, in the same one graph;
``--no-zero-state`` trains the regression alone, without the known-bad zero stretches.

Output folder: ``model.onnx``, ``golden.json`` (feature rows + expected outputs, for the hot-swap
check) and ``manifest.json`` (version, data range and counts, metrics, lineage); ``gateway model
train`` adds ``CARD.md``, the model card made from the manifest by :mod:`gateway.model.card`.
Needs the ``train`` extra.

Training reads an ASHRAE CSV (``--data``) or what the fleet sent, from the analytics store
(``--from s3://bucket/prefix``, an emulation root, or an IoT Analytics dataset CSV; see
:mod:`gateway.model.source`). The manifest's ``lineage`` names the parent model version (the one
in service when this one was trained), the code version (``git describe``, or the installed
package's version) and what trained it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np

from gateway import ashrae
from gateway.errors import ModelError
from gateway.model.evaluate import anomaly_auc, naive_baseline, plain_window_baseline, rmsle, run_online
from gateway.model.features import FEATURE_INDEX, FEATURE_NAMES, Buildings, featurize
from gateway.sites import UTC_OFFSET_HOURS, local_to_utc_ms

log = logging.getLogger(__name__)

TARGET_TRANSFORM = "log1p(meter_reading); model output already includes + log(square_feet)"
INPUT_NAME = "features"
OUTPUT_NAME = "log1p_expected"
PARITY_TOLERANCE = 1e-4
DEFAULT_PARAMS: dict = {
    "objective": "regression",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 2000,
    "lambda_l2": 10.0,
    "feature_fraction": 0.7,
    "bagging_fraction": 0.7,
    "bagging_freq": 1,
    "cat_smooth": 50.0,
    "min_data_per_group": 500,
    "verbose": -1,
    "seed": 7,
}
DEFAULT_ROUNDS = 200
#: A meter reading exactly 0 for at least this long (first to last zero of a run) is a stretch the
#: meter was off or broken, not consumption: such readings are left out of TRAINING (evaluation keeps
#: them, and also reports RMSLE without them). 72 h, whatever the cadence of the readings.
ZERO_STRETCH_HOURS = 72.0
#: ASHRAE's known site-0 electricity gap: zeros until 2016-05-20 (local), also left out of training.
SITE0_GAP_END_LOCAL = "2016-05-21 00:00:00"
#: Integer codes LightGBM splits as categories (onnxmltools converts these splits; parity is checked).
CATEGORICAL: tuple[str, ...] = ("site_id", "primary_use")


def load_training_data(data_path: str | Path, buildings_csv: str | Path | None = None):
    """Read the ASHRAE CSV with the shared reader; returns (table, buildings, X, log1p(y))."""
    table = ashrae.read(data_path)
    if table.rejected:
        log.info("%s: %d rows rejected %s", data_path, len(table.rejected), table.rejected_counts())
    if len(table) == 0:
        raise ModelError(f"{data_path}: no usable rows")
    buildings = Buildings.from_csv(buildings_csv) if buildings_csv else Buildings.from_records(table.metadata)
    known = buildings.is_known(table.building_id)
    if not known.all():
        log.info("%d rows of buildings without metadata dropped", int((~known).sum()))
        table = table.take(np.flatnonzero(known))
    X = featurize(buildings, table.building_id, table.meter, table.ts_ms, table.weather)
    return table, buildings, X, np.log1p(table.meter_reading)


def load_from(source, buildings_csv: str | Path | None = None, weather: str | Path | None = None):
    """Read what the fleet sent from the analytics store (:func:`gateway.model.source.read`);
    returns (table, buildings, X, log1p(y), training_data dict for the manifest)."""
    from gateway.model import source as src
    from gateway.model.paths import default_buildings

    got = src.read(source, weather)
    table = got.table
    if len(table) == 0:
        raise ModelError(f"{got.source}: no usable readings")
    buildings_csv = buildings_csv or default_buildings()
    if buildings_csv is None:
        raise ModelError("no building metadata: give --buildings (messages carry no building metadata)")
    buildings = Buildings.from_csv(buildings_csv)
    known = buildings.is_known(table.building_id)
    if not known.all():
        log.info("%d readings of buildings without metadata dropped", int((~known).sum()))
        table = table.take(np.flatnonzero(known))
        got.table = table
        got.dropped["building without metadata"] = int((~known).sum())
    X = featurize(buildings, table.building_id, table.meter, table.ts_ms, table.weather)
    data = got.lineage()
    data["weather"] = Path(weather).name if weather else None
    data["buildings_csv"] = Path(buildings_csv).name
    return table, buildings, X, np.log1p(table.meter_reading), data


def code_version() -> str:
    """``git describe --tags --always --dirty`` of the checkout this runs from, else the package version."""
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    if (repo / ".git").exists():
        try:
            done = subprocess.run(["git", "-C", str(repo), "describe", "--tags", "--always", "--dirty"],
                                  capture_output=True, text=True, timeout=10)
            if done.returncode == 0 and done.stdout.strip():
                return f"git {done.stdout.strip()}"
        except (OSError, subprocess.SubprocessError):
            pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"meter-gateway {version('meter-gateway')}"
    except PackageNotFoundError:
        return "unknown"


def known_bad_zeros(table) -> np.ndarray:
    """Readings that are known-bad zeros: in a meter's run of zero readings spanning ≥ ZERO_STRETCH_HOURS,
    or site-0 electricity zeros before SITE0_GAP_END_LOCAL. Boolean mask over ``table``'s rows."""
    y, ts = np.asarray(table.meter_reading), np.asarray(table.ts_ms, dtype=np.int64)
    key = np.asarray(table.building_id, dtype=np.int64) * 4 + np.asarray(table.meter, dtype=np.int64)
    out = np.zeros(len(y), dtype=bool)
    if len(y) == 0:
        return out
    order = np.lexsort((ts, key))
    k, z, t = key[order], (y == 0)[order], ts[order]
    start = np.flatnonzero(np.r_[True, (z[1:] != z[:-1]) | (k[1:] != k[:-1])])
    run = np.cumsum(np.isin(np.arange(len(z)), start)) - 1
    span_h = (np.maximum.reduceat(t, start) - np.minimum.reduceat(t, start))[run] / 3_600_000
    out[order] = z & (span_h >= ZERO_STRETCH_HOURS)
    gap_end = local_to_utc_ms(SITE0_GAP_END_LOCAL, UTC_OFFSET_HOURS["0"])
    site = np.asarray(table.site_id)
    out |= (site == 0) & (np.asarray(table.meter) == 0) & (y == 0) & (ts < gap_end)
    return out


def _offset(X: np.ndarray, fill: float) -> np.ndarray:
    lsf = X[:, FEATURE_INDEX["log_square_feet"]].astype(np.float64)
    return np.where(np.isnan(lsf), fill, lsf)


def fit_lightgbm(X, y, params, rounds, threads):
    """A LightGBM model of ``y`` on the feature matrix, as every model here sees it (feature names,
    categorical splits)."""
    import lightgbm as lgb

    ds = lgb.Dataset(X, y, feature_name=list(FEATURE_NAMES), categorical_feature=list(CATEGORICAL),
                     free_raw_data=True)
    return lgb.train({**params, "num_threads": threads}, ds, rounds)


def _fit(X, ly, fill, params, rounds, threads):
    return fit_lightgbm(X, ly - _offset(X, fill), params, rounds, threads)


def fit_rows(X, rows, exclude, zero_state: bool) -> tuple[np.ndarray, float]:
    """The rows of ``rows`` a model is fitted on, and its square-feet fill (the median log square
    feet of the rows not ``exclude``d): a plain regression leaves the excluded rows out, a
    zero-state model fits on every row (its classifier must see the zeros)."""
    kept = rows[~exclude[rows]]
    fill = float(np.nanmedian(X[kept, FEATURE_INDEX["log_square_feet"]]))
    return (rows if zero_state else kept), fill


def fit_predictor(X, ly, rows, fill, params, rounds, threads, zero_state: bool = False):
    """(regression, zero-state classifier or None) fitted on ``rows``. With ``zero_state`` the
    regression sees only the non-zero readings among them and the classifier every one of ``rows``
    (:mod:`gateway.model.zero_state`)."""
    if not zero_state:
        return _fit(X[rows], ly[rows], fill, params, rounds, threads), None
    from gateway.model import zero_state as zs

    on = rows[ly[rows] > 0]
    return _fit(X[on], ly[on], fill, params, rounds, threads), zs.fit(X[rows], ly[rows] == 0, params, rounds, threads)


def predict_log(booster, classifier, X, fill) -> np.ndarray:
    """log1p(expected) as the exported graph computes it, from LightGBM itself."""
    level = booster.predict(X) + _offset(X, fill)
    if classifier is None:
        return level
    from gateway.model import zero_state as zs

    return zs.combine(level, classifier.predict(X))


def cross_validate(
    table, X, ly, params=None, rounds=DEFAULT_ROUNDS, folds=5, threads=0, progress=None, exclude=None,
    zero_state: bool = False,
) -> dict:
    """GroupKFold by building: model vs naive RMSLE, online correction and anomaly AUC, all out of fold.

    ``exclude`` (bool per row): left out of each fold's training rows, never out of the evaluation;
    the RMSLE without them is reported as well (``rmsle_model_clean``, ``rmsle_naive_clean``).
    ``zero_state``: each fold's model is a level regression and a zero-state classifier (the
    classifier trains on every reading of the fold, known-bad zeros included).
    """
    from sklearn.model_selection import GroupKFold

    params = params or DEFAULT_PARAMS
    exclude = np.zeros(len(ly), dtype=bool) if exclude is None else np.asarray(exclude, dtype=bool)
    oof = np.zeros(len(ly))
    naive = np.zeros(len(ly))
    for k, (tr, te) in enumerate(GroupKFold(folds).split(X, ly, table.building_id)):
        t0 = time.perf_counter()
        fitted, fill = fit_rows(X, tr, exclude, zero_state)
        tr = tr[~exclude[tr]]  # the naive baseline's rows
        booster, classifier = fit_predictor(X, ly, fitted, fill, params, rounds, threads, zero_state)
        oof[te] = predict_log(booster, classifier, X[te], fill)
        naive[te] = naive_baseline(X[tr], ly[tr], X[te])
        fold = rmsle(oof[te], ly[te], table.meter[te])["overall"]
        log.info("fold %d/%d: %d unseen buildings, RMSLE %.4f (%.0f s)", k + 1, folds,
                 len(np.unique(table.building_id[te])), fold, time.perf_counter() - t0)  # fmt: skip
        if progress is not None:
            progress(k + 1, folds)
    order = np.argsort(table.ts_ms, kind="stable")
    keys = np.char.add(np.char.add(table.building_id.astype(str), ":"), table.meter.astype(str))[order]
    expected, _ = run_online(keys, oof[order], ly[order])
    plain, _ = plain_window_baseline(keys, oof[order], ly[order])
    return {
        "folds": folds,
        "rmsle_model": rmsle(oof, ly, table.meter),
        "rmsle_naive": rmsle(naive, ly, table.meter),
        "rmsle_model_clean": rmsle(oof[~exclude], ly[~exclude], table.meter[~exclude]),
        "rmsle_naive_clean": rmsle(naive[~exclude], ly[~exclude], table.meter[~exclude]),
        "excluded_from_training": int(exclude.sum()),
        "rmsle_online": rmsle(expected, ly[order], table.meter[order]),
        "rmsle_online_plain_median24": rmsle(plain, ly[order], table.meter[order]),
        "anomaly": anomaly_auc(keys, oof[order], table.meter_reading[order]),
    }


def to_onnx(booster, n_features: int, fill: float, classifier=None):
    """Convert with onnxmltools and append ``+ log(square feet)`` (NaN → ``fill``) to the graph;
    with a zero-state ``classifier``, that sum is the level and the output (1 − p_zero) · level."""
    import onnx
    from onnx import TensorProto, helper
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    model = convert_lightgbm(booster, initial_types=[(INPUT_NAME, FloatTensorType([None, n_features]))], target_opset=15)
    graph = model.graph
    raw = graph.output[0].name
    k = FEATURE_INDEX["log_square_feet"]
    graph.initializer.extend([
        helper.make_tensor("lsf_index", TensorProto.INT64, [1], [k]),
        helper.make_tensor("lsf_fill", TensorProto.FLOAT, [], [fill]),
    ])  # fmt: skip
    graph.node.extend([
        helper.make_node("Gather", [INPUT_NAME, "lsf_index"], ["lsf_raw"], axis=1),
        helper.make_node("IsNaN", ["lsf_raw"], ["lsf_isnan"]),
        helper.make_node("Where", ["lsf_isnan", "lsf_fill", "lsf_raw"], ["lsf"]),
        helper.make_node("Add", [raw, "lsf"], [OUTPUT_NAME if classifier is None else "log1p_level"]),
    ])  # fmt: skip
    if classifier is not None:
        from gateway.model import zero_state as zs

        zs.append_to_graph(model, classifier, INPUT_NAME, "log1p_level", OUTPUT_NAME)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, 13)  # IsNaN on float, Where
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [None, 1]))
    onnx.checker.check_model(model)
    return model


def check_parity(model_bytes: bytes, booster, X: np.ndarray, fill: float, classifier=None) -> float:
    """Max |ONNX − LightGBM| in log space over ``X``; raises ModelError above the tolerance."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    got = sess.run(None, {INPUT_NAME: X.astype(np.float32)})[0].reshape(-1)
    want = predict_log(booster, classifier, X, fill)
    diff = float(np.max(np.abs(got.astype(np.float64) - want))) if len(X) else 0.0
    if not diff <= PARITY_TOLERANCE:
        raise ModelError(f"ONNX parity check failed: max abs diff {diff:.3g} > {PARITY_TOLERANCE:g} in log space")
    return diff


def _golden(X: np.ndarray, out: np.ndarray) -> dict:
    rows = [[None if np.isnan(v) else float(v) for v in row] for row in X.tolist()]
    return {"feature_names": list(FEATURE_NAMES), "rows": rows, "expected": [float(v) for v in out]}


def train(
    data_path: str | Path | None,
    out_dir: str | Path,
    buildings_csv: str | Path | None = None,
    params: dict | None = None,
    rounds: int = DEFAULT_ROUNDS,
    folds: int = 5,
    threads: int = 0,
    evaluate: bool = True,
    name: str | None = None,
    progress=None,
    clean: bool = True,
    source: str | Path | None = None,
    weather: str | Path | None = None,
    parent: str | None = None,
    trained_by: str = "gateway model train",
    card: bool = False,
    zero_state: bool = True,
) -> dict:
    """Train on ``data_path`` (an ASHRAE CSV) or ``source`` (the analytics store, see
    :func:`load_from`), evaluate (unless ``evaluate=False``), write the model folder; returns the manifest.

    ``progress(done, total)`` is called after each fold and after the final fit. ``clean``: leave
    :func:`known_bad_zeros` out of training (evaluation always keeps every reading). ``parent``:
    the version of the model in service, for the lineage. ``card``: also write ``CARD.md``
    (:mod:`gateway.model.card`) into the folder. ``zero_state``: a level regression and a zero-state
    classifier in one graph (:mod:`gateway.model.zero_state`).
    """
    if (data_path is None) == (source is None):
        raise ModelError("give one of --data (an ASHRAE CSV) or --from (the analytics store)")
    if source is not None:
        table, buildings, X, ly, data = load_from(source, buildings_csv, weather)
    else:
        table, buildings, X, ly = load_training_data(data_path, buildings_csv)
        data = {"path": Path(data_path).name, "readings": len(ly)}
    return fit_and_write(table, X, ly, out_dir, training_data=data, params=params, rounds=rounds, folds=folds,
                         threads=threads, evaluate=evaluate, name=name, progress=progress, clean=clean,
                         parent=parent, trained_by=trained_by, card=card, zero_state=zero_state)


def fit_and_write(
    table, X, ly, out_dir, *, training_data: dict, params: dict | None = None, rounds: int = DEFAULT_ROUNDS,
    folds: int = 5, threads: int = 0, evaluate: bool = True, name: str | None = None, progress=None,
    clean: bool = True, parent: str | None = None, trained_by: str = "gateway model train", card: bool = False,
    zero_state: bool = True,
) -> dict:
    """Fit on the rows of ``table`` (features ``X``, targets ``ly``), check ONNX parity in log
    space, write the model folder and its card; returns the manifest."""
    params = {**DEFAULT_PARAMS, **(params or {})}
    out = Path(out_dir)
    name = name or out.name
    log.info("%d readings of %d buildings, %d features", len(ly), len(np.unique(table.building_id)), X.shape[1])
    exclude = known_bad_zeros(table) if clean else np.zeros(len(ly), dtype=bool)
    if zero_state:
        log.info("zero-state model: the level on the %d non-zero readings, the classifier on all",
                 int((ly > 0).sum()))
    else:
        log.info("%d known-bad zero readings left out of training", int(exclude.sum()))
    metrics = (cross_validate(table, X, ly, params, rounds, folds, threads, progress, exclude, zero_state)
               if evaluate else {})
    fitted, fill = fit_rows(X, np.arange(len(ly)), exclude, zero_state)
    booster, classifier = fit_predictor(X, ly, fitted, fill, params, rounds, threads, zero_state)
    if progress is not None:
        progress(folds, folds)
    model = to_onnx(booster, X.shape[1], fill, classifier)

    rng = np.random.default_rng(0)
    sample = X[rng.choice(len(X), size=min(20_000, len(X)), replace=False)]
    diff = check_parity(model.SerializeToString(), booster, sample, fill, classifier)
    log.info("ONNX parity: max abs diff %.2e on %d rows", diff, len(sample))

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    first, last = (str(table.timestamp.min()), str(table.timestamp.max()))
    meta = {
        "feature_names": json.dumps(list(FEATURE_NAMES)),
        "target_transform": TARGET_TRANSFORM,
        "output": OUTPUT_NAME,
        "training_data": json.dumps({**training_data, "rows": len(ly), "from_local": first, "to_local": last,
                                     "from_utc_ms": int(table.ts_ms.min()), "to_utc_ms": int(table.ts_ms.max()),
                                     "buildings": int(len(np.unique(table.building_id))),
                                     "meters": int(len(np.unique(table.building_id * 4 + table.meter))),
                                     "rows_fitted": len(fitted),
                                     "excluded": "none" if zero_state or not clean else "known_bad_zeros"}),  # fmt: skip
        "metrics": json.dumps(metrics),
        "params": json.dumps({**params, "rounds": rounds, "zero_state": zero_state}),
        "lineage": json.dumps({"parent": parent, "code_version": code_version(), "trained_by": trained_by}),
    }
    body = model.SerializeToString()
    version = f"{name}-{stamp}-{hashlib.sha256(body).hexdigest()[:8]}"
    meta["model_version"] = version
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "gateway.model.train"
    body = model.SerializeToString()
    check_parity(body, booster, sample, fill, classifier)  # what is written is what was checked

    import onnxruntime as ort

    golden_rows = sample[:16]
    expected = ort.InferenceSession(body, providers=["CPUExecutionProvider"]).run(None, {INPUT_NAME: golden_rows})[0]
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "name": name,
        "version": version,
        "created": stamp,
        "model": "model.onnx",
        "sha256": hashlib.sha256(body).hexdigest(),
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "feature_names": list(FEATURE_NAMES),
        "target_transform": TARGET_TRANSFORM,
        "training_data": json.loads(meta["training_data"]),
        "parity_max_abs_diff": diff,
        "metrics": metrics,
        "zero_state": zero_state,
        "lineage": json.loads(meta["lineage"]),
    }
    (out / "model.onnx").write_bytes(body)
    (out / "golden.json").write_text(json.dumps(_golden(golden_rows, expected.reshape(-1)), indent=1) + "\n")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if card:
        from gateway.model.card import write_card

        write_card(out)
    log.info("wrote %s (%d bytes), version %s", out / "model.onnx", len(body), version)
    return manifest


def _command():
    import click

    @click.command("train")
    @click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False),
                  help="An ASHRAE CSV (readings with weather and metadata columns).")
    @click.option("--from", "source", metavar="s3://BUCKET/PREFIX|DIR|CSV",
                  help="The analytics store: Firehose objects on S3 or in an emulation root, or an IoT "
                       "Analytics dataset CSV.")
    @click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
    @click.option("--buildings", "buildings_csv", type=click.Path(exists=True, dir_okay=False), default=None,
                  help="building_metadata.csv (default: the metadata columns of --data; with --from the "
                       "bundled data/building_metadata.csv)")  # fmt: skip
    @click.option("--weather", type=click.Path(exists=True, dir_okay=False), default=None,
                  help="With --from: the weather feed's messages (JSON array, .gz allowed) to join.")
    @click.option("--parent", "parent_dir", type=click.Path(exists=True, file_okay=False), default=None,
                  help="The model folder in service, recorded as the parent in the lineage.")
    @click.option("--rounds", default=DEFAULT_ROUNDS, show_default=True)
    @click.option("--folds", default=5, show_default=True)
    @click.option("--no-eval", is_flag=True, help="skip the cross-validation")
    @click.option("--keep-bad-zeros", is_flag=True, help="With --no-zero-state: train on known-bad zero stretches too.")
    @click.option("--zero-state/--no-zero-state", default=True, show_default=True,
                  help="A level regression on the non-zero readings and a classifier of zero readings, in one "
                       "graph; --no-zero-state: one regression (without the known-bad zeros unless --keep-bad-zeros).")
    def train_command(data_path, source, out_dir, buildings_csv, weather, parent_dir, rounds, folds, no_eval,
                      keep_bad_zeros, zero_state):
        """Train the model on an ASHRAE CSV or the analytics store and write MODEL_DIR (model.onnx,
        golden.json, manifest.json, CARD.md)."""
        from rich.logging import RichHandler

        logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
        try:
            parent = json.loads((Path(parent_dir) / "manifest.json").read_text())["version"] if parent_dir else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise click.ClickException(f"--parent {parent_dir}: cannot read its manifest.json: {exc}") from exc
        try:
            manifest = train(data_path, out_dir, buildings_csv, rounds=rounds, folds=folds, evaluate=not no_eval,
                             clean=not keep_bad_zeros, source=source, weather=weather, parent=parent, card=True, zero_state=zero_state)  # fmt: skip
        except ModelError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(json.dumps({"version": manifest["version"], "metrics": manifest["metrics"]}, indent=2))

    return train_command


train_command = _command()

if __name__ == "__main__":
    train_command()
