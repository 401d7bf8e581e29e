"""Score a file of readings in ASHRAE's columns, learning each meter online as it goes.

Rows are scored in time order (UTC, from the site-local timestamps) in batches; each meter's
expectation and anomaly score use only its readings before. The output holds the accepted input
rows, in that order, plus ``expected_model`` (the model alone), ``expected`` (after the meter's
online correction), ``anomaly_score`` and ``anomaly`` (0/1). Rejected rows are counted by reason.
"""

from __future__ import annotations

import gzip
import sys
import time
from pathlib import Path

import numpy as np

from gateway import ashrae
from gateway.errors import ModelError
from gateway.model.features import Buildings, featurize
from gateway.model.online import MeterStats
from gateway.model.scorer import Scorer
from gateway.readings import METER_TYPES

OUTPUT_COLUMNS: tuple[str, ...] = ("expected_model", "expected", "anomaly_score", "anomaly")
BATCH = 50_000


def meter_keys(building_id: np.ndarray, meter: np.ndarray) -> np.ndarray:
    """``<building>:<meter type>`` keys, the same as :attr:`gateway.readings.Reading.meter_id`."""
    names = np.array(METER_TYPES)[meter]
    return np.char.add(np.char.add(building_id.astype(str), ":"), names)


def _open_out(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "wt", encoding="utf-8", newline="", compresslevel=1)
    return open(path, "w", encoding="utf-8", newline="")


def score_file(
    input_path: str | Path,
    output_path: str | Path,
    model_dir: str | Path,
    buildings_csv: str | Path,
    progress: bool = True,
    stats: MeterStats | None = None,
    threshold: float | None = None,
) -> dict:
    """Score ``input_path`` (CSV or CSV.GZ) into ``output_path``; returns counts and rejection reasons.

    ``stats``: per-meter state to continue from (a fresh :class:`MeterStats` by default; it is
    updated in place). ``threshold`` overrides its anomaly threshold.
    Returns ``{"rows", "scored", "rejected", "anomalies", "rejected_reasons": {reason kind: n},
    "rejected_rows": [(line, reason), ...first 100], "seconds", "model_version"}``.
    """
    t0 = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    scorer = Scorer(model_dir)
    buildings = Buildings.from_csv(buildings_csv)
    stats = stats or MeterStats()
    if threshold is not None:
        stats.threshold = threshold

    bar = _Progress(progress)
    with bar:
        reading = bar.task("reading", None)
        table = ashrae.read(input_path, progress=lambda n: bar.update(reading, n))
        bar.update(reading, len(table) + len(table.rejected), done=True)
        rejected = list(table.rejected)

        known = buildings.is_known(table.building_id)
        site_ok = np.zeros(len(table), dtype=bool)
        site_ok[known] = buildings.site[table.building_id[known]] == table.site_id[known]
        for i in np.flatnonzero(~(known & site_ok)).tolist():
            b = int(table.building_id[i])
            reason = (
                f"unknown building: {b} is not in {Path(buildings_csv).name}"
                if not known[i]
                else f"site_id: {int(table.site_id[i])} but building {b} is on site {int(buildings.site[b])}"
            )
            rejected.append((int(table.line_no[i]), reason))
        rejected.sort()
        good = np.flatnonzero(known & site_ok)
        good = good[np.argsort(table.ts_ms[good], kind="stable")]  # time order
        table = table.take(good)

        n = len(table)
        keys = meter_keys(table.building_id, table.meter)
        anomalies = 0
        scoring = bar.task("scoring", n)
        try:
            out = _open_out(output_path)
        except OSError as exc:
            raise ModelError(f"{output_path}: {exc}") from exc
        with out:
            out.write(",".join([*table.header, *OUTPUT_COLUMNS]) + "\n")
            for lo in range(0, n, BATCH):
                hi = min(lo + BATCH, n)
                X = featurize(
                    buildings, table.building_id[lo:hi], table.meter[lo:hi], table.ts_ms[lo:hi],
                    {k: v[lo:hi] for k, v in table.weather.items()},
                )  # fmt: skip
                log_pred = scorer.predict_log(X)
                log_expected, score = stats.update(keys[lo:hi], log_pred, np.log1p(table.meter_reading[lo:hi]))
                flag = stats.flag(score)
                anomalies += int(flag.sum())
                model_v = np.expm1(np.maximum(log_pred, 0.0))
                exp_v = np.expm1(log_expected)
                out.writelines(
                    f"{line},{a:.6g},{b:.6g},{s:.4g},{int(f)}\n"
                    for line, a, b, s, f in zip(table.lines[lo:hi], model_v.tolist(), exp_v.tolist(), score.tolist(), flag.tolist())
                )
                bar.update(scoring, hi)

    reasons: dict[str, int] = {}
    for _, reason in rejected:
        kind = reason.split(":", 1)[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    return {
        "rows": n + len(rejected),
        "scored": n,
        "rejected": len(rejected),
        "anomalies": anomalies,
        "rejected_reasons": reasons,
        "rejected_rows": rejected[:100],
        "seconds": time.perf_counter() - t0,
        "model_version": scorer.version,
    }


class _Progress:
    """A rich progress display on stderr, or nothing."""

    def __init__(self, enabled: bool):
        self._p = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=Console(file=sys.stderr), transient=False,
            )  # fmt: skip

    def __enter__(self):
        if self._p is not None:
            self._p.__enter__()
        return self

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)

    def task(self, name: str, total):
        return None if self._p is None else self._p.add_task(name, total=total)

    def update(self, task, completed: int, done: bool = False) -> None:
        if self._p is not None:
            self._p.update(task, completed=completed, total=completed if done else self._p.tasks[task].total)
