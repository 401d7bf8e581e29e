"""The retraining loop, end to end on the local emulation: training from the analytics store
(gateway/model/source.py, ``gateway model train --from``), the lineage and the card, ``gateway
model publish`` (a model component version, deployed to a local nucleus) and ``gateway cycle``."""

from __future__ import annotations

import json
import re
import zipfile

import jsonschema
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from cycle_helpers import REPO, SAMPLE, WEATHER, send_sample, weakened
from emulator.nucleus.kernel import Nucleus
from emulator.nucleus.runner import wait_for
from emulator.rules.actions import Actions
from emulator.rules.engine import RulesEngine
from gateway import ashrae
from gateway.cli import main
from gateway.model import source
from gateway.model.publish import COMPONENT, deployed_version, publish
from gateway.model.scorer import Scorer
from gateway.model.train import load_from, load_training_data
from gateway.readings import METER_TYPES
from nucleus_helpers import remove, short_dir
from test_build import lower_keys, schema


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    root = tmp_path_factory.mktemp("cloud")
    sent = send_sample(root)
    return root, sent


def _sorted(table, X, ly):
    key = (table.building_id * 4 + table.meter) * 10**13 + table.ts_ms
    o = np.argsort(key)
    return key[o], X[o], ly[o]


def test_the_firehose_objects_read_back_as_the_csv_trains(emulation):
    root, sent = emulation
    got = source.read(root, WEATHER)
    assert got.objects == sent["objects"] and got.messages == sent["raw"] + sent["scored"]
    assert got.kinds == {"raw": sent["raw"], "scored": sent["scored"]}
    assert len(got.table) == sent["readings"]  # each reading once: its scored copy is a duplicate
    assert got.duplicates == got.copies - sent["readings"] > 0
    t1, _, X1, y1, _ = load_from(root, None, WEATHER)
    t2, _, X2, y2 = load_training_data(SAMPLE, REPO / "data" / "building_metadata.csv")
    k1, X1, y1 = _sorted(t1, X1, y1)
    k2, X2, y2 = _sorted(t2, X2, y2)
    assert np.array_equal(k1, k2) and np.allclose(y1, y2)
    # the same features as the CSV with its weather columns: metadata and weather joined as today
    assert ((X1 == X2) | (np.isnan(X1) & np.isnan(X2))).all()


def test_an_iot_analytics_dataset_csv_is_read_in_recorded_units(tmp_path):
    f = tmp_path / "metergateway_highres.csv"
    f.write_text('"site","building","meter_type","ts","kwh"\n'
                 '"0","1","electricity","1451606400000","2.9307107"\n'
                 '"0","1","electricity","1451606400000","2.9307107"\n'
                 '"15","1433","steam","1451610000000","12.5"\n'
                 '"15","1433","steam","1451613600000","-1"\n')
    got = source.read(f)
    assert got.kind == "iotanalytics" and len(got.table) == 2 and got.duplicates == 1
    by_building = dict(zip(got.table.building_id.tolist(), got.table.meter_reading.tolist()))
    assert by_building[1] == pytest.approx(10.0)  # kWh back to the kBTU site 0 records
    assert by_building[1433] == 12.5
    assert got.dropped == {"negative or not finite": 1}


def test_unusable_sources_are_named(tmp_path):
    from gateway.errors import ModelError

    with pytest.raises(ModelError, match=r"no readings objects"):
        source.read(tmp_path)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ModelError, match=r"x.json: a file must be an IoT Analytics dataset CSV"):
        source.read(tmp_path / "x.json")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ModelError, match=r"missing columns building, kwh, meter_type, site, ts"):
        source.read(bad)


def test_train_from_the_emulation_writes_lineage_and_card(emulation, tmp_path):
    root, sent = emulation
    out = tmp_path / "model"
    res = CliRunner().invoke(main, ["model", "train", "--from", str(root), "--weather", str(WEATHER), "--out",
                                    str(out), "--parent", str(REPO / "models" / "ashrae-lgbm"), "--no-eval",
                                    "--rounds", "30"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    shipped = json.loads((REPO / "models" / "ashrae-lgbm" / "manifest.json").read_text())
    assert m["lineage"]["parent"] == shipped["version"]
    assert re.match(r"^(git \S+|meter-gateway \S+)$", m["lineage"]["code_version"])
    assert m["lineage"]["trained_by"] == "gateway model train"
    data = m["training_data"]
    assert data["kind"] == "firehose" and data["messages"] == sent["raw"] + sent["scored"]
    assert data["rows"] == sent["readings"] and data["buildings"] == 8 and data["meters"] == 27
    assert (data["from_local"], data["to_local"]) == ("2016-01-01T00:00:00", "2016-12-31T23:00:00")
    assert Scorer(out).version == m["version"]  # golden vectors, feature names: verifiable
    card = (out / "CARD.md").read_text()
    assert m["version"] in card and shipped["version"] in card and m["lineage"]["code_version"] in card


def test_train_needs_one_source():
    res = CliRunner().invoke(main, ["model", "train", "--out", "/tmp/never"])
    assert res.exit_code != 0 and "give one of --data (an ASHRAE CSV) or --from (the analytics store)" in res.output


def test_publish_builds_a_component_version_from_the_folder_and_prints_the_aws_steps(tmp_path):
    res = CliRunner().invoke(main, ["model", "publish", str(REPO / "models" / "ashrae-lgbm"), "--workdir",
                                    str(tmp_path / "pub")])
    assert res.exit_code == 2 and "give --version for AWS" in res.output
    p = publish(REPO / "models" / "ashrae-lgbm", workdir=tmp_path / "pub", version="1.0.7")
    recipe = yaml.safe_load(p.recipe.read_text())
    assert (recipe["ComponentName"], recipe["ComponentVersion"]) == (COMPONENT, "1.0.7")
    jsonschema.Draft7Validator(schema("greengrass-recipe.schema.json")).validate(lower_keys(recipe))
    (artifact,) = (p.artifacts / COMPONENT / "1.0.7").iterdir()
    names = zipfile.ZipFile(artifact).namelist()
    for must in ("main.py", "install.py", "models/README.md", "models/ashrae-lgbm/model.onnx",
                 "models/ashrae-lgbm/golden.json", "models/ashrae-lgbm/manifest.json"):
        assert must in names
    assert {n.split("/")[1] for n in names if n.startswith("models/") and n.count("/") > 1} == {"ashrae-lgbm"}
    assert any(n.startswith("wheelhouse/awsiotsdk-") for n in names)
    gdk, deploy = p.steps
    assert gdk == f"cd {p.project} && gdk component publish"
    assert json.loads((p.project / "gdk-config.json").read_text())["component"][COMPONENT]["version"] == "1.0.7"
    doc = json.loads((p.project.parent.parent / "deployment-1.0.7.json").read_text())
    assert doc["components"][COMPONENT]["componentVersion"] == "1.0.7"
    assert deploy.startswith("aws greengrassv2 create-deployment --cli-input-json file://")


@pytest.fixture
def nucleus():
    base = short_dir()
    with Nucleus(base / "root", "meter-gw-cycle") as n:
        yield n
    remove(base)


def _announced(n: Nucleus, model: str) -> bool:
    log = n.root / "logs" / f"{COMPONENT}.log"
    return log.exists() and f"announced model {model}" in log.read_text()


def test_publish_deploys_to_a_local_nucleus_then_the_cycle_ships_a_better_model(emulation, nucleus, tmp_path):
    root, _ = emulation
    weak = weakened(root, tmp_path / "weak")
    weak_version = json.loads((weak / "manifest.json").read_text())["version"]
    res = CliRunner().invoke(main, ["model", "publish", str(weak), "--root", str(nucleus.root), "--workdir",
                                    str(tmp_path / "pub")])
    assert res.exit_code == 0, res.output
    assert f"deployed {COMPONENT}=1.0.0 on {nucleus.root}" in res.output  # nothing ran before: 1.0.0
    assert deployed_version(nucleus.root) == "1.0.0"
    assert wait_for(lambda: _announced(nucleus, weak_version), 120)

    cfg = tmp_path / "cycle.yaml"
    cfg.write_text("cycle:\n  margin: 0.05\n  rounds: 60\n  anomaly_rate: 0.05\n")  # enough for F1 (test_champion)
    res = CliRunner().invoke(main, ["cycle", "--from", str(root), "--weather", str(WEATHER), "--root",
                                    str(nucleus.root), "--workdir", str(tmp_path / "cycle"), "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    line = res.output.strip().splitlines()[-1]
    m = re.match(rf"^cycle: promoted={re.escape(weak_version)}->(\S+) component=1\.0\.1 ", line)
    assert m, res.output
    assert deployed_version(nucleus.root) == "1.0.1"
    assert wait_for(lambda: _announced(nucleus, m.group(1)), 120)
    (rec,) = [json.loads(x) for x in (tmp_path / "cycle" / "cycles.jsonl").read_text().splitlines()]
    assert rec["promoted"] and rec["component_version"] == "1.0.1" and rec["deployment"]
    assert rec["champion"]["version"] == weak_version  # the champion was the one the nucleus ran
    shipped = nucleus.root / "packages" / "artifacts-unarchived" / COMPONENT / "1.0.1" / "model" / "models"
    card = (shipped / "README.md").read_text()
    assert m.group(1) in card and "Decision: **promoted**" in card



def test_an_iot_analytics_dataset_triggers_a_cycle_as_the_seeds_notebook_did(tmp_path):
    """The legacy IoT Analytics emulation, fed the sample through the template's own rules (one
    thing per meter type); a new content of its highres dataset runs a cycle on that CSV, which
    trains, compares and, against a weakened champion, promotes."""
    from emulator.iotanalytics import LocalIoTAnalytics
    from emulator.rules.engine import LEGACY
    from gateway.model.cycle import CycleConfig, on_dataset

    root = tmp_path / "cloud"
    ia = LocalIoTAnalytics(root)
    engine = RulesEngine([LEGACY], Actions(iotanalytics=ia, s3=root / "s3", logs=root / "logs"))
    t = ashrae.read(SAMPLE)
    for j in range(len(t.site_id)):
        topic = f"dt/meters/{t.site_id[j]}/metergateway-{METER_TYPES[t.meter[j]]}/raw"
        body = {"building": str(t.building_id[j]), "ts": int(t.ts_ms[j]), "value": float(t.meter_reading[j])}
        engine.handle(topic, json.dumps(body).encode())
    weak = weakened(send_sample_root(tmp_path / "firehose"), tmp_path / "weak")
    work = tmp_path / "work"
    log = work / "cycles.jsonl"
    stop = on_dataset(ia, "metergateway_highres", work, config=CycleConfig(rounds=60, anomaly_rate=0.05), champion_dir=weak,
                      weather=WEATHER)
    try:
        csv_path = ia.run_dataset("metergateway_highres")
        assert wait_for(lambda: log.exists() and log.read_text().strip() != "", 240), "no cycle ran on the dataset"
    finally:
        stop()
    record = json.loads(log.read_text().strip().splitlines()[-1])
    assert record["promoted"] is True, record
    assert str(csv_path) in json.dumps(record), record  # the dataset's CSV was the training source


def send_sample_root(root):
    send_sample(root)
    return root
