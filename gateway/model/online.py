"""Per-meter online learning: correct the model with each meter's recent residuals, and score anomalies.

For each meter the gateway keeps its last :attr:`MeterStats.window` residuals (log1p space,
``log_actual − log_pred``) in a ring buffer. A reading is judged only against residuals of
readings *before* it:

- expected value (log1p space) = model prediction + a recent offset: a weighted blend of the
  last two residuals and the medians of the last 6, 12 and 24 (:data:`OFFSET_WEIGHTS`); the last
  two are clipped to ``clip`` scales around the window median;
- the anomaly score is measured from the same blend with the last two residuals clipped much
  tighter (``score_clip``), so one spike cannot make the next good reading look anomalous;
- anomaly score = ``|log_actual − centre| / scale``, where scale is 1.4826 × the median of the
  meter's last ``window`` absolute errors from that centre (a MAD of its one-step-ahead
  errors), floored at :attr:`MeterStats.min_scale` so a flat meter does not turn every wiggle
  into an alarm; plus two terms that the robust z misses on noisy meters:
  ``new_high_weight × max(0, residual − highest residual of the window)`` (a reading above
  anything the meter did lately, relative to the model: spikes) and
  ``zero_weight × (reading is 0) × (1 − share of zero readings in the window)`` (a dropout on a
  meter that does not usually read 0); the sum is multiplied by ``score_unit`` (0.6), which keeps
  the score on the scale of a robust z;
- anomaly flag = score ≥ :attr:`MeterStats.threshold`, by default :data:`THRESHOLD` (3.5): the
  dropout term alone (0.6 × 5 = 3) plus a little z crosses it, so a meter that drops to 0 is
  flagged at a minute's cadence (80 % of the simulator's dropouts; 23 % at 5.5). On the ASHRAE
  sample, where a meter reads about once a day, a higher threshold has the better F1 (5.5: at
  least 0.65 in every view against 0.59 at 3.5; ``gateway model quality --thresholds``), because
  there the real readings are noisier than any minute's; that is what ``model.threshold`` is for.

A meter with no history gets the model's prediction and a score measured against
:attr:`MeterStats.cold_scale`. State is numpy arrays indexed by meter (no per-reading Python
work inside a batch), and persists in the SQLite table ``meter_stats``.
"""

from __future__ import annotations

import sqlite3

import numpy as np

from gateway.db import atomic
from gateway.errors import ModelError
from gateway.schema import ensure_meter_stats

#: (term, weight) of the offset blend; fitted by least squares on held-out buildings, then rounded.
OFFSET_WEIGHTS: tuple[tuple[str, float], ...] = (
    ("last", 0.35),
    ("last2", 0.15),
    ("med6", 0.20),
    ("med12", 0.15),
    ("med24", 0.15),
)
_MAD_TO_SIGMA = 1.4826
#: How ``meter_stats`` rows are written: residuals and errors as little-endian float32, zero flags
#: as bytes (0, 1, 255 = unknown). Rows without a format hold float64 throughout.
FORMAT = 2


def _ensure_table(conn: sqlite3.Connection) -> None:
    """Create ``meter_stats``, or add the columns a table written by an older gateway lacks."""
    ensure_meter_stats(conn)


#: The default anomaly threshold (``model.threshold``); see the module docstring for why 3.5.
THRESHOLD = 3.5


class MeterStats:
    """Online residual statistics of every meter, updated in batches.

    ``update`` processes a batch in order: readings of the same meter within one batch each
    see the ones before them.
    """

    def __init__(
        self,
        window: int = 24,
        threshold: float = THRESHOLD,
        min_scale: float = 0.5,
        cold_scale: float = 1.0,
        clip: float = 20.0,
        score_clip: float = 3.0,
        new_high_weight: float = 12.0,
        zero_weight: float = 5.0,
        score_unit: float = 0.6,
    ):
        if window < 2:
            raise ModelError(f"window: {window} must be ≥ 2")
        self.window = window
        self.threshold = threshold
        self.min_scale = min_scale
        self.cold_scale = cold_scale
        self.clip = clip
        self.score_clip = score_clip
        self.new_high_weight = new_high_weight
        self.zero_weight = zero_weight
        self.score_unit = score_unit
        self._index: dict[str, int] = {}
        self._keys: list[str] = []
        self._buf = np.full((0, window), np.nan)  # ring buffer of residuals per meter
        self._err = np.full((0, window), np.nan)  # ring buffer of |log_actual − expected| per meter
        self._zero = np.full((0, window), np.nan)  # ring buffer of 1.0 (reading was 0) / 0.0 per meter
        self._pos = np.zeros(0, dtype=np.int64)  # next slot to write
        self._count = np.zeros(0, dtype=np.int64)  # residuals seen (not capped)
        self._dirty = np.zeros(0, dtype=bool)  # learned since the last save

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    def _ids(self, meter_keys) -> np.ndarray:
        keys = meter_keys.tolist() if isinstance(meter_keys, np.ndarray) else list(meter_keys)
        index = self._index
        get = index.get
        ids = [get(k, -1) for k in keys]
        if -1 in ids:
            for i, k in enumerate(keys):
                if ids[i] == -1:
                    j = index.get(k)
                    if j is None:
                        j = index[k] = len(self._keys)
                        self._keys.append(k)
                    ids[i] = j
            self._grow(len(self._keys))
        return np.array(ids, dtype=np.int64)

    def _grow(self, n: int) -> None:
        have = self._buf.shape[0]
        if n <= have:
            return
        cap = max(n, 2 * have, 1024)
        buf = np.full((cap, self.window), np.nan)
        buf[:have] = self._buf
        err = np.full((cap, self.window), np.nan)
        err[:have] = self._err
        self._err = err
        zero = np.full((cap, self.window), np.nan)
        zero[:have] = self._zero
        self._zero = zero
        pos = np.zeros(cap, dtype=np.int64)
        pos[:have] = self._pos
        count = np.zeros(cap, dtype=np.int64)
        count[:have] = self._count
        dirty = np.zeros(cap, dtype=bool)
        dirty[:have] = self._dirty
        self._buf, self._pos, self._count, self._dirty = buf, pos, count, dirty

    def snapshot(self, meter_keys) -> tuple:
        """What :meth:`update` may change for ``meter_keys``, for :meth:`restore`."""
        u = np.unique(self._ids(meter_keys))
        return (u, self._buf[u].copy(), self._err[u].copy(), self._zero[u].copy(), self._pos[u].copy(),
                self._count[u].copy(), self._dirty[u].copy())

    def restore(self, snap: tuple) -> None:
        """Forget what was learned since :meth:`snapshot` (its readings were not stored)."""
        u, buf, err, zero, pos, count, dirty = snap
        self._buf[u], self._err[u], self._zero[u] = buf, err, zero
        self._pos[u], self._count[u], self._dirty[u] = pos, count, dirty

    @property
    def dirty(self) -> int:
        """Meters learned since the last :meth:`clean`."""
        return int(self._dirty[: len(self._keys)].sum())

    def clean(self) -> None:
        """What changed is saved: nothing is dirty."""
        self._dirty[:] = False

    def _stats(self, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Offset and scale of meters ``m`` from their current windows (before a new reading)."""
        w = self.window
        buf, pos = self._buf[m], self._pos[m]
        n = np.minimum(self._count[m], w)
        k = len(m)
        # chronological order, oldest first; empty slots (NaN) are at the start
        order = (pos[:, None] + np.arange(w)[None, :]) % w
        chrono = np.take_along_axis(buf, order, axis=1)
        rows = np.arange(k)
        has = n > 0

        def median_last(j: int) -> np.ndarray:
            c = np.minimum(n, j)
            s = np.sort(chrono[:, w - j :], axis=1)  # NaNs sort last
            lo = np.clip((c - 1) // 2, 0, j - 1)
            hi = np.clip(c // 2, 0, j - 1)
            return np.where(c > 0, 0.5 * (s[rows, lo] + s[rows, hi]), 0.0)

        terms = {f"med{j}": median_last(min(j, w)) for j in (6, 12, 24)}
        med = terms[f"med{min(24, w)}"]
        c = np.maximum(n, 1)
        dev = np.sort(self._err[m], axis=1)  # past absolute errors of the expectation (order is irrelevant)
        mad = 0.5 * (dev[rows, np.clip((c - 1) // 2, 0, w - 1)] + dev[rows, np.clip(c // 2, 0, w - 1)])
        scale = np.where(n >= 3, np.maximum(_MAD_TO_SIGMA * np.nan_to_num(mad), self.min_scale), self.cold_scale)
        last = np.where(has, chrono[:, -1], 0.0)
        last2 = np.where(n >= 2, chrono[:, -2], last)
        rest = sum(weight * terms[name] for name, weight in OFFSET_WEIGHTS if name.startswith("med"))
        w_last, w_last2 = dict(OFFSET_WEIGHTS)["last"], dict(OFFSET_WEIGHTS)["last2"]

        def blend(clip: float) -> np.ndarray:
            lo, hi = med - clip * scale, med + clip * scale
            return np.where(has, rest + w_last * np.clip(last, lo, hi) + w_last2 * np.clip(last2, lo, hi), 0.0)

        # highest residual of the window (needs 3) and share of zero readings among the known flags
        high = np.where(n >= 3, np.nanmax(np.where(np.isnan(buf), -np.inf, buf), axis=1), np.inf)
        zeros = self._zero[m]
        known = np.isfinite(zeros).sum(axis=1)
        zero_share = np.where(known > 0, np.nansum(zeros, axis=1) / np.maximum(known, 1), 0.0)
        return blend(self.clip), blend(self.score_clip), scale, high, zero_share

    def update(
        self, meter_keys, log_pred: np.ndarray, log_actual: np.ndarray, learn: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Judge a batch of readings in order, then learn from them.

        Returns ``(log_expected, score)``: the corrected expectation in log1p space (clipped at 0)
        and the anomaly score of each reading, both from the meter's history before it.
        ``learn`` (bool per reading, default all True): False judges a reading without adding it
        to its meter's history (a reading sent again after a crash must not be learned twice).
        """
        log_pred = np.asarray(log_pred, dtype=np.float64).reshape(-1)
        log_actual = np.asarray(log_actual, dtype=np.float64).reshape(-1)
        ids = self._ids(meter_keys)
        if not (len(ids) == len(log_pred) == len(log_actual)):
            raise ModelError(f"update: {len(ids)} keys, {len(log_pred)} predictions, {len(log_actual)} actuals")
        if learn is not None:
            learn = np.asarray(learn, dtype=bool).reshape(-1)
            if len(learn) != len(ids):
                raise ModelError(f"update: {len(ids)} keys but {len(learn)} learn flags")
        expected = np.empty(len(ids))
        score = np.empty(len(ids))
        if len(ids) == 0:
            return expected, score
        # rank of each reading among the batch's readings of the same meter
        order = np.argsort(ids, kind="stable")
        sid = ids[order]
        first = np.r_[True, sid[1:] != sid[:-1]]
        group_start = np.maximum.accumulate(np.where(first, np.arange(len(sid)), 0))
        rank = np.empty(len(ids), dtype=np.int64)
        rank[order] = np.arange(len(sid)) - group_start
        by_rank = np.argsort(rank, kind="stable")
        bounds = np.searchsorted(rank[by_rank], np.arange(rank.max() + 2))
        w = self.window
        for r in range(len(bounds) - 1):
            sel = by_rank[bounds[r] : bounds[r + 1]]  # distinct meters, one reading each
            m = ids[sel]
            offset, score_offset, scale, high, zero_share = self._stats(m)
            e = np.maximum(log_pred[sel] + offset, 0.0)
            expected[sel] = e
            err = np.abs(log_actual[sel] - np.maximum(log_pred[sel] + score_offset, 0.0))
            residual = log_actual[sel] - log_pred[sel]
            is_zero = log_actual[sel] <= 0.0
            score[sel] = self.score_unit * (
                err / scale
                + self.new_high_weight * np.maximum(residual - high, 0.0)
                + self.zero_weight * is_zero * (1.0 - zero_share)
            )
            if learn is not None:
                keep = learn[sel]
                m, sel, err, residual, is_zero = m[keep], sel[keep], err[keep], residual[keep], is_zero[keep]
            # Kept at float32 precision, as they are saved: a restart resumes exactly where it was.
            self._buf[m, self._pos[m]] = residual.astype(np.float32)
            self._err[m, self._pos[m]] = err.astype(np.float32)
            self._zero[m, self._pos[m]] = is_zero
            self._pos[m] = (self._pos[m] + 1) % w
            self._count[m] += 1
            self._dirty[m] = True
        return expected, score

    def flag(self, score: np.ndarray) -> np.ndarray:
        """Anomaly flags (bool) of scores from :meth:`update`."""
        return np.asarray(score) >= self.threshold

    # -- persistence -------------------------------------------------------------------------

    def save(self, conn: sqlite3.Connection) -> None:
        """Write the state of every meter learned since the last :meth:`clean` to table
        ``meter_stats`` (created if missing), in one transaction (the caller's, if it has one).
        Only what changed is written: a save costs what was learned, not the fleet's size."""
        n = len(self._keys)
        w = self.window
        sel = np.flatnonzero(self._dirty[:n])
        order = (self._pos[sel, None] + np.arange(w)[None, :]) % w
        chrono = np.take_along_axis(self._buf[sel], order, axis=1)
        errors = np.take_along_axis(self._err[sel], order, axis=1)
        zeros = np.take_along_axis(self._zero[sel], order, axis=1)
        rows = []
        for j, i in enumerate(sel.tolist()):
            k = int(min(self._count[i], w))
            z = zeros[j, w - k :]
            rows.append((self._keys[i], int(self._count[i]), w, chrono[j, w - k :].astype("<f4").tobytes(),
                         errors[j, w - k :].astype("<f4").tobytes(),
                         np.where(np.isnan(z), 255, z).astype(np.uint8).tobytes(), FORMAT))
        try:
            with atomic(conn):  # one transaction, also on an autocommit connection
                _ensure_table(conn)
                conn.executemany(
                    "INSERT INTO meter_stats (meter_key, n_seen, window, residuals, errors, zeros, format) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT(meter_key) DO UPDATE SET n_seen=excluded.n_seen, window=excluded.window, "
                    "residuals=excluded.residuals, errors=excluded.errors, zeros=excluded.zeros, "
                    "format=excluded.format",
                    rows,
                )
        except sqlite3.Error as exc:
            raise ModelError(f"meter_stats: cannot save: {exc}") from exc

    def load(self, conn: sqlite3.Connection) -> int:
        """Replace the state with table ``meter_stats`` (missing table → empty). Returns meters loaded."""
        try:
            with conn:
                _ensure_table(conn)
            rows = conn.execute(
                "SELECT meter_key, n_seen, residuals, errors, zeros, format FROM meter_stats ORDER BY rowid"
            ).fetchall()
        except sqlite3.Error as exc:
            raise ModelError(f"meter_stats: cannot load: {exc}") from exc
        w = self.window
        self._index, self._keys = {}, []
        self._buf = np.full((0, w), np.nan)
        self._err = np.full((0, w), np.nan)
        self._zero = np.full((0, w), np.nan)
        self._pos = np.zeros(0, dtype=np.int64)
        self._count = np.zeros(0, dtype=np.int64)
        self._dirty = np.zeros(0, dtype=bool)
        self._grow(len(rows))
        for i, (key, n_seen, blob, err_blob, zero_blob, fmt) in enumerate(rows):
            real = "<f4" if fmt == FORMAT else "<f8"  # rows saved before format 2 hold float64
            # A smaller window keeps the newest; float64 rows are held at float32, as they are saved.
            res = np.frombuffer(blob, dtype=real)[-w:].astype(np.float32)
            err = np.frombuffer(err_blob, dtype=real)[-w:].astype(np.float32)
            if len(err) != len(res):
                raise ModelError(f"meter_stats: row {key!r} has {len(res)} residuals but {len(err)} errors")
            if zero_blob is not None:  # rows saved before the zero flags existed have none: unknown (NaN)
                if fmt == FORMAT:
                    flags = np.frombuffer(zero_blob, dtype=np.uint8)[-w:]
                    zero = np.where(flags == 255, np.nan, flags.astype(np.float64))
                else:
                    zero = np.frombuffer(zero_blob, dtype="<f8")[-w:]
                if len(zero) != len(res):
                    raise ModelError(f"meter_stats: row {key!r} has {len(res)} residuals but {len(zero)} zero flags")
                self._zero[i, : len(zero)] = zero
            self._index[key] = i
            self._keys.append(key)
            self._buf[i, : len(res)] = res
            self._err[i, : len(err)] = err
            self._pos[i] = len(res) % w
            self._count[i] = max(int(n_seen), len(res)) if len(res) == w else len(res)
        return len(rows)
