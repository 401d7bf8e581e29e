"""gateway model quality (gateway/model/quality.py): each training recipe on the cycle's holdout,
against the project's aims, printed and recorded in a model's manifest and card."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.errors import ModelError
from gateway.model.quality import AIMS, RECIPES, measure
from gateway.model.scorer import Scorer

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample" / "readings.csv.gz"
ARGS = ["model", "quality", "--data", str(SAMPLE), "--rounds", "20", "--holdout-days", "60"]


@pytest.fixture(scope="module")
def result():
    out = CliRunner().invoke(main, [*ARGS, "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.output)


def test_every_recipe_is_judged_on_the_same_held_out_buildings(result):
    h = result["holdout"]
    assert h["buildings"] >= 1 and h["readings"] > 100 and h["warm_up_readings"] > 0
    assert list(result["recipes"]) == list(RECIPES)
    readings = {ev["readings"] for ev in result["recipes"].values()}
    assert readings == {h["readings"]}
    for ev in result["recipes"].values():
        assert 0 < ev["rmsle_online"]["overall"] < ev["rmsle_model"]["overall"]
        assert 0.5 < ev["anomaly"]["auc"] <= 1 and 0 <= ev["anomaly"]["f1"] <= 1
    trained = {name: ev["trained_on"] for name, ev in result["recipes"].items()}
    # the working recipe leaves the known-bad zero stretches out; the other two train on every reading
    assert trained["working"] < trained["all-readings"] == trained["zero-state"]


def test_the_table_shows_each_figure_against_its_aim():
    out = CliRunner().invoke(main, [*ARGS, "--recipe", "working"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].startswith("holdout: ") and "buildings never trained on" in lines[0]
    assert lines[1].split() == ["recipe", *AIMS]
    assert lines[2].split() == ["aim", "<=", "1.5", "<=", "0.78", ">=", "0.985", ">=", "0.65"]
    (row,) = lines[3:]
    cells = row.split()
    assert cells[0] == "working" and len(cells) == 9
    assert all(word in ("met", "MISS") for word in cells[2::2])


def test_into_records_the_result_in_the_manifest_and_card_and_leaves_the_model_alone(result, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(ROOT / "models" / "ashrae-lgbm", model)
    before = hashlib.sha256((model / "model.onnx").read_bytes()).hexdigest()
    out = CliRunner().invoke(main, [*ARGS, "--recipe", "working", "--recipe", "zero-state", "--into", str(model)])
    assert out.exit_code == 0, out.output
    manifest = json.loads((model / "manifest.json").read_text())
    assert list(manifest["quality"]["recipes"]) == ["working", "zero-state"]
    assert hashlib.sha256((model / "model.onnx").read_bytes()).hexdigest() == before == manifest["sha256"]
    Scorer(model)  # still passes every hot-swap check
    card = (model / "CARD.md").read_text()
    assert "`gateway model quality`" in card and "| zero-state |" in card and "| aim | <= 1.5 |" in card
    assert re.search(r"\| ONNX vs LightGBM, max abs diff in log space \| \d\.\de-0\d \|", card)  # not 0.000


def test_an_unknown_recipe_is_named(result):
    from gateway.model.train import load_training_data

    table, _, X, ly = load_training_data(SAMPLE)
    with pytest.raises(ModelError, match=r"^unknown recipe hurdle \(known: working, all-readings, zero-state\)$"):
        measure(table, X, ly, ("hurdle",))


def test_quality_needs_one_source():
    out = CliRunner().invoke(main, ["model", "quality"])
    assert out.exit_code == 2 and "give one of --data (an ASHRAE CSV) or --from (the analytics store)" in out.output


def test_thresholds_scan_the_flag_for_choosing_model_threshold():
    out = CliRunner().invoke(main, [*ARGS, "--recipe", "working", "--thresholds", "3.5,5.5", "--json"])
    assert out.exit_code == 0, out.output
    anomaly = json.loads(out.output)["recipes"]["working"]["anomaly"]
    scan = anomaly["by_threshold"]
    assert list(scan) == ["3.5", "5.5"]
    assert scan["3.5"] == {k: anomaly[k] for k in scan["3.5"]}  # 3.5 is the default threshold
    assert scan["3.5"]["flag_rate_clean"] >= scan["5.5"]["flag_rate_clean"]
    assert scan["3.5"]["recall"] >= scan["5.5"]["recall"]
    text = CliRunner().invoke(main, [*ARGS, "--recipe", "working", "--thresholds", "3.5,5.5"]).output
    assert "anomaly flag at other thresholds: F1 / share of real readings flagged" in text
    bad = CliRunner().invoke(main, [*ARGS, "--thresholds", "3.5,high"])
    assert bad.exit_code == 2 and "'3.5,high' is not a comma-separated list of numbers" in bad.output
