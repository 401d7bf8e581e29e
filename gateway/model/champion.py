"""Champion against challenger: is the newly trained model better than the one in service?

Both are judged on the **same recent readings of buildings neither was trained on**: the data is
held out by building *and* by time (:func:`split`). A share of the buildings (chosen by a hash of
their ids, so the same data always gives the same split) is set aside; the challenger trains only
on the other buildings' readings before the cutoff (the last ``holdout_days`` of the data). The
held-out buildings' readings from the cutoff on are scored; their earlier readings only warm up the
per-meter online learning, as the gateway would have learned them before that day.

Each model is loaded with :class:`gateway.model.scorer.Scorer` (so a challenger that fails the
hot-swap checks is refused here, not on a gateway) and scored on the same rows with the same
injected anomalies (:func:`evaluate`): RMSLE of the model alone, RMSLE after the per-meter online
learning (:class:`gateway.model.online.MeterStats`), anomaly AUC, and F1 of the flag at the
default threshold.

:func:`decide` promotes the challenger only when its ``metric`` is better than the champion's by
``margin`` (relative: 0.02 means 2 % lower RMSLE, or 2 % of the way from the champion's AUC or F1
to 1), and none of the other figures is worse by more than ``tolerance`` (same units). Otherwise
the challenger is recorded, with the figures and the reason, and not shipped.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.errors import ModelError

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
#: The figures a decision can use; RMSLEs are better lower, AUC and F1 higher.
METRICS = ("rmsle_model", "rmsle_online", "anomaly_auc", "anomaly_f1")
LOWER_IS_BETTER = {"rmsle_model", "rmsle_online"}


@dataclass(frozen=True)
class Holdout:
    """Row indices of a table: ``train`` (other buildings, before the cutoff), ``test`` (held-out
    buildings from the cutoff on, scored) and ``warm`` (held-out buildings before the cutoff)."""

    train: np.ndarray
    test: np.ndarray
    warm: np.ndarray
    cutoff_ms: int
    buildings: tuple[int, ...]

    def describe(self, table) -> dict:
        local = table.timestamp
        return {"buildings": len(self.buildings), "building_ids": list(self.buildings),
                "readings": int(len(self.test)), "warm_up_readings": int(len(self.warm)),
                "train_readings": int(len(self.train)), "cutoff_utc_ms": self.cutoff_ms,
                "from_local": str(local[self.test].min()) if len(self.test) else None,
                "to_local": str(local[self.test].max()) if len(self.test) else None}


def _rank(building: int, seed: int) -> bytes:
    return hashlib.blake2b(f"{seed}:{building}".encode(), digest_size=8).digest()


def split(table, holdout_buildings: float = 0.25, holdout_days: float = 30.0, seed: int = 0) -> Holdout:
    """Hold out ``holdout_buildings`` of the buildings (at least one, never all) and the last
    ``holdout_days`` of the data. ModelError when that leaves nothing to train or to score."""
    ids = np.unique(table.building_id)
    if len(ids) < 2:
        raise ModelError(f"champion/challenger needs readings of at least 2 buildings, the data has {len(ids)}")
    n_out = int(min(len(ids) - 1, max(1, round(holdout_buildings * len(ids)))))
    out = sorted(sorted(ids.tolist(), key=lambda b: _rank(b, seed))[:n_out])
    cutoff = int(table.ts_ms.max() - holdout_days * DAY_MS)
    held = np.isin(table.building_id, out)
    recent = table.ts_ms >= cutoff
    h = Holdout(train=np.flatnonzero(~held & ~recent), test=np.flatnonzero(held & recent),
                warm=np.flatnonzero(held & ~recent), cutoff_ms=cutoff, buildings=tuple(int(b) for b in out))
    if len(h.train) == 0 or len(h.test) == 0:
        raise ModelError(f"holdout of {n_out} buildings and {holdout_days:g} days leaves {len(h.train)} readings "
                         f"to train on and {len(h.test)} to score: change cycle.holdout_days or holdout_buildings")
    return h


def holdout_rows(table, holdout: Holdout) -> tuple[np.ndarray, np.ndarray]:
    """The held-out buildings' rows in time order (warm-up and scored), and which of them are scored."""
    rows = np.concatenate([holdout.warm, holdout.test])
    rows = rows[np.argsort(table.ts_ms[rows], kind="stable")]
    return rows, np.isin(rows, holdout.test)


def evaluate(model_dir: str | Path, table, X: np.ndarray, ly: np.ndarray, holdout: Holdout,
             anomaly_rate: float = 0.02, seed: int = 0) -> dict:
    """The model's figures on the holdout (see the module docstring); ModelError if it fails verification."""
    from gateway.model.scorer import Scorer

    scorer = Scorer(model_dir)
    rows, scored = holdout_rows(table, holdout)
    return {"version": scorer.version, **judge(scorer.predict_log(X[rows]), table, ly, rows, scored, anomaly_rate, seed)}


def judge(pred: np.ndarray, table, ly: np.ndarray, rows: np.ndarray, scored: np.ndarray,
          anomaly_rate: float = 0.02, seed: int = 0, thresholds=()) -> dict:
    """The figures of predictions ``pred`` (log1p, for ``rows`` in time order) on the ``scored`` ones:
    the earlier rows only warm up the per-meter online learning. ``thresholds``: also the flag's
    figures at each of these (``anomaly.by_threshold``), to choose ``model.threshold``."""
    from sklearn.metrics import roc_auc_score

    from gateway.model.evaluate import flag_quality, inject_anomalies, rmsle, run_online
    from gateway.model.online import MeterStats

    keys = np.char.add(np.char.add(table.building_id[rows].astype(str), ":"), table.meter[rows].astype(str))
    actual, meter = ly[rows], table.meter[rows]
    expected, _ = run_online(keys, pred, actual)
    injected, is_anomaly = inject_anomalies(table.meter_reading[rows], anomaly_rate, seed)
    _, score = run_online(keys, pred, np.log1p(injected))
    truth = is_anomaly[scored]
    both = truth.any() and not truth.all()
    anomaly = {"auc": float(roc_auc_score(truth, score[scored])) if both else None,
               **flag_quality(score[scored], truth, MeterStats().threshold)}
    if thresholds:
        anomaly["by_threshold"] = {f"{t:g}": flag_quality(score[scored], truth, float(t)) for t in thresholds}
    return {
        "readings": int(scored.sum()),
        "rmsle_model": rmsle(pred[scored], actual[scored], meter[scored]),
        "rmsle_online": rmsle(expected[scored], actual[scored], meter[scored]),
        "anomaly": anomaly,
    }


def figure(evaluation: dict, metric: str) -> float | None:
    """One of :data:`METRICS` from an :func:`evaluate` result."""
    if metric in ("rmsle_model", "rmsle_online"):
        return evaluation[metric]["overall"]
    if metric in ("anomaly_auc", "anomaly_f1"):
        return evaluation["anomaly"][metric.split("_", 1)[1]]
    raise ModelError(f"cycle.metric: {metric!r} is not one of {', '.join(METRICS)}")


def _gain(champion: float, challenger: float, metric: str) -> float:
    """Relative improvement of the challenger (positive is better)."""
    if metric in LOWER_IS_BETTER:
        return (champion - challenger) / champion if champion > 0 else 0.0
    room = 1.0 - champion
    return (challenger - champion) / room if room > 0 else (0.0 if challenger >= champion else -1.0)


def decide(champion: dict | None, challenger: dict, metric: str = "rmsle_model", margin: float = 0.02,
           tolerance: float = 0.05) -> tuple[bool, str]:
    """(promote?, why). No champion (nothing in service) promotes any challenger that was evaluated."""
    new = figure(challenger, metric)
    if champion is None:
        return True, f"no champion in service; challenger {metric} {new:.4f}"
    old = figure(champion, metric)
    if new is None or old is None:
        return False, f"{metric} cannot be computed on the holdout (champion {old}, challenger {new})"
    gain = _gain(old, new, metric)
    if gain < margin:
        return False, (f"{metric} {new:.4f} vs champion {old:.4f}: {gain:+.1%}, needs at least {margin:+.1%} "
                       "(cycle.margin)")
    for other in METRICS:
        if other == metric:
            continue
        a, b = figure(champion, other), figure(challenger, other)
        if a is None or b is None:
            continue
        if _gain(a, b, other) < -tolerance:
            return False, (f"{metric} better by {gain:+.1%}, but {other} {b:.4f} vs champion {a:.4f} is worse by "
                           f"more than {tolerance:.0%} (cycle.tolerance)")
    return True, f"{metric} {new:.4f} vs champion {old:.4f}: {gain:+.1%} (margin {margin:+.1%})"
