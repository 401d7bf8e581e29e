"""Helpers for the retraining-cycle tests: the bundled sample sent through the emulated cloud,
and small models trained from it (a good one, a deliberately weakened one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from emulator.firehose import LocalFirehose
from emulator.rules.actions import Actions
from emulator.rules.engine import RulesEngine
from gateway import ashrae
from gateway.messages import chunks
from gateway.readings import METER_TYPES

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "readings.csv.gz"
WEATHER = REPO / "data" / "sample" / "weather_2016.json.gz"
THING = "gw-cycle"


def send_sample(root: Path, scored_every: int = 2) -> dict:
    """Every reading of the sample as the gateway's raw messages (and every ``scored_every``-th
    message again as a scored one), through the analytics template's RawRule and ScoredRule into
    the local Firehose under ``root``; returns counts."""
    t = ashrae.read(SAMPLE)
    hose = LocalFirehose(root, timer=False)
    engine = RulesEngine(actions=Actions(firehose=hose), rules=["RawRule", "ScoredRule"])
    sent = {"readings": 0, "raw": 0, "scored": 0}
    for site in np.unique(t.site_id).tolist():
        idx = np.flatnonzero(t.site_id == site)
        rows = [[f"{t.building_id[j]}:{METER_TYPES[t.meter[j]]}", int(t.ts_ms[j]), float(t.meter_reading[j])]
                for j in idx.tolist()]
        sent["readings"] += len(rows)
        for n, (payload, part) in enumerate(chunks(THING, str(site), rows, 100)):
            assert engine.handle(f"dt/meters/{site}/{THING}/raw", payload) == 1
            sent["raw"] += 1
            if n % scored_every == 0:
                scored = [r + [r[2], 0.5, False] for r in part]
                for sp, _ in chunks(THING, str(site), scored, 100, model="m-test"):
                    assert engine.handle(f"dt/meters/{site}/{THING}/scored", sp) == 1
                    sent["scored"] += 1
    sent["objects"] = len(hose.close())
    return sent


def weakened(src: Path, dst: Path, bias: float = 1.5) -> Path:
    """A deliberately weakened champion: trained on the same readings with every target raised by
    ``bias`` in log space (it expects about 4.5 times what meters use), passing every hot-swap check."""
    from gateway.model.train import fit_and_write, load_from

    table, _, X, ly, info = load_from(src, None, WEATHER)
    fit_and_write(table, X, ly + bias, dst, training_data=info, rounds=60, evaluate=False, name="weak")
    return dst
