"""``gateway cycle``: train → compare → publish → deploy, once; the loop a schedule runs.

One cycle:

1. **read** what the fleet sent from the analytics store (:mod:`gateway.model.source`: Firehose
   objects on S3 or in an emulation root, or an IoT Analytics dataset CSV);
2. **hold out** a share of the buildings and the last days (:func:`gateway.model.champion.split`)
   and **train** the challenger on the rest (:func:`gateway.model.train.fit_and_write`), its
   lineage naming the champion as parent;
3. **compare** it with the champion, the model in service (the one the local nucleus runs, the
   last one this work folder promoted, ``--champion``, or the shipped model), on the holdout;
4. **promote** only when it is better by ``cycle.margin``: publish it as the next
   ``org.metergateway.Model`` version and deploy it (:mod:`gateway.model.publish`); otherwise the
   challenger stays recorded in the work folder and nothing ships.

Every cycle appends one JSON line to ``<workdir>/cycles.jsonl`` (what was compared, the figures,
the decision and why), and the challenger's manifest and card carry the same evaluation. A lock
(``<workdir>/cycle.lock``) keeps two scheduled runs from overlapping. ``<workdir>/champion.json``
remembers the last promoted folder for the next cycle when there is no nucleus to ask.

The ``cycle:`` settings (a YAML file with a top-level ``cycle:`` mapping; each also an option):

=========================  =============  ====================================================
key                        default        meaning
=========================  =============  ====================================================
``metric``                 ``rmsle_model``  the figure the challenger must improve:
                                          ``rmsle_model``, ``rmsle_online``, ``anomaly_auc``,
                                          ``anomaly_f1``
``margin``                 ``0.02``       by at least this much, relative (2 % lower RMSLE; for
                                          AUC and F1, 2 % of the way to 1)
``tolerance``              ``0.05``       no other figure may get worse by more than this
``holdout_buildings``      ``0.25``       share of the buildings held out (at least one)
``holdout_days``           ``30``         the recent days scored (the held-out buildings' earlier
                                          readings only warm up the online learning)
``min_holdout_readings``   ``100``        fewer scored readings than this: no decision, nothing ships
``rounds``                 ``200``        LightGBM rounds of the challenger
``anomaly_rate``           ``0.02``       share of holdout readings turned into spikes/dropouts
``seed``                   ``0``          the holdout's building choice and the injected anomalies
``zero_state``             ``true``       train the challenger as a zero-state model
                                          (:mod:`gateway.model.zero_state`)
=========================  =============  ====================================================
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from gateway.errors import ConfigError, ConfigErrors, GatewayError, ModelError

log = logging.getLogger(__name__)


class CycleError(GatewayError):
    """A cycle could not run (its lock, its data, its champion); says what and where."""


@dataclass(frozen=True)
class CycleConfig:
    metric: str = "rmsle_model"
    margin: float = 0.02
    tolerance: float = 0.05
    holdout_buildings: float = 0.25
    holdout_days: float = 30.0
    min_holdout_readings: int = 100
    rounds: int = 200
    anomaly_rate: float = 0.02
    seed: int = 0
    zero_state: bool = True

    @classmethod
    def from_dict(cls, raw, where: str = "cycle") -> CycleConfig:
        """Validate a ``cycle:`` mapping; ConfigError names each bad key as ``cycle.<key>``."""
        from gateway.model.champion import METRICS

        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ConfigError(where, f"must be a mapping, got {type(raw).__name__}")
        known = {f.name: f for f in fields(cls)}
        problems, values = [], {}
        for key, value in raw.items():
            if key not in known:
                problems.append(ConfigError(f"{where}.{key}", f"unknown key (known: {', '.join(known)})"))
                continue
            kind = known[key].type
            want = {"int": int, "float": float, "bool": bool}.get(kind, str) if isinstance(kind, str) else kind
            if want in (str, bool):
                ok = isinstance(value, want)
            else:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (want is float or
                                                                                         float(value).is_integer())
            if not ok:
                kind = {float: "a number", bool: "true or false"}.get(want, want.__name__)
                problems.append(ConfigError(f"{where}.{key}", f"{value!r} is not {kind}"))
                continue
            values[key] = want(value)
        if "metric" in values and values["metric"] not in METRICS:
            problems.append(ConfigError(f"{where}.metric", f"{values['metric']!r} is not one of {', '.join(METRICS)}"))
        for key, lo, hi in (("margin", -1.0, 1.0), ("tolerance", 0.0, 10.0), ("holdout_buildings", 0.0, 1.0),
                            ("holdout_days", 0.0, 3660.0), ("anomaly_rate", 0.0, 0.5)):
            if key in values and not lo <= values[key] <= hi:
                problems.append(ConfigError(f"{where}.{key}", f"{values[key]} is out of range {lo:g}..{hi:g}"))
        for key in ("min_holdout_readings", "rounds"):
            if key in values and values[key] < 1:
                problems.append(ConfigError(f"{where}.{key}", f"{values[key]} must be at least 1"))
        if problems:
            raise ConfigErrors(problems)
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> CycleConfig:
        """From a YAML file with a top-level ``cycle:`` mapping."""
        import yaml

        try:
            doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(str(path), str(exc)) from exc
        if not isinstance(doc, dict) or "cycle" not in doc:
            raise ConfigError(str(path), "needs a top-level cycle: mapping")
        return cls.from_dict(doc["cycle"])


@dataclass
class CycleResult:
    promoted: bool
    champion: str | None  # version in service before the cycle
    challenger: str | None  # version trained (None when training or evaluation failed)
    reason: str
    challenger_dir: Path | None = None
    component_version: str | None = None
    deployment: str | None = None
    steps: list[str] = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)

    def line(self) -> str:
        """The one summary line ``gateway cycle`` prints."""
        figs = ""
        ev = self.evaluation
        if ev.get("challenger"):
            parts = []
            for key in ("rmsle_model", "rmsle_online"):
                old = ev.get("champion", {}).get(key, {}).get("overall")
                new = ev["challenger"][key]["overall"]
                parts.append(f"{key}={old:.3f}->{new:.3f}" if old is not None else f"{key}={new:.3f}")
            for key in ("auc", "f1"):
                old = (ev.get("champion", {}).get("anomaly") or {}).get(key)
                new = ev["challenger"]["anomaly"][key]
                fmt = (lambda v: "-" if v is None else f"{v:.3f}")
                parts.append(f"anomaly_{key}={fmt(old)}->{fmt(new)}" if ev.get("champion") else f"anomaly_{key}={fmt(new)}")
            figs = " " + " ".join(parts)
        if self.promoted:
            ship = f" component={self.component_version}" if self.component_version else ""
            return f"cycle: promoted={self.champion or 'none'}->{self.challenger}{ship}{figs} ({self.reason})"
        return f"cycle: kept={self.champion or 'none'} challenger={self.challenger or 'none'} not shipped{figs} ({self.reason})"


class _Lock:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> _Lock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "a+")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self.f.close()
            raise CycleError(f"{self.path}: another gateway cycle is running on this work folder") from exc
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder / 'manifest.json'}: cannot read: {exc}") from exc


def find_champion(workdir: Path, champion_dir: str | Path | None, root: str | Path | None) -> Path | None:
    """The model in service: ``champion_dir``; else the nucleus's; else this work folder's last
    promoted one; else the shipped model."""
    if champion_dir is not None:
        return Path(champion_dir)
    if root is not None:
        from gateway.model.publish import deployed_model_dir

        found = deployed_model_dir(root)
        if found is not None:
            return found
    state = workdir / "champion.json"
    if state.is_file():
        path = Path(json.loads(state.read_text())["path"])
        if path.is_dir():
            return path
    from gateway.model.paths import default_model

    return default_model()


def run(source, workdir: str | Path, *, config: CycleConfig = CycleConfig(), champion_dir=None,
        root: str | Path | None = None, buildings_csv=None, weather=None, aws: bool = False,
        version: str | None = None, run_aws: bool = False, requirements: list[str] | None = None,
        wait_s: float = 600) -> CycleResult:
    """One cycle (see the module docstring). ``root``: deploy to that local nucleus; ``aws``: make
    the AWS steps (``run_aws`` runs them); neither: promote in the work folder only."""
    workdir = Path(workdir)
    if aws and root is None and version is None:
        raise CycleError("--aws needs --version: the component version a promoted model is published as")
    with _Lock(workdir / "cycle.lock"):
        return _cycle(source, workdir, config, champion_dir, root, buildings_csv, weather, aws, version, run_aws,
                      requirements, wait_s)


def on_dataset(iotanalytics, dataset: str, workdir: str | Path, **kwargs) -> Callable[[], None]:
    """Run a cycle on each new content of an IoT Analytics ``dataset`` (its CSV is the training
    source), as the seed's notebook ran on its dataset: ``iotanalytics`` is anything with
    ``add_content_listener(fn(name, csv_path))`` (the emulation's :class:`LocalIoTAnalytics`).
    Each cycle runs in a thread of its own, one at a time (the cycle's lock); its result is
    appended to ``<workdir>/cycles.jsonl`` as any cycle's. Returns the function that stops it."""
    import threading

    def listener(name: str, csv_path) -> None:
        if name != dataset:
            return

        def go() -> None:
            try:
                result = run(csv_path, workdir, **kwargs)
                log.warning("cycle on dataset %s: %s", name, result.line())
            except Exception:
                log.exception("cycle on dataset %s failed", name)

        threading.Thread(target=go, name=f"cycle {name}", daemon=True).start()

    return iotanalytics.add_content_listener(listener)


def _cycle(source, workdir, config, champion_dir, root, buildings_csv, weather, aws, version, run_aws,
           requirements, wait_s) -> CycleResult:
    from gateway.model import champion as ch
    from gateway.model.card import write_card
    from gateway.model.train import fit_and_write, load_from

    started = dt.datetime.now(dt.UTC)
    champ_dir = find_champion(workdir, champion_dir, root)
    champ_manifest = _manifest(champ_dir) if champ_dir is not None else None
    champ_version = champ_manifest["version"] if champ_manifest else None
    name = (champ_manifest or {}).get("name") or "ashrae-lgbm"

    table, _, X, ly, data = load_from(source, buildings_csv, weather)
    holdout = ch.split(table, config.holdout_buildings, config.holdout_days, config.seed)
    held = holdout.describe(table)
    log.info("holdout: %d buildings, %d readings scored, %d to train on", held["buildings"], held["readings"],
             held["train_readings"])
    record = {"started": started.isoformat(), "source": str(source), "config": asdict(config),
              "champion": {"version": champ_version, "path": str(champ_dir) if champ_dir else None},
              "holdout": held}
    if held["readings"] < config.min_holdout_readings:
        result = CycleResult(False, champ_version, None, f"{held['readings']} holdout readings, fewer than "
                             f"cycle.min_holdout_readings {config.min_holdout_readings}: no decision")
        return _record(workdir, record, result)

    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    out = workdir / "models" / f"{name}-{stamp}"
    train_rows = holdout.train
    manifest = fit_and_write(table.take(train_rows), X[train_rows], ly[train_rows], out, name=name,
                             training_data={**data, "holdout": {k: held[k] for k in ("buildings", "building_ids",
                                                                                     "readings", "cutoff_utc_ms")}},
                             rounds=config.rounds, evaluate=False, parent=champ_version, trained_by="gateway cycle",
                             zero_state=config.zero_state)
    new_version = manifest["version"]
    evaluation = {"holdout": held, "metric": config.metric, "margin": config.margin, "tolerance": config.tolerance}
    try:
        evaluation["challenger"] = ch.evaluate(out, table, X, ly, holdout, config.anomaly_rate, config.seed)
    except ModelError as exc:
        promote, reason = False, f"challenger fails verification: {exc}"
    else:
        champ_eval = None
        if champ_dir is not None:
            try:
                champ_eval = evaluation["champion"] = ch.evaluate(champ_dir, table, X, ly, holdout,
                                                                  config.anomaly_rate, config.seed)
            except ModelError as exc:
                log.warning("champion %s cannot be evaluated (%s): judged as no champion", champ_dir, exc)
                evaluation["champion_error"] = str(exc)
        promote, reason = ch.decide(champ_eval, evaluation["challenger"], config.metric, config.margin,
                                    config.tolerance)
    evaluation["decision"] = "promoted" if promote else "not promoted"
    evaluation["reason"] = reason
    manifest["evaluation"] = evaluation
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    write_card(out)
    result = CycleResult(promote, champ_version, new_version, reason, challenger_dir=out, evaluation=evaluation)
    if promote:
        _ship(result, workdir, root, aws, version, run_aws, requirements, wait_s)
    return _record(workdir, record, result)


def _ship(result: CycleResult, workdir: Path, root, aws: bool, version, run_aws: bool, requirements, wait_s) -> None:
    from gateway.model.publish import publish

    if root is not None or aws:
        p = publish(result.challenger_dir, workdir=workdir / "publish", root=root, version=version, run=run_aws,
                    requirements=requirements, wait_s=wait_s)
        result.component_version, result.deployment, result.steps = p.version, p.deployment, p.steps
    (workdir / "champion.json").write_text(json.dumps({
        "path": str(result.challenger_dir.resolve()), "version": result.challenger,
        "component_version": result.component_version}, indent=2) + "\n")


def _record(workdir: Path, record: dict, result: CycleResult) -> CycleResult:
    record.update({"finished": dt.datetime.now(dt.UTC).isoformat(), "promoted": result.promoted,
                   "challenger": {"version": result.challenger,
                                  "path": str(result.challenger_dir) if result.challenger_dir else None},
                   "reason": result.reason, "component_version": result.component_version,
                   "deployment": result.deployment, "evaluation": result.evaluation})
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "cycles.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
    return result
