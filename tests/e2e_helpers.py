"""Helpers for the end-to-end tests of the real components on the local nucleus.

:func:`build_components` runs ``gateway build`` (release.build's Python API) on a copy of the
checkout, so the repository's own ``greengrass-build/`` folders are never touched, and gathers
the builds into one ``--recipeDir``/``--artifactDir`` pair. :class:`NucleusProcess` is
``gateway nucleus --broker --certs --config`` in its own process, and :func:`cli` runs its
greengrass-cli verbs. :class:`Delivered` indexes what a subscriber on the broker received by
reading key ``(meter, ts)``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from emulator.nucleus.runner import wait_for
from gateway.messages import decode
from release.build import build

REPO = Path(__file__).resolve().parents[1]
GATEWAY = "org.metergateway.Gateway"
MODEL = "org.metergateway.Model"
SAMPLE = REPO / "data" / "sample" / "readings.csv.gz"


def checkout(dst: Path) -> Path:
    """A copy of what ``gateway build`` reads (symlinks kept: recipe.yaml, components/model/models)."""
    dst.mkdir(parents=True)
    for name in ("gateway", "components", "recipes", "models", "data"):
        shutil.copytree(REPO / name, dst / name, symlinks=True,
                        ignore=shutil.ignore_patterns("wheelhouse", "greengrass-build", "zip-build", "__pycache__",
                                                      "sample"))
    for name in ("gdk-config.json", "pyproject.toml", "README.md", "recipe.yaml"):
        src = REPO / name
        if src.is_symlink():
            (dst / name).symlink_to(src.readlink())
        else:
            shutil.copy2(src, dst / name)
    return dst


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


@dataclass
class Builds:
    """One --recipeDir / --artifactDir pair holding every build, and what they took."""

    recipes: Path
    artifacts: Path
    model_versions: dict[str, str] = field(default_factory=dict)  # component version -> model version
    seconds: dict[str, float] = field(default_factory=dict)
    wheels: dict[str, int] = field(default_factory=dict)


def _collect(project: Path, name: str, version: str, out: Builds) -> None:
    gg = project / "greengrass-build"
    (recipe,) = (gg / "recipes").iterdir()
    shutil.copy2(recipe, out.recipes / f"{name}-{version}{recipe.suffix}")
    shutil.copytree(gg / "artifacts" / name / version, out.artifacts / name / version)


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
        _collect(project, name, version, out)
    (folder,) = [p.parent for p in (src / "models").glob("*/manifest.json")]
    out.model_versions["0.1.0"] = model_version(folder)
    set_model_version(folder, out.model_versions["0.1.0"] + "-e2e2")
    out.model_versions[model2] = model_version(folder)
    t = time.monotonic()
    build("model", repo=src, version=model2, out=log)
    out.seconds[f"model {model2}"] = time.monotonic() - t
    _collect(src / "components" / "model", MODEL, model2, out)
    return out


def cli(*args: str, ok: bool = True, timeout: float = 120) -> str:
    """``gateway nucleus ARGS`` in its own process; its stdout and stderr."""
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "nucleus", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


class NucleusProcess:
    """``gateway nucleus --root --thing --broker --certs --config`` in the foreground of its own process."""

    def __init__(self, root: Path, thing: str, broker_port: int, certs: Path, config: Path) -> None:
        self.root, self.thing = root, thing
        self.args = ["--root", str(root), "--thing", thing, "--broker", f"localhost:{broker_port}",
                     "--certs", str(certs), "--config", str(config)]
        self.proc: subprocess.Popen | None = None
        self.output = root.parent / "nucleus.out"

    def start(self, timeout: float = 30) -> NucleusProcess:
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with open(self.output, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "nucleus", *self.args], cwd=REPO,
                                         stdout=out, stderr=subprocess.STDOUT, text=True)
        assert wait_for(lambda: "nucleus running on" in self.output.read_text() or self.proc.poll() is not None,
                        timeout), self.output.read_text()
        assert self.proc.poll() is None, self.output.read_text()
        return self

    def stop(self, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def deploy(self, builds: Builds, *args: str, ok: bool = True, wait: float = 300) -> tuple[str, str]:
        """``deployment create`` with the builds' folders and ``--wait``; (deployment id, output)."""
        out = cli("deployment", "create", "--root", str(self.root), "--recipeDir", str(builds.recipes),
                  "--artifactDir", str(builds.artifacts), *args, "--wait", str(wait), ok=ok, timeout=wait + 60)
        m = re.search(r"Deployment Id: (\S+)", out)
        assert m, out
        return m.group(1), out

    def state(self, name: str) -> str:
        out = cli("component", "list", "--root", str(self.root))
        m = re.search(rf"Component Name: {re.escape(name)}\n    Version: \S+\n    State: (\S+)\n", out)
        assert m, out
        return m.group(1)

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def work(self, name: str) -> Path:
        return self.root / "work" / name


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
