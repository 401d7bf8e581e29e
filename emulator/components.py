"""The two components, built by ``gateway build`` and run on the local nucleus: what the demo
and the end-to-end tests share.

:func:`checkout` copies what ``gateway build`` reads into a work folder, so the repository's own
``greengrass-build/`` folders are never touched (``release.build.build`` writes into
``<project>/greengrass-build/``, the project being the repository unless told otherwise).
:func:`build_components` builds both components there and gathers them into one
``--recipeDir``/``--artifactDir`` pair (:class:`Builds`). :class:`NucleusProcess` is
``gateway nucleus --root --thing --broker --certs --config`` in its own process (and its own
session, so a Ctrl-C in the terminal reaches whoever started it, who stops it in order), and
:func:`nucleus_cli` runs its greengrass-cli verbs (``deployment create``, ``component list``).
"""

from __future__ import annotations

import io
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from emulator.nucleus.runner import wait_for

REPO = Path(__file__).resolve().parents[1]
GATEWAY = "org.metergateway.Gateway"
MODEL = "org.metergateway.Model"
#: Unix socket paths are limited to 107 bytes; the nucleus's is ``<root>/ipc.socket``.
MAX_SOCKET_PATH = 107


class DeployError(RuntimeError):
    """The nucleus or a deployment did not do what was asked; the message holds its output."""


def checkout(dst: Path, repo: Path = REPO) -> Path:
    """A copy of what ``gateway build`` reads (symlinks kept: recipe.yaml, components/model/models)."""
    dst.mkdir(parents=True)
    for name in ("gateway", "components", "recipes", "models", "data"):
        shutil.copytree(repo / name, dst / name, symlinks=True,
                        ignore=shutil.ignore_patterns("wheelhouse", "greengrass-build", "zip-build", "__pycache__",
                                                      "sample"))
    for name in ("gdk-config.json", "pyproject.toml", "README.md", "recipe.yaml"):
        src = repo / name
        if src.is_symlink():
            (dst / name).symlink_to(src.readlink())
        else:
            shutil.copy2(src, dst / name)
    return dst


@dataclass
class Builds:
    """One --recipeDir / --artifactDir pair holding every build, and what they took."""

    recipes: Path
    artifacts: Path
    model_versions: dict[str, str] = field(default_factory=dict)  # component version -> model version
    seconds: dict[str, float] = field(default_factory=dict)
    wheels: dict[str, int] = field(default_factory=dict)


def collect(project: Path, name: str, version: str, out: Builds) -> None:
    """Copy one project's ``greengrass-build/`` recipe and artifacts into ``out``."""
    gg = project / "greengrass-build"
    (recipe,) = (gg / "recipes").iterdir()
    shutil.copy2(recipe, out.recipes / f"{name}-{version}{recipe.suffix}")
    shutil.copytree(gg / "artifacts" / name / version, out.artifacts / name / version)


def build_components(base: Path, version: str = "0.1.0", *, log=None) -> tuple[Builds, Path]:
    """``gateway build --version VERSION`` of both components (full wheelhouses) in a checkout
    under ``base``; returns the builds and the checkout."""
    from release.build import build

    src = checkout(base / "meter-gateway")
    out = Builds(base / "recipes", base / "artifacts")
    out.recipes.mkdir()
    out.artifacts.mkdir()
    log = log if log is not None else io.StringIO()
    for component, name, project in (("gateway", GATEWAY, src), ("model", MODEL, src / "components" / "model")):
        t = time.monotonic()
        built = build(component, repo=src, version=version, out=log)
        out.seconds[component] = time.monotonic() - t
        out.wheels[component] = len(built.wheels)
        collect(project, name, version, out)
    return out, src


def nucleus_cli(*args: str, ok: bool = True, timeout: float = 120) -> str:
    """``gateway nucleus ARGS`` in its own process; its stdout and stderr."""
    proc = subprocess.run([sys.executable, "-m", "gateway.cli", "nucleus", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if ok and proc.returncode != 0:
        raise DeployError(f"gateway nucleus {args[0]} {args[1] if len(args) > 1 else ''} exited with "
                          f"{proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


class NucleusProcess:
    """``gateway nucleus --root --thing --broker --certs --config`` in the foreground of its own
    process and session; :meth:`stop` is SIGTERM: every component's shutdown step, then the nucleus."""

    def __init__(self, root: Path, thing: str, broker_port: int, certs: Path, config: Path,
                 output: Path | None = None) -> None:
        self.root, self.thing = root, thing
        socket_path = root.resolve() / "ipc.socket"
        if len(str(socket_path)) > MAX_SOCKET_PATH:
            raise DeployError(f"the nucleus root {root} is too deep: its IPC socket {socket_path} would be "
                              f"{len(str(socket_path))} bytes, over the {MAX_SOCKET_PATH} a Unix socket path "
                              "allows; use a shorter work folder")
        self.args = ["--root", str(root), "--thing", thing, "--broker", f"localhost:{broker_port}",
                     "--certs", str(certs), "--config", str(config)]
        self.proc: subprocess.Popen | None = None
        self.output = output or root.parent / "nucleus.out"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, timeout: float = 30) -> NucleusProcess:
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with open(self.output, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "nucleus", *self.args], cwd=REPO,
                                         stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        up = wait_for(lambda: "nucleus running on" in self.output.read_text() or self.proc.poll() is not None, timeout)
        if not up or self.proc.poll() is not None:
            text = self.output.read_text()
            self.stop()
            raise DeployError(f"the nucleus did not start within {timeout:.0f} s:\n{text}")
        return self

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait (SIGKILL after ``timeout``); the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def deploy(self, builds: Builds, *args: str, ok: bool = True, wait: float = 300) -> tuple[str, str]:
        """``deployment create`` with the builds' folders and ``--wait``; (deployment id, output)."""
        out = nucleus_cli("deployment", "create", "--root", str(self.root), "--recipeDir", str(builds.recipes),
                          "--artifactDir", str(builds.artifacts), *args, "--wait", str(wait), ok=ok,
                          timeout=wait + 60)
        m = re.search(r"Deployment Id: (\S+)", out)
        if not m:
            raise DeployError(f"no deployment id in the output of deployment create:\n{out}")
        return m.group(1), out

    def state(self, name: str) -> str:
        out = nucleus_cli("component", "list", "--root", str(self.root))
        m = re.search(rf"Component Name: {re.escape(name)}\n    Version: \S+\n    State: (\S+)\n", out)
        if not m:
            raise DeployError(f"{name} is not in the component list:\n{out}")
        return m.group(1)

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def work(self, name: str) -> Path:
        return self.root / "work" / name
