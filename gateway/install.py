"""The Install step of both Greengrass components: an isolated venv from the shipped wheelhouse.

A component's artifact carries a ``wheelhouse/`` folder: every wheel the component needs, pip's
own wheel among them. The recipe's Install step runs this file with the device's ``python3``
(so it uses the standard library only: no venv exists yet)::

    python3 <artifact>/gateway/install.py --wheelhouse <artifact>/wheelhouse --venv {work:path}/venv

It makes a venv at ``--venv`` and installs the wheels into it with
``pip install --no-index --find-links <wheelhouse>``: a device may have no package index to
reach, and Debian's Python refuses ``pip install --user`` (PEP 668). pip runs from its wheel in
the wheelhouse (a wheel is importable as a zip), so the device needs neither python3-pip nor
ensurepip; when the wheelhouse has no pip wheel, ``ensurepip`` makes one (Debian's
``python3-venv``).

Idempotent: the venv records the wheelhouse's hash (every wheel's name and SHA-256, the
interpreter's version and the install options) in ``<venv>/.wheelhouse.sha256``, written last
and atomically. When the record equals the artifact's hash the step does nothing; a venv without
it (a half-built one, killed mid-install) or with another hash is removed and built again.

Exit status 0 on success, 1 with one message on stderr naming what was wrong.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import time
import venv
from pathlib import Path

#: The file in the venv that records which wheelhouse it was built from.
RECORD = ".wheelhouse.sha256"
MIN_PYTHON = (3, 11)


class InstallError(Exception):
    """The install cannot go on; the message says what to do."""


def wheelhouse_hash(wheelhouse: Path, no_deps: bool = False) -> str:
    """SHA-256 over every wheel's name and content, the interpreter's version and the options."""
    wheels = sorted(wheelhouse.glob("*.whl"))
    if not wheels:
        raise InstallError(f"{wheelhouse}: no wheels (*.whl) there; the artifact is incomplete, build it again")
    outer = hashlib.sha256()
    outer.update(f"python {sys.version_info[0]}.{sys.version_info[1]} no_deps={no_deps}\n".encode())
    for wheel in wheels:
        inner = hashlib.sha256()
        with wheel.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                inner.update(block)
        outer.update(f"{wheel.name} {inner.hexdigest()}\n".encode())
    return outer.hexdigest()


def recorded_hash(venv_dir: Path) -> str | None:
    """The hash the venv was built from, or None (no venv, or one never finished)."""
    try:
        text = (venv_dir / RECORD).read_text().strip()
    except OSError:
        return None
    return text if (venv_dir / "bin" / "python").exists() else None


def _apt_hint() -> str:
    return f"python3-venv (on Debian/Ubuntu: sudo apt-get install python3-venv python{sys.version_info[0]}.{sys.version_info[1]}-venv)"


def _make_venv(venv_dir: Path, with_pip: bool) -> None:
    if venv_dir.exists() or venv_dir.is_symlink():
        if not venv_dir.is_dir() or venv_dir.is_symlink():
            raise InstallError(f"{venv_dir}: exists and is not a folder; remove it")
        shutil.rmtree(venv_dir)
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        venv.EnvBuilder(with_pip=with_pip, symlinks=True, clear=True).create(venv_dir)
    except subprocess.CalledProcessError as exc:  # ensurepip failed or is missing
        raise InstallError(f"making the venv at {venv_dir} failed ({exc}); install {_apt_hint()}") from exc
    except OSError as exc:
        raise InstallError(f"making the venv at {venv_dir} failed: {exc}") from exc
    if not (venv_dir / "bin" / "python").exists():
        raise InstallError(f"making the venv at {venv_dir} left no bin/python; install {_apt_hint()}")


def _pip_command(venv_dir: Path, wheelhouse: Path) -> list[str]:
    python = str(venv_dir / "bin" / "python")
    pips = sorted(wheelhouse.glob("pip-*.whl"))
    if pips:
        return [python, str(pips[-1] / "pip")]  # pip runs from its own wheel, as ensurepip does
    return [python, "-m", "pip"]


def install(wheelhouse: Path, venv_dir: Path, *, no_deps: bool = False, check_import: str | None = None,
            out=sys.stdout) -> bool:
    """Make ``venv_dir`` hold exactly the wheels of ``wheelhouse``. Returns False when it already did."""
    if sys.version_info < MIN_PYTHON:
        raise InstallError(f"python3 is {sys.version.split()[0]}; the gateway needs {'.'.join(map(str, MIN_PYTHON))} or later")
    wheelhouse = wheelhouse.resolve()
    if not wheelhouse.is_dir():
        raise InstallError(f"{wheelhouse}: no such folder (the wheelhouse of the artifact)")
    want = wheelhouse_hash(wheelhouse, no_deps)
    venv_dir = venv_dir.absolute()
    if recorded_hash(venv_dir) == want:
        print(f"up to date: {venv_dir} (wheelhouse sha256 {want[:16]})", file=out)
        return False
    started = time.monotonic()
    has_pip_wheel = any(wheelhouse.glob("pip-*.whl"))
    if not has_pip_wheel:
        if importlib.util.find_spec("ensurepip") is None:
            raise InstallError(f"the wheelhouse has no pip wheel and this python3 has no ensurepip; install {_apt_hint()}")
    _make_venv(venv_dir, with_pip=not has_pip_wheel)
    wheels = [str(w) for w in sorted(wheelhouse.glob("*.whl")) if not w.name.startswith("pip-")]
    cmd = _pip_command(venv_dir, wheelhouse) + [
        "install", "--no-index", "--find-links", str(wheelhouse), "--no-cache-dir",
        "--disable-pip-version-check", "--no-warn-script-location", "--quiet", "--no-compile",
    ] + (["--no-deps"] if no_deps else []) + wheels
    env = dict(os.environ, PIP_NO_INPUT="1", PIP_CONFIG_FILE=os.devnull)
    env.pop("PIP_INDEX_URL", None)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
        raise InstallError(f"pip could not install the wheelhouse {wheelhouse} into {venv_dir} "
                           f"(exit {done.returncode}):\n{tail}")
    if check_import:
        probe = subprocess.run([str(venv_dir / "bin" / "python"), "-c", f"import {check_import}"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            raise InstallError(f"the venv {venv_dir} cannot import {check_import}:\n{probe.stderr.strip()}")
    tmp = venv_dir / f"{RECORD}.tmp"
    tmp.write_text(want + "\n")
    os.replace(tmp, venv_dir / RECORD)  # last, atomically: a venv without it is rebuilt
    print(f"installed {len(wheels)} wheels into {venv_dir} in {time.monotonic() - started:.1f} s "
          f"(wheelhouse sha256 {want[:16]})", file=out)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="install.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheelhouse", required=True, type=Path, help="folder of wheels shipped in the artifact")
    parser.add_argument("--venv", required=True, type=Path, help="where the venv goes, e.g. {work:path}/venv")
    parser.add_argument("--no-deps", action="store_true", help="install exactly the wheels, resolving nothing")
    parser.add_argument("--check-import", metavar="MODULE", help="fail unless the venv imports this module")
    args = parser.parse_args(argv)
    try:
        install(args.wheelhouse, args.venv, no_deps=args.no_deps, check_import=args.check_import)
    except InstallError as exc:
        print(f"install.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
