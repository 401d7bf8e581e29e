"""How good each training recipe is on buildings it never saw, against the aims the project set.

``gateway model quality --data CSV`` (or ``--from`` the analytics store) holds out buildings and
the last days exactly as ``gateway cycle`` judges a challenger (:func:`gateway.model.champion.split`:
a quarter of the buildings, never trained on, scored on their last ``holdout_days``; their earlier
readings only warm up the per-meter online learning, as a gateway would have). It trains each
recipe on the remaining buildings' earlier readings and prints the four figures for it:

- RMSLE of the model alone, on all readings, zeros included;
- RMSLE after the per-meter online learning;
- AUC of the anomaly score on injected spikes and dropouts;
- F1 of the anomaly flag at the default threshold;

with the aim of each (:data:`AIMS`) and whether it is met. The recipes (:data:`RECIPES`):

- ``working``: one regression, known-bad zero stretches left out of training, so the model
  predicts what a working meter uses (``gateway model train --no-zero-state``);
- ``all-readings``: one regression on every reading, the plain LightGBM
  (``--no-zero-state --keep-bad-zeros``);
- ``zero-state``, the default and the shipped one: a level regression on the non-zero readings and
  a classifier of zeros, one graph (:mod:`gateway.model.zero_state`).

``--into MODEL_DIR`` records the result in that folder's ``manifest.json`` (key ``quality``; the
model itself and its checksum are untouched) and regenerates its ``CARD.md``. Cross-validation by
building over the whole period (each meter's online learning starting cold) is the other view;
``gateway model train`` prints it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from gateway.errors import ModelError

log = logging.getLogger(__name__)

#: figure → (better, aim): the model-quality aims of issue 11.
AIMS: dict[str, tuple[str, float]] = {
    "rmsle_model": ("<=", 1.50),
    "rmsle_online": ("<=", 0.78),
    "anomaly_auc": (">=", 0.985),
    "anomaly_f1": (">=", 0.65),
}
#: recipe → how it trains, as ``gateway model train`` would: ``clean`` (the known-bad zeros are
#: left out of a plain regression and of the square-feet fill) and the zero-state model.
RECIPES: dict[str, dict[str, bool]] = {
    "working": {"clean": True, "zero_state": False},
    "all-readings": {"clean": False, "zero_state": False},
    "zero-state": {"clean": True, "zero_state": True},
}


def measure(table, X: np.ndarray, ly: np.ndarray, recipes=tuple(RECIPES), *, holdout_buildings: float = 0.25,
            holdout_days: float = 30.0, seed: int = 0, rounds: int | None = None, threads: int = 0,
            thresholds=()) -> dict:
    """Train each recipe on the holdout's training rows and judge it on the held-out ones (the
    flag also at each of ``thresholds``)."""
    from gateway.model import champion as ch
    from gateway.model.train import DEFAULT_PARAMS, DEFAULT_ROUNDS, fit_predictor, fit_rows, known_bad_zeros, predict_log

    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise ModelError(f"unknown recipe {', '.join(unknown)} (known: {', '.join(RECIPES)})")
    holdout = ch.split(table, holdout_buildings, holdout_days, seed)
    rows, scored = ch.holdout_rows(table, holdout)
    bad = known_bad_zeros(table)
    none = np.zeros(len(ly), dtype=bool)
    out = {"holdout": holdout.describe(table), "aims": {k: list(v) for k, v in AIMS.items()}, "recipes": {}}
    for name in recipes:
        recipe = RECIPES[name]
        train_rows, fill = fit_rows(X, holdout.train, bad if recipe["clean"] else none, recipe["zero_state"])
        booster, classifier = fit_predictor(X, ly, train_rows, fill, DEFAULT_PARAMS, rounds or DEFAULT_ROUNDS,
                                            threads, recipe["zero_state"])
        pred = predict_log(booster, classifier, X[rows], fill)
        out["recipes"][name] = {**ch.judge(pred, table, ly, rows, scored, thresholds=thresholds),
                                "trained_on": int(len(train_rows))}
        log.info("%s: %s", name, figures(out["recipes"][name]))
    return out


def figures(evaluation: dict) -> dict[str, float | None]:
    """The four figures of one :func:`gateway.model.champion.judge` result."""
    from gateway.model.champion import figure

    return {key: figure(evaluation, key) for key in AIMS}


def met(key: str, value: float | None) -> bool:
    better, aim = AIMS[key]
    return value is not None and (value <= aim if better == "<=" else value >= aim)


def render(result: dict) -> list[str]:
    """The lines ``gateway model quality`` prints."""
    h = result["holdout"]
    lines = [f"holdout: {h['buildings']} buildings never trained on, {h['readings']:,} readings scored from "
             f"{h['from_local']} to {h['to_local']} (local), {h['warm_up_readings']:,} earlier ones warm up "
             "the online learning"]
    head = "recipe          " + "".join(f"{k:>16}" for k in AIMS)
    lines += [head, "aim             " + "".join(f"{b + ' ' + format(a, 'g'):>16}" for b, a in AIMS.values())]
    for name, ev in result["recipes"].items():
        cells = []
        for key, value in figures(ev).items():
            text = "-" if value is None else f"{value:.3f} {'met' if met(key, value) else 'MISS'}"
            cells.append(f"{text:>16}")
        lines.append(f"{name:<16}" + "".join(cells))
    scans = {name: ev["anomaly"]["by_threshold"] for name, ev in result["recipes"].items()
             if ev["anomaly"].get("by_threshold")}
    if scans:
        thresholds = list(next(iter(scans.values())))
        lines += ["anomaly flag at other thresholds: F1 / share of real readings flagged",
                  "threshold       " + "".join(f"{t:>16}" for t in thresholds)]
        for name, scan in scans.items():
            lines.append(f"{name:<16}" + "".join(f"{scan[t]['f1']:.3f} / {scan[t]['flag_rate_clean']:.2%}".rjust(16)
                                                 for t in thresholds))
    return lines


def record(model_dir: str | Path, result: dict) -> None:
    """Put ``result`` into ``model_dir``'s manifest (key ``quality``) and regenerate its card."""
    from gateway.model.card import write_card

    path = Path(model_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read: {exc}") from exc
    manifest["quality"] = result
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    write_card(model_dir)


def _command():
    import click

    @click.command("quality")
    @click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False),
                  help="An ASHRAE CSV (readings with weather and metadata columns).")
    @click.option("--from", "source", metavar="s3://BUCKET/PREFIX|DIR|CSV",
                  help="The analytics store (as gateway model train --from).")
    @click.option("--buildings", "buildings_csv", type=click.Path(exists=True, dir_okay=False), default=None,
                  help="building_metadata.csv (as gateway model train).")
    @click.option("--weather", type=click.Path(exists=True, dir_okay=False), default=None,
                  help="With --from: the weather feed's messages to join.")
    @click.option("--recipe", "recipes", multiple=True, type=click.Choice(list(RECIPES)),
                  help="Only these recipes (repeatable; default: all).")
    @click.option("--holdout-days", default=30.0, show_default=True, help="The recent days scored.")
    @click.option("--holdout-buildings", default=0.25, show_default=True, help="Share of buildings held out.")
    @click.option("--seed", default=0, show_default=True, help="Which buildings are held out; the injection.")
    @click.option("--rounds", default=None, type=int, help="LightGBM rounds (default: training's).")
    @click.option("--thresholds", default="", metavar="T1,T2,...",
                  help="Also the anomaly flag's F1 and flag rate at each of these thresholds.")
    @click.option("--into", "into", type=click.Path(exists=True, file_okay=False), default=None,
                  help="Record the result in MODEL_DIR's manifest.json and regenerate its CARD.md.")
    @click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
    def quality_command(data_path, source, buildings_csv, weather, recipes, holdout_days, holdout_buildings, seed,
                        rounds, thresholds, into, as_json):
        """Train each recipe on all but the held-out buildings and days, as gateway cycle judges a
        challenger, and print its four figures on those buildings against the project's aims."""
        from gateway.model.train import load_from, load_training_data

        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        try:
            scan = tuple(float(t) for t in thresholds.split(",") if t.strip())
        except ValueError:
            raise click.BadParameter(f"{thresholds!r} is not a comma-separated list of numbers",
                                     param_hint="--thresholds") from None
        if (data_path is None) == (source is None):
            raise click.UsageError("give one of --data (an ASHRAE CSV) or --from (the analytics store)")
        try:
            if source is not None:
                table, _, X, ly, _ = load_from(source, buildings_csv, weather)
            else:
                table, _, X, ly = load_training_data(data_path, buildings_csv)
            result = measure(table, X, ly, recipes or tuple(RECIPES), holdout_buildings=holdout_buildings,
                             holdout_days=holdout_days, seed=seed, rounds=rounds, thresholds=scan)
            if into:
                record(into, result)
        except ModelError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(json.dumps(result, indent=2) if as_json else "\n".join(render(result)))

    return quality_command


quality_command = _command()
