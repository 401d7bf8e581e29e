"""gateway score, gateway model check, and what gateway status says about scoring."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from gateway.cli import main
from gateway.model.paths import default_model

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "readings.csv.gz"
ADDED = ["expected_model", "expected", "anomaly_score", "anomaly"]


def invoke(*args):
    return CliRunner(env={"COLUMNS": "160"}).invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_score_the_committed_extract(tmp_path):
    out = tmp_path / "scored.csv.gz"
    result = invoke("score", SAMPLE, out, "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{out}: 11,133 readings scored with ")
    assert result.stderr.splitlines()[0] == "1 row rejected:"
    assert "line 10578: " in result.stderr
    with gzip.open(SAMPLE, "rt") as f:
        header_in = next(csv.reader(f))
    with gzip.open(out, "rt") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0].keys()) == header_in + ADDED
    assert len(rows) == 11_133
    assert all(float(r["expected_model"]) >= 0 and float(r["expected"]) >= 0 for r in rows)
    assert {r["anomaly"] for r in rows} == {"0", "1"}
    assert all(float(r["anomaly_score"]) >= 0 for r in rows)
    flagged = [r for r in rows if r["anomaly"] == "1"]
    assert 0 < len(flagged) < 0.1 * len(rows)


def test_model_check_accepts_the_shipped_model_and_names_what_is_wrong(tmp_path):
    ok = invoke("model", "check", default_model())
    assert ok.exit_code == 0 and ok.stdout.startswith(f"{default_model()}: ok, version ")
    bad = tmp_path / "bad"
    shutil.copytree(default_model(), bad)
    (bad / "golden.json").write_text(json.dumps({"rows": [], "expected": []}))
    result = invoke("model", "check", bad)
    assert result.exit_code == 2
    assert result.stderr == (f"error: {bad / 'golden.json'}: golden vectors must be rows of "
                             f"{len(json.loads((default_model() / 'manifest.json').read_text())['feature_names'])} "
                             "features with one expected output each\n")


def test_status_explains_readings_that_could_not_be_scored(tmp_path):
    data = tmp_path / "two.csv"
    with gzip.open(SAMPLE, "rt") as f:
        header = next(csv.reader(f))
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerow(["1433", "0", "2016-06-01 12:00:00", "41.0", "15"] + [""] * 14)
        w.writerow(["99999", "0", "2016-06-01 12:00:00", "12.0", "15"] + [""] * 14)
    config = tmp_path / "gw.yaml"
    config.write_text(f"""\
thing: gw-test
buffer: {{path: buffer.db}}
sources: [{{type: replay, name: two, path: {data}}}]
publisher: {{type: memory}}
model: {{path: {default_model()}}}
""")
    run = invoke("run", "--config", config, "--exit-when-idle")
    assert run.exit_code == 0, run.output
    assert "2 stored, 2 delivered" in run.stdout
    status = invoke("status", "--config", config)
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in status.stdout.splitlines() if line.count("│") == 3}
    assert rows["scored / flagged"].startswith("1 / ")
    assert rows["not scored"] == "1: building 99999: no metadata (1)"
    assert rows["model"] == json.loads((default_model() / "manifest.json").read_text())["version"]
    js = json.loads(invoke("status", "--config", config, "--json").stdout)
    assert js["scoring"]["unscored_reasons"] == {"building 99999: no metadata": 1}


def test_score_without_any_model_says_what_to_give(tmp_path, monkeypatch):
    monkeypatch.setenv("GATEWAY_MODEL_DIR", str(tmp_path / "nowhere"))
    result = invoke("score", SAMPLE, tmp_path / "out.csv")
    assert (result.exit_code, result.stderr) == (2, "error: no model: give --model (no shipped models/ashrae-lgbm was found)\n")
    assert not (tmp_path / "out.csv").exists()


def test_score_refuses_a_model_that_fails_its_checks(tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(default_model(), bad)
    (bad / "model.onnx").write_bytes(b"junk")
    result = invoke("score", SAMPLE, tmp_path / "out.csv", "--model", bad, "--quiet")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {bad / 'model.onnx'}: cannot load: ")
