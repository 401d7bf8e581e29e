"""Champion against challenger (gateway/model/champion.py, gateway/model/cycle.py): the holdout by
building and time, the figures, and the promotion rule, on the bundled sample sent through the
emulated cloud."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from cycle_helpers import WEATHER, send_sample, weakened
from gateway.errors import ConfigErrors, ModelError
from gateway.model import champion as ch
from gateway.model.cycle import CycleConfig, run
from gateway.model.train import fit_and_write, load_from


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    root = tmp_path_factory.mktemp("cloud")
    send_sample(root)
    return root


@pytest.fixture(scope="module")
def data(emulation):
    table, _, X, ly, info = load_from(emulation, None, WEATHER)
    return table, X, ly, info


@pytest.fixture(scope="module")
def holdout(data):
    return ch.split(data[0], holdout_buildings=0.25, holdout_days=30)


#: The sample's holdout scores a few hundred readings: at the default 2 % they hold about five
#: injected anomalies, and one flag moves F1 past cycle.tolerance whatever the RMSLE gain.
FEW_ANOMALIES_CONFIG = CycleConfig(rounds=60, anomaly_rate=0.05)


def _fit(data, rows, out, **kw):
    table, X, ly, info = data
    fit_and_write(table.take(rows), X[rows], ly[rows], out, training_data=info, evaluate=False, **kw)
    return out


def test_the_holdout_is_other_buildings_and_later_days(data, holdout):
    table = data[0]
    held = set(holdout.buildings)
    assert len(held) == 2  # 25 % of the sample's 8 buildings
    assert not set(table.building_id[holdout.train].tolist()) & held
    assert set(table.building_id[holdout.test].tolist()) == held
    assert table.ts_ms[holdout.train].max() < holdout.cutoff_ms <= table.ts_ms[holdout.test].min()
    assert (table.ts_ms[holdout.warm] < holdout.cutoff_ms).all()
    assert set(table.building_id[holdout.warm].tolist()) == held
    assert len(holdout.train) + len(holdout.test) + len(holdout.warm) < len(table)  # other buildings' December unused
    again = ch.split(table, holdout_buildings=0.25, holdout_days=30)
    assert again.buildings == holdout.buildings and np.array_equal(again.test, holdout.test)


def test_a_challenger_trained_on_a_tiny_slice_is_worse_and_not_promoted(data, holdout, tmp_path):
    good = _fit(data, holdout.train, tmp_path / "good", rounds=100)
    tiny = _fit(data, holdout.train[:300], tmp_path / "tiny", rounds=100)
    table, X, ly, _ = data
    champ, chall = ch.evaluate(good, table, X, ly, holdout), ch.evaluate(tiny, table, X, ly, holdout)
    assert champ["readings"] == chall["readings"] == len(holdout.test)
    assert chall["rmsle_model"]["overall"] > champ["rmsle_model"]["overall"]
    promote, why = ch.decide(champ, chall, "rmsle_model", margin=0.02)
    assert not promote
    assert "needs at least +2.0% (cycle.margin)" in why


def test_a_broken_challenger_fails_verification(data, holdout, tmp_path):
    good = _fit(data, holdout.train, tmp_path / "good", rounds=20)
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    golden = json.loads((broken / "golden.json").read_text())
    golden["expected"] = [v + 0.5 for v in golden["expected"]]
    (broken / "golden.json").write_text(json.dumps(golden))
    table, X, ly, _ = data
    with pytest.raises(ModelError, match=r"golden vectors do not match"):
        ch.evaluate(broken, table, X, ly, holdout)


def test_better_on_the_metric_but_much_worse_elsewhere_is_not_promoted():
    def ev(model, online, auc, f1):
        return {"rmsle_model": {"overall": model}, "rmsle_online": {"overall": online},
                "anomaly": {"auc": auc, "f1": f1}}

    promote, why = ch.decide(ev(1.0, 0.8, 0.98, 0.7), ev(0.9, 0.8, 0.90, 0.7), "rmsle_model", 0.02, 0.05)
    assert not promote and "anomaly_auc" in why and "cycle.tolerance" in why
    assert ch.decide(ev(1.0, 0.8, 0.98, 0.7), ev(0.9, 0.79, 0.98, 0.71), "rmsle_model", 0.02, 0.05)[0]
    assert ch.decide(None, ev(0.9, 0.8, 0.9, 0.7))[0]  # nothing in service: the first model ships


def test_the_cycle_keeps_a_champion_the_challenger_does_not_beat_by_the_margin(emulation, data, holdout, tmp_path):
    cfg = CycleConfig(rounds=60)
    champion = _fit(data, holdout.train, tmp_path / "champion", rounds=60, name="ashrae-lgbm")
    work = tmp_path / "cycle"
    result = run(emulation, work, config=cfg, champion_dir=champion, weather=WEATHER)
    assert not result.promoted
    assert "cycle.margin" in result.reason
    assert not (work / "champion.json").exists()  # nothing promoted, nothing shipped
    (rec,) = [json.loads(x) for x in (work / "cycles.jsonl").read_text().splitlines()]
    assert rec["promoted"] is False and rec["challenger"]["version"] == result.challenger
    manifest = json.loads((result.challenger_dir / "manifest.json").read_text())
    assert manifest["evaluation"]["decision"] == "not promoted"
    assert manifest["lineage"]["parent"] == json.loads((champion / "manifest.json").read_text())["version"]
    assert "Decision: **not promoted**" in (result.challenger_dir / "CARD.md").read_text()
    assert result.line().startswith(f"cycle: kept={manifest['lineage']['parent']} challenger={result.challenger}")


def test_the_cycle_promotes_a_challenger_better_than_a_weakened_champion(emulation, tmp_path):
    weak = weakened(emulation, tmp_path / "weak")
    work = tmp_path / "cycle"
    result = run(emulation, work, config=FEW_ANOMALIES_CONFIG, champion_dir=weak, weather=WEATHER)
    assert result.promoted, result.reason
    ev = result.evaluation
    assert ev["challenger"]["rmsle_model"]["overall"] < 0.98 * ev["champion"]["rmsle_model"]["overall"]
    state = json.loads((work / "champion.json").read_text())
    assert state["version"] == result.challenger
    card = (result.challenger_dir / "CARD.md").read_text()
    assert "Decision: **promoted**" in card and result.challenger in card
    weak_version = json.loads((weak / "manifest.json").read_text())["version"]
    assert result.line().startswith(f"cycle: promoted={weak_version}->{result.challenger}")
    # the next cycle's champion is the one just promoted (no nucleus to ask): same data, no gain
    again = run(emulation, work, config=FEW_ANOMALIES_CONFIG, weather=WEATHER)
    assert again.champion == result.challenger and not again.promoted


def test_cycle_config_errors_name_each_key(tmp_path):
    with pytest.raises(ConfigErrors) as err:
        CycleConfig.from_dict({"margin": "lots", "metric": "accuracy", "holdout_days": -1, "bogus": 1})
    text = str(err.value)
    assert "cycle.margin: 'lots' is not a number" in text
    assert "cycle.metric: 'accuracy' is not one of rmsle_model, rmsle_online, anomaly_auc, anomaly_f1" in text
    assert "cycle.holdout_days: -1.0 is out of range 0..3660" in text
    assert "cycle.bogus: unknown key" in text
    with pytest.raises(ConfigErrors, match=r"cycle.zero_state: 'yes' is not true or false"):
        CycleConfig.from_dict({"zero_state": "yes"})
    f = tmp_path / "cycle.yaml"
    f.write_text("cycle:\n  metric: rmsle_online\n  margin: 0.05\n  holdout_days: 14\n")
    assert CycleConfig.load(f) == CycleConfig(metric="rmsle_online", margin=0.05, holdout_days=14.0)


def test_a_cycle_with_zero_state_trains_and_judges_a_zero_state_challenger(emulation, tmp_path):
    """cycle.zero_state: the retraining path ships the two-part model through the same judgement."""
    weak = weakened(emulation, tmp_path / "weak")
    # tolerance 1: on the sample's few dozen injected anomalies one reading moves F1 by several %
    config = CycleConfig.from_dict({"rounds": 60, "zero_state": True, "tolerance": 1.0})
    result = run(emulation, tmp_path / "cycle", config=config, champion_dir=weak, weather=WEATHER)
    assert result.promoted, result.reason
    manifest = json.loads((result.challenger_dir / "manifest.json").read_text())
    assert manifest["zero_state"] is True and manifest["parity_max_abs_diff"] <= 1e-4
    assert "Zero-state model" in (result.challenger_dir / "CARD.md").read_text()
    assert result.evaluation["challenger"]["anomaly"]["auc"] > 0.9
