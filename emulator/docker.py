"""The demo in Docker, built from nothing: no registry, no bridge, the host's network only.

No image registry can be reached from the machines this runs on, so nothing is pulled:

1. **The base image** is a Debian bookworm root made with ``debootstrap`` (python3, venv,
   mosquitto, openssl, CA certificates) and loaded with ``docker import``. The root is kept as
   a tarball in ``var/docker/`` (git-ignored) so a second run takes seconds; a fresh clone
   makes it again (about a minute).
2. **The wheelhouse** is made on the host with :mod:`release.wheelhouse`, the same code that
   fills the Greengrass artifacts: the runtime dependencies (cached while pyproject.toml and
   the installed versions stay the same), the meter-gateway wheel built from ``gateway/``
   alone, the ``emulator`` extra and the build backend. Images install it with
   ``pip --no-index``; the emulator image keeps it as its only package index, so
   ``gateway build`` works in a container that reaches no index.
3. **Two images** from ``docker/Dockerfile``: ``device`` (the gateway as a device runs it:
   a venv holding the meter-gateway wheel and its dependencies, no emulator code at all) and
   ``emulator`` (the device image plus the repository's ``emulator/``, data and model, which
   runs the demo).
4. **The engine** is a ``dockerd`` of our own: its own socket and run folder in a temporary
   folder, its data root in ``var/docker/engine`` (so image layers are cached between runs),
   ``--bridge=none --iptables=false --ip-forward=false``. Ready when ``docker info``
   answers; stopped by its PID. A lock file lets one engine at a time use the data root.
5. **The stack** is ``docker-compose.yml`` at the repository root, every service with
   ``network_mode: host``: ``demo`` (emulator image) runs ``gateway demo`` and ``gateway``
   (device image, profile ``device``) runs ``gateway run`` on a config of yours.

``python -m emulator.docker demo`` (what ``make docker-demo`` runs) does all five and prints
the demo's output as it comes; ``python -m emulator.docker build`` stops after the images.
Either way the engine is stopped at the end.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
VAR = REPO / "var" / "docker"
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE_FILE = REPO / "docker-compose.yml"

SUITE = "bookworm"
#: What the base image holds beyond debootstrap's minbase.
BASE_PACKAGES = ("python3", "python3-venv", "mosquitto", "openssl", "ca-certificates")
BASE_TARBALL = VAR / f"base-{SUITE}.tar"
BASE_IMAGE = f"meter-gateway/base:{SUITE}"
DEVICE_IMAGE = "meter-gateway/device:latest"
EMULATOR_IMAGE = "meter-gateway/emulator:latest"

#: What the emulator image carries of the repository (files git does not ignore, under these only).
SOURCE_PATHS = ("pyproject.toml", "README.md", "gateway", "emulator", "release", "data", "models",
                "cloud", "recipes", "components", "recipe.yaml", "gdk-config.json")


class DockerError(Exception):
    """A step of the Docker demo failed; the message names the step, the command and its output."""


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(cmd: list[str], what: str, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise DockerError(f"{what} failed (exit {done.returncode}): {' '.join(map(str, cmd))}\n"
                          f"{_tail(done.stdout + done.stderr)}")
    return done


def _tool(name: str, package: str) -> str:
    for candidate in (f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found is None:
        raise DockerError(f"{name} not found: install it with `apt-get install -y {package}` (make system-deps does)")
    return found


def docker_client() -> str:
    """Debian's client (it matches Debian's engine), else whichever ``docker`` is on PATH."""
    return _tool("docker", "docker.io")


# ---------------------------------------------------------------- the engine


class Engine:
    """A ``dockerd`` of our own, with no bridge and no iptables rules::

        with Engine() as engine:
            engine.docker("info")

    ``data_root`` keeps images and the build cache; the socket and the exec root live in a
    temporary folder (a unix socket path must stay under 108 bytes).
    """

    def __init__(self, data_root: Path = VAR / "engine", *, ready_timeout: float = 90.0):
        self.data_root = Path(data_root)
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.run_dir: Path | None = None
        self._lock = None

    @property
    def socket(self) -> Path:
        assert self.run_dir is not None, "the engine is not started"
        return self.run_dir / "docker.sock"

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def env(self) -> dict[str, str]:
        """The environment a client needs to talk to this engine (docker, docker-compose)."""
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0", "COMPOSE_DOCKER_CLI_BUILD": "0"}

    def start(self) -> "Engine":
        dockerd = _tool("dockerd", "docker.io")
        self.data_root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.data_root.parent / f"{self.data_root.name}.lock", "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # one engine at a time on one data root
        self.run_dir = Path(tempfile.mkdtemp(prefix="mgdocker-"))
        log = open(self.run_dir / "dockerd.log", "wb")
        self.proc = subprocess.Popen(
            [dockerd, "--iptables=false", "--ip-forward=false", "--bridge=none",
             "--data-root", str(self.data_root), "--exec-root", str(self.run_dir / "exec"),
             "--pidfile", str(self.run_dir / "dockerd.pid"), "-H", self.host],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        client = docker_client()
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.socket.exists():
                done = subprocess.run([client, "info", "--format", "{{.ServerVersion}}"], env=self.env(),
                                      capture_output=True, text=True)
                if done.returncode == 0:
                    return
            try:  # the pause between checks is a wait on the process: a dead engine ends it at once
                self.proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            else:
                raise DockerError(f"dockerd exited ({self.proc.returncode}) before answering:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DockerError(f"dockerd did not answer `docker info` within {self.ready_timeout:.0f} s:\n"
                                  f"{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return _tail((self.run_dir / "dockerd.log").read_text(errors="replace"), lines)
        except (OSError, TypeError):
            return ""

    def docker(self, *args, what: str | None = None, **kwargs) -> subprocess.CompletedProcess:
        """Run the docker client against this engine; raise :class:`DockerError` on failure."""
        return _run([docker_client(), *args], what or f"docker {args[0]}", env=self.env(), **kwargs)

    def compose(self, *args, what: str | None = None, **kwargs) -> subprocess.CompletedProcess:
        """Run docker-compose on ``docker-compose.yml`` against this engine."""
        cmd = [_tool("docker-compose", "docker-compose"), "--file", str(COMPOSE_FILE),
               "--project-directory", str(REPO), *args]
        return _run(cmd, what or f"docker-compose {args[0]}", env=self.env(), **kwargs)

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # dockerd stops its containers and its containerd on SIGTERM
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self.run_dir is not None:
            _unmount_under(self.run_dir)  # dockerd leaves exec/netns/default (an nsfs mount) behind
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _unmount_under(folder: Path) -> None:
    """Unmount whatever is mounted at or under ``folder``, deepest first."""
    prefix = str(folder.resolve())
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return
    points = [line.split()[4].encode().decode("unicode_escape") for line in lines]
    for point in sorted({p for p in points if p == prefix or p.startswith(prefix + "/")}, key=len, reverse=True):
        subprocess.run(["umount", point], capture_output=True)


# ---------------------------------------------------------------- the base image


def base_tarball(say: Callable[[str], None] = print, *, tarball: Path = BASE_TARBALL) -> Path:
    """The debootstrapped root as a tarball, made once per machine (about a minute)."""
    if tarball.is_file():
        return tarball
    debootstrap = _tool("debootstrap", "debootstrap")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    root = tarball.with_name(tarball.stem + ".rootfs.partial")
    partial = tarball.with_name(tarball.name + ".partial")
    shutil.rmtree(root, ignore_errors=True)
    say(f"· debootstrap {SUITE} ({', '.join(BASE_PACKAGES)}) into {root} (about a minute)")
    started = time.monotonic()
    _run([debootstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, root],
         "debootstrap (it needs a Debian mirror; see var/docker/*.rootfs.partial/debootstrap/debootstrap.log)")
    _run(["tar", "-C", root, "-cf", partial, "."], "packing the base root")
    partial.replace(tarball)
    shutil.rmtree(root, ignore_errors=True)
    say(f"· {tarball} ({tarball.stat().st_size / 1e6:.0f} MB) in {time.monotonic() - started:.0f} s")
    return tarball


def import_base(engine: Engine, say: Callable[[str], None] = print) -> str:
    """``docker import`` the base tarball unless the engine has it already."""
    if engine.docker("images", "-q", BASE_IMAGE).stdout.strip():
        return BASE_IMAGE
    tarball = base_tarball(say)
    say(f"· docker import {tarball.name} {BASE_IMAGE}")
    engine.docker("import", "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                  "--change", "ENV LANG=C.UTF-8", tarball, BASE_IMAGE, what="docker import of the base image")
    return BASE_IMAGE


# ---------------------------------------------------------------- the wheelhouse and the build context


def emulator_requirements(repo: Path = REPO) -> list[str]:
    """The ``emulator`` extra of pyproject.toml, as pinned there."""
    with (repo / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["project"]["optional-dependencies"].get("emulator", []))


def _download_cached(requirements: list[str], dest: Path) -> None:
    """:func:`release.wheelhouse.download` into ``dest`` unless the same request filled it last time."""
    from release import wheelhouse

    key = hashlib.sha256(json.dumps([requirements, wheelhouse.installed_constraints(),
                                     wheelhouse.pip_version()]).encode()).hexdigest()
    stamp = dest / ".request"
    if stamp.is_file() and stamp.read_text() == key:
        return
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    wheelhouse.download(requirements, dest)
    (dest / "requirements.txt").write_text("\n".join(requirements) + "\n")
    stamp.write_text(key)


def build_requirements(repo: Path = REPO) -> list[str]:
    """The ``[build-system] requires`` of pyproject.toml (setuptools), which ``pip wheel`` installs."""
    with (repo / "pyproject.toml").open("rb") as f:
        return list(tomllib.load(f)["build-system"]["requires"])


def _download_build_backend(dest: Path) -> None:
    """The build backend's wheels, so ``gateway build`` in the emulator image builds the
    meter-gateway wheel with no index. Not constrained to the versions installed here: the
    environment's own setuptools may be older than ``[build-system]`` asks for."""
    requirements = build_requirements()
    stamp = dest / ".request"
    if stamp.is_file() and stamp.read_text() == json.dumps(requirements):
        return
    shutil.rmtree(dest, ignore_errors=True)
    _run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--quiet", "--disable-pip-version-check",
          "--dest", dest, *requirements], "downloading the build backend's wheels")
    stamp.write_text(json.dumps(requirements))


def context(say: Callable[[str], None] = print, *, dest: Path = VAR / "context") -> Path:
    """Assemble the build context: ``wheelhouse/{deps,project,emulator,build}`` and ``src/``."""
    from release import wheelhouse

    say("· wheelhouse (release.wheelhouse): runtime dependencies, the meter-gateway wheel, the emulator extra")
    cache = VAR / "wheelhouse"
    _download_cached(wheelhouse.runtime_requirements(), cache / "deps")
    _download_cached(emulator_requirements(), cache / "emulator")
    _download_build_backend(cache / "build")
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "wheelhouse").mkdir(parents=True)
    for part in ("deps", "emulator", "build"):
        shutil.copytree(cache / part, dest / "wheelhouse" / part, ignore=shutil.ignore_patterns(".request"))
    wheelhouse.build_project_wheel(dest / "wheelhouse" / "project")
    (dest / "wheelhouse" / "deps" / "requirements.txt").write_text(
        "\n".join(wheelhouse.runtime_requirements()) + "\n")
    tracked = _run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--",
                    *SOURCE_PATHS], "listing the repository's files")  # the work tree, less what git ignores
    src = dest / "src"
    for name in filter(None, tracked.stdout.split("\0")):
        path = REPO / name
        if path.is_symlink():  # kept as links (recipe.yaml, components/model/models): gateway build reads them so
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).symlink_to(path.readlink())
        elif path.is_file():  # a tracked file deleted in the work tree is left out
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, src / name)
    shutil.copy2(DOCKERFILE, dest / "Dockerfile")
    return dest


def build(engine: Engine, say: Callable[[str], None] = print) -> dict[str, float]:
    """Make the base image, the context and both images; returns the seconds each step took."""
    timings: dict[str, float] = {}
    t = time.monotonic()
    import_base(engine, say)
    timings["base"] = time.monotonic() - t
    t = time.monotonic()
    ctx = context(say)
    timings["wheelhouse"] = time.monotonic() - t
    for target, image in (("device", DEVICE_IMAGE), ("emulator", EMULATOR_IMAGE)):
        t = time.monotonic()
        say(f"· docker build --target {target} -t {image}")
        engine.docker("build", "--network", "host", "--build-arg", f"BASE={BASE_IMAGE}", "--target", target,
                      "-t", image, ctx, what=f"docker build of the {target} image")
        timings[target] = time.monotonic() - t
    return timings


# ---------------------------------------------------------------- the demo


def demo(say: Callable[[str], None] = print) -> tuple[int, str, dict[str, float]]:
    """Build everything and run the compose stack's ``demo`` service; returns (exit code, its output, timings)."""
    with Engine() as engine:
        timings = build(engine, say)
        say("· images built in " + _seconds(timings) + "; docker-compose run --rm demo")
        t = time.monotonic()
        (REPO / "var" / "docker" / "demo").mkdir(parents=True, exist_ok=True)
        lines: list[str] = []
        with subprocess.Popen([_tool("docker-compose", "docker-compose"), "--file", str(COMPOSE_FILE),
                               "--project-directory", str(REPO), "run", "--rm", "-T", "demo"],
                              env=engine.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as proc:
            for line in proc.stdout:
                lines.append(line)
                say(line.rstrip("\n"))
        timings["demo"] = time.monotonic() - t
    return proc.returncode, "".join(lines), timings


def _seconds(timings: dict[str, float]) -> str:
    return ", ".join(f"{step} {seconds:.0f} s" for step, seconds in timings.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emulator.docker", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("demo", "build"), help="demo: build and run the demo; build: images only")
    args = parser.parse_args(argv)
    try:
        if args.what == "build":
            with Engine() as engine:
                print("· images built in " + _seconds(build(engine)))
            return 0
        code, _, _ = demo()  # its output ends with the demo's own summary line
    except DockerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if code != 0:
        print(f"error: the demo's container exited with {code}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
