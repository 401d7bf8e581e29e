"""Ship a model folder: a new ``org.metergateway.Model`` component version, deployed.

``gateway model publish DIR`` turns a trained model folder (``model.onnx``, ``golden.json``,
``manifest.json``) into the next version of the model component, the same way ``gateway build
--component model`` builds the shipped one (:func:`release.build.build`, GDK's layout), but from a
staged copy of the component's project whose ``models/`` holds this folder alone, with its card
regenerated as ``models/README.md``. The folder is verified first with the hot-swap checks
(:class:`gateway.model.scorer.Scorer`): a model a gateway would refuse is never built.

Then, with a local nucleus (``--root``, the emulator's, or a device's ``/greengrass/v2`` whose
``bin/greengrass-cli`` is used), the version is deployed with a local deployment (IPC
``CreateLocalDeployment``, as greengrass-cli does) and waited for. Its version is the next patch
of the model component the nucleus runs (or ``--version``). The gateway, which depends on the
model SOFTly, is not restarted: it hears the new folder announced and swaps the model live.

On AWS it prints, or runs with ``--run``, the steps: ``gdk component publish`` in the staged
project (which uploads the artifact and creates the component version) and ``aws greengrassv2
create-deployment`` with ``cloud/deployment.json`` whose model version is set to the new one.

Building needs the repository (``release/``, ``components/model/``, ``recipes/``): this is a
development-machine command, never run on a device.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from gateway.errors import GatewayError, ModelError

COMPONENT = "org.metergateway.Model"
REPO = Path(__file__).resolve().parents[2]
_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


class PublishError(GatewayError):
    """A model component could not be built, deployed or published; says which step and why."""


@dataclass
class Published:
    component: str
    version: str
    model: str  # the model version of the folder's manifest
    recipes: Path  # --recipeDir
    artifacts: Path  # --artifactDir
    recipe: Path
    project: Path  # the staged GDK project (components/model)
    deployment: str | None = None  # the local deployment's id
    steps: list[str] = field(default_factory=list)  # the AWS steps (shell)


def next_version(current: str | None) -> str:
    """The next patch version after ``current`` (1.0.0 when there is none, as GDK's NEXT_PATCH)."""
    if not current:
        return "1.0.0"
    m = _SEMVER.match(current)
    if not m:
        raise PublishError(f"component version {current!r} is not MAJOR.MINOR.PATCH: give --version")
    return f"{m.group(1)}.{m.group(2)}.{int(m.group(3)) + 1}"


def _verify(model_dir: Path) -> str:
    from gateway.model.scorer import Scorer

    try:
        Scorer(model_dir)
        return json.loads((model_dir / "manifest.json").read_text())["version"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{model_dir / 'manifest.json'}: cannot read its version: {exc}") from exc


def stage(model_dir: Path, dest: Path, repo: Path = REPO) -> Path:
    """A copy of what ``release.build`` reads for the model component, with ``models/`` holding
    ``model_dir`` alone and its card; returns the staged repository root."""
    from gateway.model.card import write_card

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    skip = shutil.ignore_patterns("wheelhouse", "greengrass-build", "zip-build", "__pycache__", "*.pyc", "models")
    for name in ("gateway", "recipes"):
        shutil.copytree(repo / name, dest / name, symlinks=True, ignore=skip)
    shutil.copytree(repo / "components" / "model", dest / "components" / "model", symlinks=True, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo / name, dest / name)
    models = dest / "components" / "model" / "models"
    target = models / model_dir.name
    shutil.copytree(model_dir, target, ignore=shutil.ignore_patterns(".*", "__pycache__"))
    write_card(target, target / "CARD.md")
    write_card(target, models / "README.md")
    return dest


def build_component(model_dir: str | Path, version: str, workdir: str | Path, *, repo: Path = REPO,
                    requirements: list[str] | None = None) -> Published:
    """Verify ``model_dir`` and build it as ``org.metergateway.Model`` ``version`` under ``workdir``."""
    try:
        from release.build import BuildError, build
    except ImportError as exc:
        raise PublishError(f"building a component needs the repository's release package ({exc}): run this "
                           "from a checkout") from None
    model_dir = Path(model_dir).resolve()
    model = _verify(model_dir)
    src = stage(model_dir, Path(workdir) / f"{COMPONENT}-{version}" / "src", repo)
    config = src / "components" / "model" / "gdk-config.json"
    gdk = json.loads(config.read_text())
    gdk["component"][COMPONENT]["version"] = version  # what `gdk component publish` will publish
    config.write_text(json.dumps(gdk, indent=2) + "\n")
    log = io.StringIO()
    try:
        built = build("model", repo=src, version=version, requirements=requirements, out=log)
    except BuildError as exc:
        raise PublishError(f"building {COMPONENT} {version}: {exc}") from exc
    gg = src / "components" / "model" / "greengrass-build"
    return Published(component=built.component, version=version, model=model, recipes=gg / "recipes",
                     artifacts=gg / "artifacts", recipe=built.recipe, project=src / "components" / "model")


# ------------------------------------------------------------------ a local nucleus


def _greengrass_cli(root: Path) -> Path | None:
    cli = root / "bin" / "greengrass-cli"
    return cli if cli.is_file() else None


def _ipc(root: Path):
    try:
        from awsiot import greengrasscoreipc
        from awsiot.greengrasscoreipc.clientv2 import GreengrassCoreIPCClientV2

        from emulator.nucleus.kernel import socket_path, token_path
    except ImportError as exc:
        raise PublishError(f"{root}: no bin/greengrass-cli and no local emulator here ({exc})") from None
    sock, token = socket_path(root), token_path(root)
    if not sock.exists() or not token.exists():
        raise PublishError(f"no nucleus is running on {root} ({sock} or {token} is missing): start one with "
                           f"`gateway nucleus --root {root} --thing NAME`")
    try:
        conn = greengrasscoreipc.connect(ipc_socket=str(sock), authtoken=token.read_text().strip(), timeout=10.0)
    except Exception as exc:  # awscrt raises its own errors for a refused connection
        raise PublishError(f"cannot reach the nucleus on {sock}: {exc}") from exc
    return GreengrassCoreIPCClientV2(client=conn)


def deployed_version(root: str | Path) -> str | None:
    """The ``org.metergateway.Model`` version the nucleus on ``root`` runs, or None."""
    root = Path(root)
    cli = _greengrass_cli(root)
    if cli is not None:
        out = subprocess.run([str(cli), "component", "details", "--name", COMPONENT], capture_output=True,
                             text=True, timeout=60)
        m = re.search(r"Version: (\S+)", out.stdout)
        return m.group(1) if out.returncode == 0 and m else None
    ipc = _ipc(root)
    try:
        for c in ipc.list_components().components or []:
            if c.component_name == COMPONENT:
                return c.version
        return None
    finally:
        ipc.close()


def deployed_model_dir(root: str | Path) -> Path | None:
    """The model folder of the model component the nucleus on ``root`` runs (its unpacked artifact)."""
    version = deployed_version(root)
    if version is None:
        return None
    from gateway.model.announce import model_folder

    base = Path(root) / "packages" / "artifacts-unarchived" / COMPONENT / version / "model" / "models"
    try:
        return model_folder(base)
    except ModelError:
        return None


def deploy_local(published: Published, root: str | Path, wait_s: float = 600) -> str:
    """Deploy ``published`` on the nucleus at ``root`` (merge ``org.metergateway.Model=<version>``),
    wait for the result; returns the deployment id. PublishError when it fails."""
    import time

    root = Path(root)
    merge = f"{COMPONENT}={published.version}"
    cli = _greengrass_cli(root)
    if cli is not None:
        out = subprocess.run([str(cli), "deployment", "create", "--recipeDir", str(published.recipes),
                              "--artifactDir", str(published.artifacts), "--merge", merge],
                             capture_output=True, text=True, timeout=120)
        m = re.search(r"Deployment Id: (\S+)", out.stdout)
        if out.returncode != 0 or not m:
            raise PublishError(f"greengrass-cli deployment create failed: {(out.stdout + out.stderr).strip()}")
        return m.group(1)  # greengrass-cli's status is read with `deployment status`; not waited for here
    from awsiot.greengrasscoreipc.model import GreengrassCoreIPCError

    ipc = _ipc(root)
    try:
        resp = ipc.create_local_deployment(root_component_versions_to_add={COMPONENT: published.version},
                                           recipe_directory_path=str(published.recipes.resolve()),
                                           artifacts_directory_path=str(published.artifacts.resolve()))
        deadline = time.monotonic() + wait_s
        while True:
            d = ipc.get_local_deployment_status(deployment_id=resp.deployment_id).deployment
            if d.status in ("SUCCEEDED", "FAILED"):
                break
            if time.monotonic() > deadline:
                raise PublishError(f"deployment {resp.deployment_id} of {merge}: still {d.status} after {wait_s:g} s")
            time.sleep(0.2)
    except GreengrassCoreIPCError as exc:
        raise PublishError(f"deployment of {merge}: {type(exc).__name__}: {getattr(exc, 'message', exc)}") from exc
    finally:
        ipc.close()
    if d.status != "SUCCEEDED":
        cause = d.deployment_status_details.deployment_failure_cause if d.deployment_status_details else ""
        raise PublishError(f"deployment {resp.deployment_id} of {merge} FAILED: {cause}")
    published.deployment = resp.deployment_id
    return resp.deployment_id


# ------------------------------------------------------------------ AWS


def aws_steps(published: Published, deployment_template: str | Path = REPO / "cloud" / "deployment.json",
              bucket: str | None = None, region: str | None = None) -> list[str]:
    """The shell steps that publish ``published`` with GDK and deploy it to the thing group of
    ``deployment_template`` (its model version set to the new one, written beside the build)."""
    try:
        doc = json.loads(Path(deployment_template).read_text())
        doc["components"][COMPONENT]["componentVersion"] = published.version
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PublishError(f"{deployment_template}: not a create-deployment input naming {COMPONENT}: {exc}") from exc
    out = published.project.parent.parent / f"deployment-{published.version}.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")
    gdk = ["gdk", "component", "publish"] + (["--bucket", bucket] if bucket else []) + (
        ["--region", region] if region else [])
    return [f"cd {shlex.quote(str(published.project))} && {shlex.join(gdk)}",
            f"aws greengrassv2 create-deployment --cli-input-json {shlex.quote('file://' + str(out))}"]


def run_steps(steps: list[str]) -> None:
    """Run the AWS steps in order with ``sh -e``; PublishError names the one that failed."""
    for step in steps:
        if shutil.which(step.split("&&")[-1].split()[0]) is None:
            raise PublishError(f"{step.split('&&')[-1].split()[0]} is not installed (needed for: {step})")
        done = subprocess.run(["sh", "-ec", step])
        if done.returncode != 0:
            raise PublishError(f"step failed (exit {done.returncode}): {step}")


def publish(model_dir: str | Path, *, workdir: str | Path = "var/publish", root: str | Path | None = None,
            version: str | None = None, run: bool = False, requirements: list[str] | None = None,
            repo: Path = REPO, deployment_template: str | Path | None = None, wait_s: float = 600) -> Published:
    """Build ``model_dir`` as the next model component version; deploy it on the nucleus at
    ``root``, or make (and with ``run`` run) the AWS steps."""
    if root is not None:
        version = version or next_version(deployed_version(root))
    elif version is None:
        raise PublishError("give --version for AWS (the next version of org.metergateway.Model in your account: "
                           "aws greengrassv2 list-component-versions --arn arn:aws:greengrass:REGION:ACCOUNT:"
                           "components:org.metergateway.Model), or --root for a local nucleus")
    elif not _SEMVER.match(version):
        raise PublishError(f"--version {version!r} is not MAJOR.MINOR.PATCH")
    published = build_component(model_dir, version, workdir, repo=repo, requirements=requirements)
    if root is not None:
        deploy_local(published, root, wait_s=wait_s)
        return published
    published.steps = aws_steps(published, deployment_template or repo / "cloud" / "deployment.json")
    if run:
        run_steps(published.steps)
    return published
