"""The model card of one model version, made from its ``manifest.json`` alone.

Every trained version gets its own card (``CARD.md`` in the model folder; a published model
component carries it as ``models/README.md``), so the card can never describe another version
than the one it ships with: what it is, where it came from (parent version, code version, the
training data's source, range and counts), how good it is on buildings it never saw (the
cross-validation's figures and the champion/challenger evaluation, when the manifest has them),
and whether it was promoted. ``models/README.md`` in the repository is the long, hand-written card
of the shipped model; this one is its short, regenerated counterpart.
"""

from __future__ import annotations

import json
from pathlib import Path

from gateway.errors import ModelError

CARD = "CARD.md"


def _f(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _sci(v) -> str:
    """A small figure that fixed decimals would show as 0.000."""
    return "–" if v is None else f"{v:.1e}"


def _table(head: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    out += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return out


def _quality(m: dict) -> list[str]:
    """The rows of one set of unseen-building figures (an evaluation dict)."""
    return [m.get("rmsle_model", {}).get("overall") if isinstance(m.get("rmsle_model"), dict) else m.get("rmsle_model"),
            m.get("rmsle_online", {}).get("overall") if isinstance(m.get("rmsle_online"), dict) else m.get("rmsle_online"),
            (m.get("anomaly") or {}).get("auc", m.get("auc")), (m.get("anomaly") or {}).get("f1", m.get("f1"))]


def _recipes(quality: dict | None) -> list[str]:
    """The ``gateway model quality`` result recorded in the manifest: each recipe against the aims."""
    if not quality:
        return []
    from gateway.model.quality import AIMS, figures, met

    h = quality.get("holdout") or {}
    rows = [["aim", *(f"{b} {a:g}" for b, a in AIMS.values())]]
    for name, ev in (quality.get("recipes") or {}).items():
        rows.append([name, *(("–" if v is None else f"{v:.3f}" + ("" if met(k, v) else " (missed)"))
                             for k, v in figures(ev).items())])
    return ["", f"Each training recipe on the cycle's holdout (`gateway model quality`): trained without "
            f"{_f(h.get('buildings'))} buildings, scored on their readings from {h.get('from_local', '?')} to "
            f"{h.get('to_local', '?')} ({_f(h.get('readings'))} readings; the "
            f"{_f(h.get('warm_up_readings'))} before only warm up the online learning).", "",
            *_table(["recipe", "RMSLE, model alone", "RMSLE, after online learning", "anomaly AUC",
                     "anomaly F1 at the threshold"], rows)]


def render(manifest: dict) -> str:
    """The card's markdown."""
    name, version = manifest.get("name", "model"), manifest.get("version", "?")
    lineage = manifest.get("lineage") or {}
    data = manifest.get("training_data") or {}
    lines = [f"# Model card: `{name}`, version `{version}`", "",
             "Expected hourly energy of a building meter (LightGBM exported to ONNX; one input `features`, "
             f"{len(manifest.get('feature_names', []))} columns, one output `{manifest.get('output', 'log1p_expected')}`"
             "). The gateway corrects it per meter online and scores anomalies against it. Generated from "
             "`manifest.json` by `gateway.model.card`."
             + (" Zero-state model: a level regression on the non-zero readings times the chance the meter "
                "reads more than 0, from a classifier, in the one graph." if manifest.get("zero_state") else ""),
             "",
             "## Lineage", ""]
    lines += _table(["", ""], [
        ["version", version], ["created (UTC)", manifest.get("created")],
        ["parent (the model in service when it was trained)", lineage.get("parent") or "none"],
        ["code version", lineage.get("code_version")], ["trained by", lineage.get("trained_by")],
        ["model.onnx sha256", manifest.get("sha256")],
        ["ONNX vs LightGBM, max abs diff in log space", _sci(manifest.get("parity_max_abs_diff"))],
    ])
    lines += ["", "## Training data", ""]
    rows = [[k.replace("_", " "), json.dumps(v) if isinstance(v, (dict, list)) else v] for k, v in data.items()]
    lines += _table(["", ""], rows) if rows else ["(not recorded)"]
    lines += ["", "Features: " + ", ".join(f"`{n}`" for n in manifest.get("feature_names", [])) +
              ". `building_id` is not a feature: every figure below is on buildings the model never saw.", ""]
    lines += ["## Quality on buildings not seen in training", ""]
    quality = []
    cv = manifest.get("metrics") or {}
    if cv.get("rmsle_model"):
        quality.append([f"{cv.get('folds', '?')}-fold by building, all training data", *_quality(cv)])
    ev = manifest.get("evaluation") or {}
    for who in ("challenger", "champion"):
        if who in ev:
            label = f"{who} ({ev[who].get('version', '?')}) on the holdout"
            quality.append([label, *_quality(ev[who])])
    if quality:
        lines += _table(["evaluation", "RMSLE, model alone", "RMSLE, after online learning", "anomaly AUC",
                         "anomaly F1 at the threshold"], quality)
    else:
        lines += ["(no evaluation was run)"]
    lines += _recipes(manifest.get("quality"))
    if ev:
        h = ev.get("holdout") or {}
        lines += ["", f"Holdout: {_f(h.get('buildings'))} buildings never trained on, readings from "
                  f"{h.get('from_local', '?')} on ({_f(h.get('readings'))} readings scored; their earlier "
                  "readings only warm up the per-meter online learning, as a gateway would have). "
                  f"Decision: **{ev.get('decision', '?')}** — {ev.get('reason', '')}"]
    lines += ["", "## Limits", "",
              "- The model alone cannot know a building's own level; the per-meter online learning does, "
              "from the meter's readings before the current one.",
              "- Weather is the site's latest observation at or before the reading (NaN when none is within 3 h).",
              "- Trained on the readings the fleet sent: a site outside `gateway/sites.py` cannot be featurized.", ""]
    return "\n".join(lines)


def write_card(model_dir: str | Path, path: str | Path | None = None) -> Path:
    """Write the card of ``model_dir`` (from its manifest.json) to ``path`` (default ``<model_dir>/CARD.md``)."""
    model_dir = Path(model_dir)
    try:
        manifest = json.loads((model_dir / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{model_dir / 'manifest.json'}: cannot read: {exc}") from exc
    out = Path(path) if path else model_dir / CARD
    out.write_text(render(manifest), encoding="utf-8")
    return out
