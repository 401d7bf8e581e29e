"""How good a model is on buildings it has not seen: RMSLE, the naive baseline, online correction, anomaly AUC.

Training-time only (scikit-learn for the AUC is imported lazily).
"""

from __future__ import annotations

import numpy as np

from gateway.model.features import FEATURE_INDEX
from gateway.model.online import MeterStats
from gateway.readings import METER_TYPES


def rmsle(log_pred: np.ndarray, log_actual: np.ndarray, meter: np.ndarray) -> dict[str, float]:
    """RMSLE (both arguments already log1p) overall and per meter type name."""
    sq = (np.maximum(log_pred, 0.0) - log_actual) ** 2
    out = {"overall": float(np.sqrt(sq.mean()))}
    for code, name in enumerate(METER_TYPES):
        sel = meter == code
        if sel.any():
            out[name] = float(np.sqrt(sq[sel].mean()))
    return out


def naive_baseline(X_train: np.ndarray, ly_train: np.ndarray, X_test: np.ndarray) -> np.ndarray:
    """Median of log1p(reading) by (meter, primary use, local hour), falling back to the meter's median."""
    cols = [FEATURE_INDEX["meter"], FEATURE_INDEX["primary_use"], FEATURE_INDEX["hour"]]

    def code(X):
        k = np.nan_to_num(X[:, cols], nan=99).astype(np.int64)
        return (k[:, 0] * 100 + k[:, 1]) * 100 + k[:, 2]

    ktr, kte = code(X_train), code(X_test)
    order = np.argsort(ktr, kind="stable")
    ks, ys = ktr[order], ly_train[order]
    uniq, start = np.unique(ks, return_index=True)
    end = np.r_[start[1:], len(ks)]
    med = np.array([np.median(ys[s:e]) for s, e in zip(start, end)])
    meter_tr = X_train[:, cols[0]].astype(np.int64)
    meter_med = np.array([np.median(ly_train[meter_tr == m]) if (meter_tr == m).any() else 0.0 for m in range(4)])
    pos = np.clip(np.searchsorted(uniq, kte), 0, len(uniq) - 1)
    hit = uniq[pos] == kte
    return np.where(hit, med[pos], meter_med[X_test[:, cols[0]].astype(np.int64)])


def plain_window_baseline(keys: np.ndarray, log_pred: np.ndarray, log_actual: np.ndarray, window: int = 24):
    """The simple reference: expected = prediction + median of the meter's last ``window`` residuals,
    score = robust z of the residual against that window (median, MAD × 1.4826). Rows in time order."""
    import warnings

    from numpy.lib.stride_tricks import sliding_window_view

    _, key_id = np.unique(keys, return_inverse=True)
    order = np.lexsort((np.arange(len(keys)), key_id))
    k, r = key_id[order], (log_actual - log_pred)[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    ends = np.r_[starts[1:], len(k)]
    W = np.full((len(r), window), np.nan)
    for s, e in zip(starts.tolist(), ends.tolist()):
        W[s:e] = sliding_window_view(np.r_[np.full(window, np.nan), r[s:e]], window)[: e - s]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(W, axis=1)
        mad = np.nanmedian(np.abs(W - med[:, None]), axis=1)
    z = np.abs(r - np.nan_to_num(med)) / np.maximum(1.4826 * np.nan_to_num(mad, nan=1.0), 1e-9)
    expected, score = np.empty(len(r)), np.empty(len(r))
    expected[order] = np.maximum(log_pred[order] + np.nan_to_num(med), 0.0)
    score[order] = z
    return expected, score


def run_online(keys: np.ndarray, log_pred: np.ndarray, log_actual: np.ndarray, batch: int = 10_000, **kw):
    """Feed readings (already in time order) through a fresh :class:`MeterStats`; returns (expected, score)."""
    stats = MeterStats(**kw)
    expected = np.empty(len(keys))
    score = np.empty(len(keys))
    for i in range(0, len(keys), batch):
        expected[i : i + batch], score[i : i + batch] = stats.update(
            keys[i : i + batch], log_pred[i : i + batch], log_actual[i : i + batch]
        )
    return expected, score


def inject_anomalies(actual: np.ndarray, rate: float = 0.02, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Spikes (×3..×10) and dropouts (→0) on ``rate`` of the non-zero readings; returns (values, is_anomaly)."""
    rng = np.random.default_rng(seed)
    pick = (rng.random(len(actual)) < rate) & (actual > 0)
    spike = pick & (rng.random(len(actual)) < 0.5)
    drop = pick & ~spike
    out = actual.copy()
    out[spike] *= rng.uniform(3.0, 10.0, int(spike.sum()))
    out[drop] = 0.0
    return out, pick


#: MeterStats settings that give the earlier score (robust z from the blended centre only).
Z_ONLY: dict = {"new_high_weight": 0.0, "zero_weight": 0.0, "score_unit": 1.0, "min_scale": 0.3}


def flag_quality(score: np.ndarray, is_anomaly: np.ndarray, threshold: float) -> dict[str, float]:
    """How the flag (score >= threshold) does on injected anomalies: precision, recall, F1, and the
    share of real readings flagged."""
    flag = score >= threshold
    tp, fp, fn = int((flag & is_anomaly).sum()), int((flag & ~is_anomaly).sum()), int((~flag & is_anomaly).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "precision": precision, "recall": recall, "injected": int(is_anomaly.sum()),
            "flag_rate_clean": float(flag[~is_anomaly].mean()) if (~is_anomaly).any() else 0.0,
            "threshold": threshold}


def anomaly_auc(keys, log_pred, actual, rate: float = 0.02, seed: int = 0, **kw) -> dict[str, float]:
    """AUC of the online anomaly score separating injected spikes/dropouts from real readings, and
    the flag's F1 at the default threshold."""
    from sklearn.metrics import roc_auc_score

    injected, is_anomaly = inject_anomalies(actual, rate, seed)
    _, score = run_online(keys, log_pred, np.log1p(injected), **kw)
    _, plain = plain_window_baseline(keys, log_pred, np.log1p(injected))
    # the previous score: robust z alone (no new-high or dropout term, scale floor 0.3)
    _, z_only = run_online(keys, log_pred, np.log1p(injected), **{**kw, **Z_ONLY})
    flags = flag_quality(score, is_anomaly, MeterStats(**kw).threshold)
    return {
        "auc": float(roc_auc_score(is_anomaly, score)),
        "auc_robust_z_only": float(roc_auc_score(is_anomaly, z_only)),
        "auc_plain_robust_z24": float(roc_auc_score(is_anomaly, plain)),
        **flags,
        "recall_at_threshold": flags["recall"],
    }
