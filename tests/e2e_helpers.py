"""Helpers for the end-to-end tests of the real components on the local nucleus.

:func:`build_components` runs ``gateway build`` (release.build's Python API) on a copy of the
checkout (:func:`emulator.components.checkout`, as ``gateway demo`` does), so the repository's
own ``greengrass-build/`` folders are never touched, and gathers the builds into one
``--recipeDir``/``--artifactDir`` pair, with a second model version.
:class:`~emulator.components.NucleusProcess` is ``gateway nucleus --broker --certs --config`` in
its own process, and :func:`cli` runs its greengrass-cli verbs. :class:`Delivered` indexes what a subscriber on the broker received by
reading key ``(meter, ts)``.
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from emulator.components import GATEWAY, MODEL, REPO, Builds, NucleusProcess, checkout, collect
from emulator.components import nucleus_cli as cli
from gateway.messages import decode
from release.build import build

__all__ = ["GATEWAY", "MODEL", "SAMPLE", "Builds", "Delivered", "NucleusProcess", "build_components", "checkout",
           "cli", "component_pids", "log_time", "model_version", "set_model_version"]
SAMPLE = REPO / "data" / "sample" / "readings.csv.gz"


def set_model_version(folder: Path, version: str) -> None:
    """Give a model folder another version: the ONNX metadata ``model_version`` (what the scorer
    reports and scored messages carry) and ``manifest.json``'s ``version`` (what is announced)."""
    import onnx

    m = onnx.load(folder / "model.onnx")
    for p in m.metadata_props:
        if p.key == "model_version":
            p.value = version
    onnx.save(m, folder / "model.onnx")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["version"] = version
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def model_version(folder: Path) -> str:
    return json.loads((folder / "manifest.json").read_text())["version"]


def build_components(base: Path, model2: str = "0.2.0") -> Builds:
    """``gateway build --version 0.1.0`` of both components (full wheelhouses), then the model
    component again as ``model2`` with a model folder whose version differs."""
    src = checkout(base / "meter-gateway")
    out = Builds(base / "recipes", base / "artifacts")
    out.recipes.mkdir()
    out.artifacts.mkdir()
    log = io.StringIO()
    for component, name, version, project in (("gateway", GATEWAY, "0.1.0", src),
                                              ("model", MODEL, "0.1.0", src / "components" / "model")):
        t = time.monotonic()
        built = build(component, repo=src, version=version, out=log)
        out.seconds[f"{component} {version}"] = time.monotonic() - t
        out.wheels[component] = len(built.wheels)
        collect(project, name, version, out)
    (folder,) = [p.parent for p in (src / "models").glob("*/manifest.json")]
    out.model_versions["0.1.0"] = model_version(folder)
    set_model_version(folder, out.model_versions["0.1.0"] + "-e2e2")
    out.model_versions[model2] = model_version(folder)
    t = time.monotonic()
    build("model", repo=src, version=model2, out=log)
    out.seconds[f"model {model2}"] = time.monotonic() - t
    collect(src / "components" / "model", MODEL, model2, out)
    return out


def component_pids(work: Path, script: str) -> list[int]:
    """Processes running ``script`` with ``work`` as their working directory (a component's
    process, as the nucleus starts it: ``sh -c 'exec python .../main.py'``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if Path(os.readlink(entry / "cwd")) != work:
                continue
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.decode(errors="replace").endswith(script) for arg in cmdline):
            pids.append(int(entry.name))
    return sorted(pids)


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z ")


def log_time(path: Path, pattern: str, *, last: bool = False) -> float | None:
    """The epoch time of the first (or last) line of a component log matching ``pattern``."""
    found = None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _STAMP.match(line)
        if m and re.search(pattern, line):
            found = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()
            if not last:
                return found
    return found


class Delivered:
    """What a subscriber received, by reading key: raw keys, and per key the model versions of
    the scored messages that carried it (and how often). Updated incrementally, so a
    ``wait_for`` predicate costs O(new messages)."""

    def __init__(self, subscriber) -> None:
        self.subscriber = subscriber
        self.seen = 0
        self.raw: dict[tuple[str, int], int] = {}
        self.scored: dict[tuple[str, int], list[str]] = {}
        self.first_scored_at: dict[str, float] = {}  # model version -> when its first scored message came
        self._lock = threading.Lock()

    def update(self, messages=None) -> Delivered:
        messages = self.subscriber.snapshot() if messages is None else messages
        with self._lock:
            for m in messages[self.seen:]:
                kind = m.topic.rsplit("/", 1)[-1]
                if kind not in ("raw", "scored"):
                    continue
                body = decode(m.payload)
                for r in body["readings"]:
                    key = (r[0], r[1])
                    if kind == "raw":
                        self.raw[key] = self.raw.get(key, 0) + 1
                    else:
                        self.scored.setdefault(key, []).append(body.get("model"))
                if kind == "scored":
                    self.first_scored_at.setdefault(body.get("model"), time.monotonic())
            self.seen = len(messages)
        return self

    def covers(self, expected: set) -> Callable[[list], bool]:
        """A predicate for ``subscriber.wait_for``: every expected key arrived raw and scored."""
        def done(messages) -> bool:
            self.update(messages)
            return expected <= self.raw.keys() and expected <= self.scored.keys()
        return done

    def missing(self, expected: set) -> str:
        raw, scored = expected - self.raw.keys(), expected - self.scored.keys()
        return f"{len(raw)} of {len(expected)} not raw (e.g. {sorted(raw)[:3]}), {len(scored)} not scored"
