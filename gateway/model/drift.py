"""Drift: how well the model alone still fits what the meters read, per site and meter type.

The per-meter online correction (:mod:`gateway.model.online`) hides a model that no longer
fits: it learns any steady offset within a few readings. Drift therefore measures the **model
alone**, the ONNX prediction clipped at 0 in log1p space, never the corrected expectation:

    error = log1p(reading) − max(log1p_prediction, 0)

and the figure is the RMSLE of those errors over a rolling window of data time (the readings'
own timestamps, not the wall clock), the same metric as the model card's ``rmsle_model`` (see
:func:`gateway.model.evaluate.rmsle`), so the two can be compared directly.

**The window** is ``window_h`` hours cut into :data:`BINS` equal steps. Each site and meter type
holds one running sum of squared errors and one count per step (a ring of steps); its figure
covers the last :data:`BINS` steps up to the step of its newest reading, so between
``window_h × (BINS − 1) / BINS`` and ``window_h`` hours of data. Each site and meter type follows
its own newest reading, so a backlog replayed late is judged in its own time and a group whose
meters fell silent keeps its last figure (its ``until_ts`` says how old). A reading older than
its group's window is not counted. The fleet-wide figure pools every group's window.

Per batch the work is a few numpy operations over the batch plus one ``bincount`` over the
groups' steps (sites × 4 meter types × 24): no Python per reading.

**Staleness.** A site and meter type whose figure is above ``threshold``, with at least
``min_readings`` readings behind it, is stale, and so is the fleet figure by the same rule; the
report says ``stale: true`` and lists those keys (``"15/electricity"``, ``"fleet"``).

**Model versions.** The figure belongs to one model version: when a reading is scored by a new
version (a hot swap, or a restart with another model), the window starts empty, and the old
version's last report is kept under ``previous`` so a dashboard can show before and after.

The state is a few kilobytes (:meth:`Drift.state`); the scorer saves it beside the meter
statistics, in the same transaction, so it survives a restart.
"""

from __future__ import annotations

import math

import numpy as np

from gateway.errors import ModelError

#: Steps of the rolling window.
BINS = 24
#: Saved state format (:meth:`Drift.state`).
FORMAT = 1
_EMPTY = np.iinfo(np.int64).min // 2  # a step id older than any real one


class Drift:
    """Rolling RMSLE of the model alone per site and meter type, for the model version in use."""

    def __init__(self, window_h: float = 24.0, threshold: float = 2.5, min_readings: int = 24):
        if not window_h > 0:
            raise ModelError(f"drift window_h: {window_h} must be > 0")
        self.window_h = float(window_h)
        self.step_ms = max(1, int(round(self.window_h * 3_600_000 / BINS)))
        self.threshold = float(threshold)
        self.min_readings = int(min_readings)
        self.version: str | None = None
        self.previous: dict | None = None
        self._index: dict[tuple[str, str], int] = {}
        self._groups: list[tuple[str, str]] = []
        self._newest = np.full(0, _EMPTY, dtype=np.int64)  # newest step id per group
        self._step = np.full((0, BINS), _EMPTY, dtype=np.int64)  # step id held by each slot
        self._sse = np.zeros((0, BINS))  # sum of squared errors per slot
        self._n = np.zeros((0, BINS), dtype=np.int64)  # readings per slot

    def __len__(self) -> int:
        return len(self._groups)

    def group(self, site: str, meter: str) -> int:
        """The index of a site and meter type (created on first use)."""
        key = (str(site), str(meter))
        g = self._index.get(key)
        if g is None:
            g = self._index[key] = len(self._groups)
            self._groups.append(key)
            if g >= len(self._newest):
                self._grow(max(g + 1, 2 * len(self._newest), 16))
        return g

    def _grow(self, cap: int) -> None:
        have = len(self._newest)
        newest = np.full(cap, _EMPTY, dtype=np.int64)
        step = np.full((cap, BINS), _EMPTY, dtype=np.int64)
        sse, n = np.zeros((cap, BINS)), np.zeros((cap, BINS), dtype=np.int64)
        newest[:have], step[:have], sse[:have], n[:have] = self._newest, self._step, self._sse, self._n
        self._newest, self._step, self._sse, self._n = newest, step, sse, n

    def use(self, version: str) -> None:
        """Readings from now on are scored by ``version``: a new one starts an empty window and
        keeps the old version's last report as :attr:`previous`."""
        if version == self.version:
            return
        if self.version is not None:
            last = self.report(with_previous=False)
            if last["fleet"]["count"]:
                self.previous = last
        self.version = version
        self._newest.fill(_EMPTY)
        self._step.fill(_EMPTY)
        self._sse.fill(0.0)
        self._n.fill(0)

    def update(self, version: str, groups: np.ndarray, ts: np.ndarray, log_pred: np.ndarray,
               log_actual: np.ndarray) -> None:
        """Count a batch scored by ``version``: per reading its group (:meth:`group`), its data
        time (epoch ms), the model's log1p prediction and log1p of the reading."""
        self.use(version)
        with np.errstate(over="ignore", invalid="ignore"):
            se = (np.asarray(log_actual, dtype=np.float64) - np.maximum(log_pred, 0.0)) ** 2
        g = np.asarray(groups, dtype=np.int64)
        step = np.asarray(ts, dtype=np.int64) // self.step_ms
        ok = np.isfinite(se)
        if not ok.all():
            g, step, se = g[ok], step[ok], se[ok]
        if len(g) == 0:
            return
        np.maximum.at(self._newest, g, step)
        keep = step > self._newest[g] - BINS  # inside its group's window
        if not keep.all():
            g, step, se = g[keep], step[keep], se[keep]
        # Within a window a slot holds one step: a slot still holding an older step starts afresh.
        slot = g * BINS + step % BINS
        held = self._step.reshape(-1)
        old = held[slot] < step
        if old.any():
            s = slot[old]
            held[s] = step[old]
            self._sse.reshape(-1)[s] = 0.0
            self._n.reshape(-1)[s] = 0
        size = self._n.size
        self._sse.reshape(-1)[:] += np.bincount(slot, weights=se, minlength=size)
        self._n.reshape(-1)[:] += np.bincount(slot, minlength=size)

    # -- undo (a put that rolls back) --------------------------------------------------------

    def snapshot(self) -> tuple:
        """Everything :meth:`update` may change, for :meth:`restore`."""
        return (self.version, self.previous, self._newest.copy(), self._step.copy(), self._sse.copy(),
                self._n.copy())

    def restore(self, snap: tuple) -> None:
        """Forget what was counted since :meth:`snapshot`."""
        self.version, self.previous, newest, step, sse, n = snap
        k = len(newest)
        self._newest[:k], self._step[:k], self._sse[:k], self._n[:k] = newest, step, sse, n
        self._newest[k:], self._step[k:], self._sse[k:], self._n[k:] = _EMPTY, _EMPTY, 0.0, 0

    # -- the figure ----------------------------------------------------------------------------

    def _window(self) -> tuple[np.ndarray, np.ndarray]:
        k = len(self._groups)
        inside = self._step[:k] > self._newest[:k, None] - BINS
        sse = np.where(inside, self._sse[:k], 0.0).sum(axis=1)
        n = np.where(inside, self._n[:k], 0).sum(axis=1)
        return sse, n

    def report(self, with_previous: bool = True) -> dict:
        """The figure: per site and meter type and fleet-wide, RMSLE and the readings behind it;
        what is stale; and the previous version's last report."""
        sse, n = self._window()
        groups: dict[str, dict] = {}
        stale: list[str] = []
        for g in sorted(np.flatnonzero(n).tolist(), key=self._groups.__getitem__):
            site, meter = self._groups[g]
            key = f"{site}/{meter}"
            rmsle = math.sqrt(sse[g] / n[g])
            groups[key] = {"rmsle": round(rmsle, 4), "count": int(n[g]),
                           "until_ts": int((self._newest[g] + 1) * self.step_ms)}
            if self._passed(rmsle, int(n[g])):
                stale.append(key)
        total = int(n.sum())
        fleet_rmsle = math.sqrt(float(sse.sum()) / total) if total else None
        if fleet_rmsle is not None and self._passed(fleet_rmsle, total):
            stale.append("fleet")
        out = {
            "version": self.version,
            "metric": "rmsle of the model alone",
            "window_h": self.window_h,
            "threshold": self.threshold,
            "min_readings": self.min_readings,
            "stale": bool(stale),
            "stale_keys": stale,
            "fleet": {"rmsle": None if fleet_rmsle is None else round(fleet_rmsle, 4), "count": total},
            "groups": groups,
        }
        if with_previous:
            out["previous"] = self.previous
        return out

    def _passed(self, rmsle: float, count: int) -> bool:
        return count >= self.min_readings and rmsle > self.threshold

    # -- persistence ---------------------------------------------------------------------------

    def state(self) -> dict:
        """The state as JSON-able data: the groups that hold readings, and the previous report."""
        keep = np.flatnonzero(self._n[: len(self._groups)].sum(axis=1)).tolist()
        return {
            "format": FORMAT, "window_h": self.window_h, "bins": BINS, "version": self.version,
            "previous": self.previous,
            "groups": [list(self._groups[g]) for g in keep],
            "newest": self._newest[keep].tolist(),
            "steps": self._step[keep].tolist(),
            "sse": self._sse[keep].tolist(),
            "n": self._n[keep].tolist(),
        }

    def load(self, state: dict) -> None:
        """Resume from :meth:`state`. The steps of a state saved with another window do not fit
        this one: the window starts empty, and the saved version's last report becomes
        :attr:`previous`."""
        if state.get("format") != FORMAT:
            raise ModelError(f"drift state: format {state.get('format')!r} is not {FORMAT}")
        self.previous = state.get("previous")
        if state.get("window_h") != self.window_h or state.get("bins") != BINS:
            if state.get("bins") == BINS and state.get("window_h"):
                old = Drift(state["window_h"], self.threshold, self.min_readings)
                old.load(state)
                last = old.report(with_previous=False)
                if last["fleet"]["count"]:
                    self.previous = last
            self.version = None
            return
        self.version = state.get("version")
        for (site, meter), newest, steps, sse, n in zip(state["groups"], state["newest"], state["steps"],
                                                        state["sse"], state["n"]):
            g = self.group(site, meter)
            self._newest[g] = newest
            self._step[g] = steps
            self._sse[g] = sse
            self._n[g] = n
