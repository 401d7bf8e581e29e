"""The wheelhouse: every wheel a component installs on the device, shipped inside its artifact.

A device may reach no package index, so the artifact carries the wheels and
:mod:`gateway.install` installs them with ``pip install --no-index``. Two kinds:

- ``gateway``: the runtime dependencies of ``pyproject.toml`` with everything they need,
  resolved by pip, plus the meter-gateway wheel.
- ``model``: the announcer's few wheels only (meter-gateway, awsiotsdk, awscrt), installed
  with ``--no-deps``; the model component scores nothing, so it needs no numpy or onnxruntime.

Both carry pip's own wheel (the version running here), which the Install step runs from, so the
device needs neither python3-pip nor ensurepip.

Versions: the direct dependencies are pinned in ``pyproject.toml``; every other one is
constrained to the version installed in the environment running the build (the one the test
suite ran against). Wheels only (``--only-binary=:all:``): nothing is compiled on the device.
For another device, ``platform="manylinux_2_28_aarch64"`` (and ``python_version="3.11"``)
downloads that platform's wheels, every manylinux tag up to glibc 2.28 (:func:`platform_tags`);
``manylinux2014_aarch64`` alone finds no numpy 2.4 (its aarch64 wheels need glibc 2.27+).

The meter-gateway wheel is built from a staged copy holding ``gateway/`` alone (with
pyproject.toml and README.md), so neither ``emulator/`` nor ``release/`` ever reaches a device.

Run ``python -m release.wheelhouse [--component model] [--platform P]`` to make one in place
(``wheelhouse/`` at the repository root, ``components/model/wheelhouse/``) before a real
``gdk component build``; ``gateway build`` makes it itself.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The distributions the model component's announcer imports (installed with --no-deps).
MODEL_DISTRIBUTIONS = ("awsiotsdk", "awscrt")
DIST_NAME = "meter-gateway"


class WheelhouseError(Exception):
    """A wheelhouse could not be made; the message says which step and why."""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_requirements(repo: Path = REPO) -> list[str]:
    """The ``[project] dependencies`` of pyproject.toml, as written (pinned)."""
    with (repo / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def model_requirements(repo: Path = REPO) -> list[str]:
    """The pinned requirements of the model component's wheelhouse."""
    wanted = {_canonical(n) for n in MODEL_DISTRIBUTIONS}
    reqs = [r for r in runtime_requirements(repo) if _canonical(re.split(r"[<>=!~ \[;]", r, 1)[0]) in wanted]
    if len(reqs) != len(wanted):
        raise WheelhouseError(f"pyproject.toml must pin each of {', '.join(MODEL_DISTRIBUTIONS)}")
    return reqs


def installed_constraints() -> list[str]:
    """``name==version`` of every distribution installed here except meter-gateway itself."""
    seen: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and _canonical(name) != DIST_NAME:
            seen.setdefault(_canonical(name), f"{name}=={dist.version}")
    return sorted(seen.values())


def platform_tags(platform: str) -> list[str]:
    """The tags pip is to accept for a device: ``manylinux_2_28_aarch64`` takes every manylinux
    wheel a glibc 2.28 device runs (2_17 .. 2_28, and manylinux2014 = 2_17), since pip matches a
    ``--platform`` only exactly."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not m:
        return [platform]
    glibc, arch = int(m.group(1)), m.group(2)
    return [f"manylinux_2_{k}_{arch}" for k in range(glibc, 16, -1)] + [f"manylinux2014_{arch}"]


def pip_version() -> str:
    return metadata.version("pip")


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise WheelhouseError(f"{what} failed (exit {done.returncode}): {' '.join(cmd)}\n{tail}")


def build_project_wheel(dest: Path, repo: Path = REPO) -> Path:
    """Build the meter-gateway wheel from a staged copy with ``gateway/`` only; returns its path."""
    with tempfile.TemporaryDirectory(prefix="metergateway-wheel-") as tmp:
        stage = Path(tmp) / "src"
        stage.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(repo / name, stage / name)
        shutil.copytree(repo / "gateway", stage / "gateway",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
        out = Path(tmp) / "dist"
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
              "--disable-pip-version-check", "--wheel-dir", str(out), str(stage)], "building the meter-gateway wheel")
        wheels = list(out.glob("meter_gateway-*.whl"))
        if len(wheels) != 1:
            raise WheelhouseError(f"building the meter-gateway wheel made {[w.name for w in out.iterdir()]}")
        dest.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy2(wheels[0], dest / wheels[0].name))


def download(requirements: list[str], dest: Path, *, no_deps: bool = False, platform: str | None = None,
             python_version: str | None = None) -> None:
    """``pip download`` the wheels of ``requirements`` (and pip's own) into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "--dest", str(dest)]
    if no_deps:
        cmd.append("--no-deps")
    if platform or python_version:
        version = python_version or f"{sys.version_info[0]}.{sys.version_info[1]}"
        nodot = version.replace(".", "")
        cmd += ["--python-version", version, "--implementation", "cp",
                "--abi", f"cp{nodot}", "--abi", "abi3", "--abi", "none"]
        for tag in platform_tags(platform) if platform else []:
            cmd += ["--platform", tag]
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="constraints-") as constraints:
        constraints.write("\n".join(installed_constraints()) + "\n")
        constraints.flush()
        cmd += ["--constraint", constraints.name, f"pip=={pip_version()}", *requirements]
        _run(cmd, "downloading the wheelhouse")


def make(component: str, dest: Path, *, repo: Path = REPO, platform: str | None = None,
         python_version: str | None = None, requirements: list[str] | None = None) -> list[Path]:
    """Make ``dest`` hold exactly the wheelhouse of ``component`` (``gateway`` or ``model``).

    ``requirements`` replaces the component's own list (tests use a short one).
    """
    if component not in ("gateway", "model"):
        raise WheelhouseError(f"component must be gateway or model, not {component!r}")
    if requirements is None:
        requirements = runtime_requirements(repo) if component == "gateway" else model_requirements(repo)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    build_project_wheel(dest, repo)
    download(requirements, dest, no_deps=component == "model", platform=platform, python_version=python_version)
    return sorted(dest.glob("*.whl"))


def default_dest(component: str, repo: Path = REPO) -> Path:
    """Where a component's wheelhouse goes: inside the folder GDK zips for it."""
    return repo / "wheelhouse" if component == "gateway" else repo / "components" / "model" / "wheelhouse"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m release.wheelhouse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--component", choices=("gateway", "model"), default="gateway")
    parser.add_argument("--platform", help="a pip platform tag, e.g. manylinux2014_aarch64 (default: this machine)")
    parser.add_argument("--python-version", help="the device's Python, e.g. 3.11 (default: this one)")
    args = parser.parse_args(argv)
    dest = default_dest(args.component)
    try:
        wheels = make(args.component, dest, platform=args.platform, python_version=args.python_version)
    except WheelhouseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{dest}: {len(wheels)} wheels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
