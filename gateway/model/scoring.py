"""Scoring in the agent: every claim from the buffer, featurized, scored, learned, forwarded.

:class:`ModelHolder` owns the model in use and replaces it by a hot swap:

1. load the new folder's ONNX session;
2. check its metadata (feature names and order) against :mod:`gateway.model.features`;
3. run the golden vectors stored with it;
4. swap the reference in one assignment.

Steps 1-3 are :class:`~gateway.model.scorer.Scorer`'s constructor; any failure raises
:class:`~gateway.errors.ModelError`, the old model stays, and the reason is kept for
``gateway status``. The buffer asks for the scorer once per put, so every batch is scored by
exactly one model: a swap loses no reading and scores none twice.

:class:`ReadingScorer` is what the buffer calls as it stores readings (``score``). For a batch it
looks up each building's metadata and the latest weather of its site (stale or missing weather
becomes NaN features, never a stop), featurizes in one vectorized call, runs onnxruntime, and
updates the per-meter online statistics (:class:`~gateway.model.online.MeterStats`), which
correct the model with the meter's own recent residuals and give the anomaly score. A reading
whose building has no metadata cannot be scored: it is forwarded raw only, counted, and named
in ``gateway status``. Each reading's error of the model alone (before the online correction)
feeds :class:`~gateway.model.drift.Drift`, the rolling figure of how well the model in use still
fits, per site and meter type.

Online learning is idempotent per meter: a reading at or before the newest one a meter has
learned from (a late reading, or one offered again) is judged but not learned twice. Scores are
stored beside the readings, so a reading sent again carries the score it was given once.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from gateway.errors import ModelError
from gateway.model.drift import Drift
from gateway.model.features import WEATHER_FIELDS, Buildings, featurize
from gateway.model.online import MeterStats
from gateway.model.scorer import Scorer
from gateway.readings import METER_CODE

log = logging.getLogger(__name__)


def model_stamp(path: Path) -> tuple:
    """What identifies a model folder's content cheaply: its manifest's and model's mtimes and sizes."""
    out = []
    for name in ("manifest.json", "model.onnx", "golden.json"):
        try:
            st = (path / name).stat()
            out.append((name, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((name, None, None))
    return tuple(out)


class ModelHolder:
    """The model in use; :meth:`swap` or :meth:`maybe_reload` replace it only with a verified one."""

    def __init__(self, path: str | Path, *, threads: int = 1, check_every_s: float | None = 2.0,
                 clock: Callable[[], float] = time.monotonic, loader: Callable[..., Scorer] = Scorer):
        self.threads = threads
        self.check_every_s = check_every_s
        self.clock = clock
        self.loader = loader
        self.path = Path(path)
        self.current: Scorer = loader(self.path, intra_op_threads=threads)  # a bad first model: raise
        self._stamp = model_stamp(self.path)
        self._next_check = clock() + (check_every_s or 0.0)
        self._lock = threading.Lock()
        self.swaps = 0
        self.last_error: str | None = None
        self.history: list[tuple[str, str]] = [("loaded", self.current.version)]

    @property
    def version(self) -> str:
        return self.current.version

    def swap(self, path: str | Path) -> bool:
        """Load, verify and swap in the model at ``path``. False (old model kept) on failure."""
        path = Path(path)
        with self._lock:
            try:
                new = self.loader(path, intra_op_threads=self.threads)
            except ModelError as exc:
                self.last_error = f"kept {self.current.version}: {exc}"
                self.history.append(("refused", str(exc)))
                log.error("model swap refused, %s", self.last_error)
                return False
            old = self.current.version
            self.current = new  # one reference assignment: the swap
            self.path = path
            self._stamp = model_stamp(path)
            self.swaps += 1
            self.last_error = None
            self.history.append(("swapped", f"{old} -> {new.version}"))
            log.warning("model swapped: %s -> %s", old, new.version)
            return True

    def maybe_reload(self) -> bool:
        """Swap when the folder's content changed (a model component deployed over it).

        With ``check_every_s=None`` the folder is not watched: under Greengrass every model
        version lives at a new path, and announcements drive :meth:`swap` instead."""
        if self.check_every_s is None:
            return False
        now = self.clock()
        if now < self._next_check:
            return False
        self._next_check = now + self.check_every_s
        stamp = model_stamp(self.path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp  # try each new content once; a refused one is not retried in a loop
        return self.swap(self.path)

    def status(self) -> dict:
        return {"version": self.current.version, "path": str(self.path), "swaps": self.swaps,
                "last_error": self.last_error}


class ReadingScorer:
    """Scores readings as they are stored (the buffer's ingest scorer, :meth:`score`).

    ``db_path``: the buffer file, whose ``meter_stats`` and ``meter_learned`` tables hold what
    each meter has learned; they are loaded here, and saved by the buffer inside its own put
    transactions (:meth:`save` with the buffer's connection), only what changed, at most every
    ``save_every_s``. A crash loses at most that much learning, never a score already stored.
    ``drift``: the rolling error of the model alone (:mod:`gateway.model.drift`), saved with them
    (``scoring_status`` row ``drift``).
    """

    def __init__(self, holder: ModelHolder, buildings: Buildings, *, stats: MeterStats | None = None,
                 drift: Drift | None = None, weather=None, weather_max_age_ms: int = 3 * 3600 * 1000,
                 db_path: str | Path | None = None,
                 save_every_s: float = 600.0, clock: Callable[[], float] = time.monotonic):
        self.holder = holder
        self.buildings = buildings
        # `is None`, not `or`: an empty MeterStats or Drift (len 0) is falsy, and its settings count
        self.stats = MeterStats() if stats is None else stats
        self.drift = Drift() if drift is None else drift
        self.weather = weather
        self.weather_max_age_ms = weather_max_age_ms
        self.db_path = Path(db_path) if db_path else None
        self.save_every_s = save_every_s
        self.clock = clock
        self._last_save = clock()
        self.last_ts: dict[str, int] = {}
        self._learned_keys: set[str] = set()  # meters whose last_ts changed since the last save
        self.unscored: Counter = Counter()  # reason → readings
        self.scored = 0
        self.flagged = 0
        self._db: sqlite3.Connection | None = None
        self._bidx = np.zeros(0, dtype=np.int64)
        self._code = np.zeros(0, dtype=np.int64)
        self._site = np.zeros(0, dtype=np.int64)
        self._group = np.zeros(0, dtype=np.int64)  # drift group (site and meter type)
        self._keys: list[str] = []
        if self.db_path is not None:
            self._db = sqlite3.connect(str(self.db_path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout=5000")
            self.stats.load(self._db)
            self._db.execute("CREATE TABLE IF NOT EXISTS meter_learned(meter_key TEXT PRIMARY KEY,"
                             " last_ts INTEGER NOT NULL) WITHOUT ROWID")
            self._db.execute("CREATE TABLE IF NOT EXISTS scoring_status(key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID")
            self.last_ts = dict(self._db.execute("SELECT meter_key, last_ts FROM meter_learned"))
            row = self._db.execute("SELECT value FROM scoring_status WHERE key = 'drift'").fetchone()
            if row:
                try:
                    self.drift.load(json.loads(row[0]))
                except (ValueError, KeyError, TypeError, ModelError) as exc:  # a figure, not worth a stop
                    log.warning("drift: the saved figure in %s is not used (%s: %s); it starts afresh",
                                self.db_path, type(exc).__name__, exc)
                    d = self.drift
                    self.drift = Drift(d.window_h, d.threshold, d.min_readings)
        self.drift.use(holder.version)  # another model than the saved figure's: a fresh window

    def score(self, rows: list[tuple], meters: dict) -> tuple[str, list[tuple | None], Callable[[], None]]:
        """The buffer's ingest scorer: for rows starting (ts, meter id, value), the model version,
        ``(expected kWh, score, flag)`` or None per row, and an undo that forgets what this call
        learned (the buffer calls it when its transaction rolls back)."""
        scored: list[tuple | None] = [None] * len(rows)
        undo_state: list = []
        version, parts = self._run(rows, meters, undo_state)
        if parts is not None:
            idx, _keys, _ts, _values, exp_kwh, scores, flags = parts
            for i, e, sc, f in zip(idx, exp_kwh, scores, flags):
                scored[i] = (e, sc, f)

        def undo() -> None:
            if undo_state:
                snap, last, learned, counts, drift = undo_state
                self.stats.restore(snap)
                self.drift.restore(drift)
                for k, t in last.items():
                    if t is None:
                        self.last_ts.pop(k, None)
                    else:
                        self.last_ts[k] = t
                self._learned_keys = learned
                self.scored, self.flagged = counts

        return version, scored, undo

    def score_rows(self, rows: list[tuple], meters: dict) -> tuple[str, list[list | None]]:
        """(version of the model used, ``[meter key, ts, value, expected, score, flag]`` or None per
        row). One model per call."""
        out: list[list | None] = [None] * len(rows)
        version, parts = self._run(rows, meters, None)
        if parts is not None:
            for i, k, t, v, e, sc, f in zip(*parts):
                out[i] = [k, t, v, e, sc, f]
        return version, out

    def _run(self, rows: list[tuple], meters: dict, undo_state: list | None):
        self.holder.maybe_reload()
        model = self.holder.current
        n = len(rows)
        if n == 0:
            return model.version, None
        mids = np.fromiter((r[1] for r in rows), dtype=np.int64, count=n)
        self._cache(mids, meters)
        bidx = self._bidx[mids]
        known = bidx >= 0
        if not known.all():
            for m in mids[~known].tolist():
                self.unscored[f"building {meters[m].building}: no metadata"] += 1
        idx = np.flatnonzero(known)
        if len(idx) == 0:
            return model.version, None
        m = mids[idx]
        ts = np.fromiter((rows[i][0] for i in idx.tolist()), dtype=np.int64, count=len(idx))
        values = np.fromiter((rows[i][2] for i in idx.tolist()), dtype=np.float64, count=len(idx))
        keys = [self._keys[j] for j in m.tolist()]
        weather = self._weather(self._site[m], ts)
        X = featurize(self.buildings, bidx[idx], self._code[m], ts, weather)
        pred = model.predict_log(X)
        with np.errstate(over="ignore", invalid="ignore"):
            actual = np.log1p(values)
        if undo_state is not None:
            undo_state.extend([self.stats.snapshot(keys), {k: self.last_ts.get(k) for k in keys},
                               set(self._learned_keys), (self.scored, self.flagged), self.drift.snapshot()])
        learn = self._learn_mask(keys, ts)
        if learn.all():  # the model alone; a reading learned before was counted then
            self.drift.update(model.version, self._group[m], ts, pred, actual)
        else:
            self.drift.update(model.version, self._group[m][learn], ts[learn], pred[learn], actual[learn])
        expected, score = self.stats.update(keys, pred, actual, learn=learn)
        flags = self.stats.flag(score)
        with np.errstate(over="ignore", invalid="ignore"):
            exp = np.expm1(expected)
        ok = np.isfinite(exp)  # a reading of ~1e305 overflows its expectation: stored unscored
        if not ok.all():
            self.unscored["expected value out of range"] += int((~ok).sum())
            keep = np.flatnonzero(ok)
            idx, ts, values, exp, score, flags = idx[keep], ts[keep], values[keep], exp[keep], score[keep], flags[keep]
            keys = [keys[j] for j in keep.tolist()]
        with np.errstate(over="ignore", invalid="ignore"):  # rounding multiplies: keep huge values as they are
            exp_kwh = np.where(np.abs(exp) < 1e12, np.round(exp, 4), exp).tolist()
        finite = np.isfinite(score)
        scores = np.round(np.where(finite, score, 0.0), 3).tolist()
        if not finite.all():
            scores = [v if good else None for v, good in zip(scores, finite.tolist())]
        self.scored += len(idx)
        self.flagged += int(flags.sum())
        return model.version, (idx.tolist(), keys, ts.tolist(), values.tolist(), exp_kwh, scores,
                               flags.astype(np.int64).tolist())

    def _cache(self, mids: np.ndarray, meters: dict) -> None:
        """Per buffer meter id: building index (-1 = no metadata), meter code, site, key."""
        top = int(mids.max()) + 1
        if top > len(self._bidx):
            size = max(top, 2 * len(self._bidx), 1024)
            for name, fill in (("_bidx", -2), ("_code", 0), ("_site", -1), ("_group", 0)):
                old = getattr(self, name)
                new = np.full(size, fill, dtype=np.int64)
                new[: len(old)] = old
                setattr(self, name, new)
            self._keys.extend([""] * (size - len(self._keys)))
        fresh = mids[self._bidx[mids] == -2]
        for mid in np.unique(fresh).tolist():
            info = meters[mid]
            b = self.buildings.ids([info.building])
            ok = bool(self.buildings.is_known(b)[0])
            self._bidx[mid] = int(b[0]) if ok else -1
            self._code[mid] = METER_CODE[info.meter]
            self._site[mid] = int(self.buildings.site[b[0]]) if ok else -1
            self._keys[mid] = info.key
            self._group[mid] = self.drift.group(info.site, info.meter)

    def _learn_mask(self, keys: list[str], ts: np.ndarray) -> np.ndarray:
        last = self.last_ts
        learned = self._learned_keys
        learn = np.empty(len(keys), dtype=bool)
        for j, (k, t) in enumerate(zip(keys, ts.tolist())):
            prev = last.get(k)
            if prev is None or t > prev:
                learn[j] = True
                last[k] = t
                learned.add(k)
            else:
                learn[j] = False
        return learn

    def _weather(self, sites: np.ndarray, ts: np.ndarray) -> dict[str, np.ndarray]:
        if self.weather is None:
            return {name: np.full(len(ts), np.nan) for name in WEATHER_FIELDS}
        return self.weather.lookup(sites.astype(str), ts, max_age_ms=self.weather_max_age_ms)

    def save_due(self) -> bool:
        return self.clock() - self._last_save >= self.save_every_s

    def save(self, db: sqlite3.Connection | None = None) -> None:
        """Write what changed of the per-meter statistics and what each meter has learned up to.

        With ``db`` (the buffer's connection, inside its transaction) the caller commits and then
        calls :meth:`saved`; without it, this scorer's own connection commits at once."""
        if db is None:
            if self._db is None:
                return
            from gateway.db import atomic

            with atomic(self._db):
                self._write(self._db)
            self.saved()
            return
        self._write(db)

    def _write(self, db: sqlite3.Connection) -> None:
        self.stats.save(db)
        db.executemany("INSERT OR REPLACE INTO meter_learned VALUES(?, ?)",
                       [(k, self.last_ts[k]) for k in self._learned_keys])
        db.execute("INSERT OR REPLACE INTO scoring_status VALUES('status', ?)", (json.dumps(self.status()),))
        db.execute("INSERT OR REPLACE INTO scoring_status VALUES('drift', ?)", (json.dumps(self.drift.state()),))

    def saved(self) -> None:
        """What :meth:`save` wrote has committed."""
        self.stats.clean()
        self._learned_keys = set()
        self._last_save = self.clock()

    def close(self) -> None:
        if self._db is not None:
            if self.stats.dirty or self._learned_keys:
                self.save()
            self._db.close()
            self._db = None

    def status(self) -> dict:
        return {
            "model": self.holder.status(),
            "scored": self.scored,
            "flagged": self.flagged,
            "unscored": sum(self.unscored.values()),
            "unscored_reasons": dict(self.unscored.most_common(10)),
            "meters_learned": len(self.stats),
            "drift": self.drift.report(),
        }


def stored_status(conn: sqlite3.Connection) -> dict | None:
    """The scoring status a running (or stopped) gateway last saved beside its buffer, or None."""
    try:
        row = conn.execute("SELECT value FROM scoring_status WHERE key = 'status'").fetchone()
    except sqlite3.Error:
        return None
    return json.loads(row[0]) if row else None
