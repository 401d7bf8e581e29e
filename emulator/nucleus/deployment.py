"""Local deployments: what ``greengrass-cli deployment create`` asks of the nucleus.

A deployment (``CreateLocalDeployment``) names root components to add (``NAME=VERSION``) or
remove, a ``--recipeDir`` and ``--artifactDir`` (a ``greengrass-build/`` folder's
``recipes/`` and ``artifacts/``), and configuration updates per component
(``{"<name>": {"MERGE": {...}, "RESET": ["/json/pointer", ...]}}``). Deployments run one at a
time, in order (QUEUED → IN_PROGRESS → SUCCEEDED or FAILED), as the nucleus's deployment
service runs them:

1. **Resolve**: the root set is the last local deployment's roots plus those added, minus those
   removed. Each root's recipe, and each dependency's (the highest version meeting every
   ``VersionRequirement``, the one already running when it does), comes from the recipe folder
   or the component store (``<root>/packages/recipes``). ``aws.greengrass.Nucleus`` is this
   nucleus (:data:`NUCLEUS_VERSION`).
2. **Prepare**: recipes are copied into the store, artifacts from
   ``<artifactDir>/<name>/<version>/`` into ``<root>/packages/artifacts/<name>/<version>/``; a
   ``Unarchive: ZIP`` artifact is unpacked into
   ``<root>/packages/artifacts-unarchived/<name>/<version>/<zip name without .zip>/``.
3. **Configuration**, as ``KernelConfigResolver`` does: start from the running configuration
   (none for a new component), remove the keys named by RESET (``""`` is the whole document;
   array elements cannot be reset), merge the recipe's ``DefaultConfiguration`` *under* it
   (existing values win), then merge MERGE over it.
4. **Offer** (policy NOTIFY_COMPONENTS): components subscribed to component updates get a
   ``PreComponentUpdateEvent``; each has :attr:`Deployer.offer_timeout` seconds (60, the
   nucleus's default) to defer. A deferral waits the longest ``recheckAfterMs`` and offers
   again; ``recheckAfterMs`` 0 is consent.
5. **Validate**: a component whose configuration changes and that subscribed to validation gets
   the proposed configuration; a REJECTED report fails the deployment with "Components reported
   that their to-be-deployed configuration is invalid { name = <c>, message = <m> }" and
   nothing is changed.
6. **Apply**: removed components and components whose recipe or artifacts changed are stopped
   (dependents first; HARD dependents restart on their own when the dependency goes), the
   changed ones are installed and started again (dependencies first). A component whose only
   change is its configuration keeps running: its configuration is replaced in place and its
   ``SubscribeToConfigurationUpdate`` watchers get the events. A BROKEN component in the new set
   is started again.
7. **Wait** until every component started by the deployment is RUNNING or FINISHED (a BROKEN one
   fails the deployment: "Service <c> in broken state after deployment"; no rollback, as for a
   local deployment). ``PostComponentUpdateEvent`` follows, also when a step from 5 on failed (as the
   nucleus sends it after its update action whatever the outcome), so a component that held its
   work for the offer goes on.

The result is kept in ``<root>/deployments/<id>.json``; the deployed set (roots, versions,
configurations) in ``<root>/config/deployed.json``, from which the nucleus starts again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import queue
import shutil
import threading
import time
import uuid
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from awsiot.greengrasscoreipc import model

from emulator.nucleus import accesscontrol
from emulator.nucleus import recipe as rcp
from emulator.nucleus.localcli import ComponentInfo, DeploymentInfo
from emulator.nucleus.recipe import Recipe
from emulator.nucleus.runner import BROKEN, FINISHED, RUNNING, Runner

log = logging.getLogger("emulator.nucleus")

NUCLEUS = "aws.greengrass.Nucleus"
NUCLEUS_VERSION = "2.14.0"
QUEUED, IN_PROGRESS, SUCCEEDED, FAILED = "QUEUED", "IN_PROGRESS", "SUCCEEDED", "FAILED"
INVALID_CONFIG = "Components reported that their to-be-deployed configuration is invalid"


class DeploymentFailed(Exception):
    """A deployment that cannot go on; the message is its failure cause."""


@dataclass
class Record:
    deployment_id: str
    status: str
    created_on: str
    request: dict
    failure_cause: str | None = None
    deferrals: list[str] = field(default_factory=list)

    def info(self) -> DeploymentInfo:
        return DeploymentInfo(self.deployment_id, self.status, self.created_on, self.failure_cause)


def request_to_dict(request: model.CreateLocalDeploymentRequest) -> dict:
    return {"group_name": request.group_name,
            "add": dict(request.root_component_versions_to_add or {}),
            "remove": list(request.root_components_to_remove or []),
            "configuration": dict(request.component_to_configuration or {}),
            "recipe_dir": request.recipe_directory_path,
            "artifact_dir": request.artifacts_directory_path}


def _merge_over(target: dict, value: Mapping) -> None:
    for k, v in value.items():
        if isinstance(v, Mapping) and isinstance(target.get(k), dict):
            _merge_over(target[k], v)
        else:
            target[k] = copy.deepcopy(v)


def _merge_under(target: dict, defaults: Mapping) -> None:
    for k, v in defaults.items():
        if k not in target:
            target[k] = copy.deepcopy(v)
        elif isinstance(v, Mapping) and isinstance(target[k], dict):
            _merge_under(target[k], v)


def _reset(config: dict, pointer: str, where: str) -> dict:
    if pointer == "":
        return {}
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.lstrip("/").split("/")]
    node: Any = config
    for p in parts[:-1]:
        if not isinstance(node, dict) or p not in node:
            return config
        node = node[p]
    if isinstance(node, list):
        log.error("%s: RESET %s points to an element of an array, which cannot be reset", where, pointer)
    elif isinstance(node, dict):
        node.pop(parts[-1], None)
    return config


def resolve_configuration(current: Mapping | None, defaults: Mapping, update: Mapping | None, name: str) -> dict:
    """The configuration to deploy (step 3 of the module doc)."""
    config = copy.deepcopy(dict(current or {}))
    update = {str(k).upper(): v for k, v in (update or {}).items()}
    for pointer in update.get("RESET") or []:
        config = _reset(config, str(pointer), name)
    _merge_under(config, defaults)
    merge = update.get("MERGE")
    if merge:
        if not isinstance(merge, Mapping):
            raise DeploymentFailed(f"{name}: the MERGE of the configuration update must be a JSON object, got {merge!r}")
        _merge_over(config, merge)
    return config


def _artifact_digest(folder: Path) -> str:
    h = hashlib.sha256()
    if folder.is_dir():
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                h.update(p.name.encode())
                h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _fingerprint(r: Recipe) -> str:
    return hashlib.sha256(r.fingerprint().encode()).hexdigest()


class Deployer:
    """The deployment queue and the deployed set; the CLI service's hooks call it."""

    def __init__(self, server, runner: Runner, *, offer_timeout: float = 60.0, validate_timeout: float = 30.0,
                 settle_timeout: float = 900.0) -> None:
        self.server = server
        self.runner = runner
        self.layout = runner.layout
        self.offer_timeout = offer_timeout
        self.validate_timeout = validate_timeout
        self.settle_timeout = settle_timeout
        self.roots: dict[str, str] = {}
        self.deployed: dict[str, dict] = {}  # name -> {version, recipe, configuration, digest}
        self.records: dict[str, Record] = {}
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done = threading.Condition(self._lock)

    @property
    def store(self) -> Path:
        return self.layout.root / "packages" / "recipes"

    @property
    def state_file(self) -> Path:
        return self.layout.root / "config" / "deployed.json"

    # -- running
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="deployments", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(30)

    def restore(self) -> list[str]:
        """Load the deployed set and register its components (not started); their names."""
        if not self.state_file.exists():
            return []
        state = json.loads(self.state_file.read_text())
        self.roots = state.get("roots", {})
        for name, entry in state.get("components", {}).items():
            recipe = rcp.load(self.layout.root / entry["recipe"])
            self._register(recipe, entry["configuration"])
            self.runner.add(recipe)
            self.deployed[name] = entry
        return list(self.deployed)

    # -- CLI hooks
    def submit(self, request: dict) -> str:
        deployment_id = str(uuid.uuid4())
        rec = Record(deployment_id, QUEUED, time.strftime("%m/%d/%Y %H:%M:%S"), request)
        with self._lock:
            self.records[deployment_id] = rec
        self._save(rec)
        self._queue.put(deployment_id)
        return deployment_id

    def record(self, deployment_id: str) -> Record | None:
        with self._lock:
            rec = self.records.get(deployment_id)
        if rec is None:
            path = self.layout.root / "deployments" / f"{deployment_id}.json"
            if path.exists():
                rec = Record(**json.loads(path.read_text()))
        return rec

    def wait(self, deployment_id: str, timeout: float) -> Record | None:
        with self._done:
            self._done.wait_for(lambda: self.records[deployment_id].status in (SUCCEEDED, FAILED), timeout)
            return self.records.get(deployment_id)

    def components(self) -> list[ComponentInfo]:
        out = []
        for name in sorted(self.deployed):
            info = self.component(name)
            if info is not None:
                out.append(info)
        return out

    def component(self, name: str) -> ComponentInfo | None:
        entry = self.deployed.get(name)
        service = self.runner.service(name)
        if entry is None or service is None:
            return None
        return ComponentInfo(name, entry["version"], service.state, copy.deepcopy(entry["configuration"]))

    # -- the worker
    def _work(self) -> None:
        while not self._stop.is_set():
            deployment_id = self._queue.get()
            if deployment_id is None:
                return
            rec = self.records[deployment_id]
            self._set(rec, IN_PROGRESS)
            try:
                self.deploy(rec)
            except DeploymentFailed as exc:
                log.error("deployment %s failed: %s", deployment_id, exc)
                self._set(rec, FAILED, str(exc))
            except Exception as exc:  # a bug here must still end the deployment, with its cause
                log.exception("deployment %s failed inside the nucleus", deployment_id)
                self._set(rec, FAILED, f"the local nucleus failed: {exc!r}")
            else:
                log.info("deployment %s succeeded", deployment_id)
                self._set(rec, SUCCEEDED)

    def _set(self, rec: Record, status: str, cause: str | None = None) -> None:
        with self._done:
            rec.status = status
            rec.failure_cause = cause
            self._done.notify_all()
        self._save(rec)

    def _save(self, rec: Record) -> None:
        folder = self.layout.root / "deployments"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{rec.deployment_id}.json").write_text(json.dumps(asdict(rec), indent=2, default=str))

    # -- one deployment
    def _available(self, recipe_dir: Path | None) -> dict[tuple[str, str], Recipe]:
        found: dict[tuple[str, str], Recipe] = {}
        if self.store.is_dir():
            found.update(rcp.load_dir(self.store))
        if recipe_dir is not None:
            if not recipe_dir.is_dir():
                raise DeploymentFailed(f"recipe directory {recipe_dir} does not exist")
            found.update(rcp.load_dir(recipe_dir))
        return found

    def resolve(self, roots: Mapping[str, str], available: Mapping[tuple[str, str], Recipe]) -> dict[str, Recipe]:
        """Every component of the new set, with its recipe (step 1)."""
        chosen: dict[str, Recipe] = {}
        for name, version in roots.items():
            r = available.get((name, version))
            if r is None:
                raise DeploymentFailed(f"no recipe for {name} {version} in the recipe directory or the component store")
            chosen[name] = r
        for _ in range(20):
            needs: dict[str, list[tuple[str, str]]] = {}
            for r in chosen.values():
                for dep, d in r.dependencies.items():
                    needs.setdefault(dep, []).append((r.name, d.requirement))
            changed = False
            for dep, reqs in needs.items():
                ok = lambda v: all(rcp.satisfies(v, req) for _, req in reqs)  # noqa: E731
                said = ", ".join(f"{who} requires {req}" for who, req in reqs)
                if dep == NUCLEUS:
                    if not ok(NUCLEUS_VERSION):
                        raise DeploymentFailed(f"this local nucleus is {NUCLEUS} {NUCLEUS_VERSION}: {said}")
                    continue
                current = chosen.get(dep)
                if current is not None and ok(current.version):
                    continue
                if dep in roots:
                    raise DeploymentFailed(f"{dep} {roots[dep]} does not meet the requirements: {said}")
                versions = sorted((v for n, v in available if n == dep and ok(v)), key=rcp.version_key)
                running = self.deployed.get(dep, {}).get("version")
                if not versions:
                    have = sorted(v for n, v in available if n == dep)
                    raise DeploymentFailed(f"no version of {dep} meets the requirements ({said}); "
                                           f"available: {', '.join(have) or 'none'}")
                pick = running if running in versions else versions[-1]
                chosen[dep] = available[(dep, pick)]
                changed = True
            if not changed:
                break
        wanted: set[str] = set()

        def visit(n: str) -> None:
            if n in wanted or n not in chosen:
                return
            wanted.add(n)
            for d in chosen[n].dependencies:
                visit(d)
        for n in roots:
            visit(n)
        return {n: chosen[n] for n in wanted}

    def _prepare(self, r: Recipe, artifact_dir: Path | None) -> tuple[str, str]:
        """Copy the recipe and artifacts in, unpack; (recipe path under the root, artifacts digest)."""
        self.store.mkdir(parents=True, exist_ok=True)
        dest_recipe = self.store / f"{r.name}-{r.version}.recipe.json"
        dest_recipe.write_text(json.dumps(r.raw, indent=2, default=str))
        dest = self.layout.artifacts(r.name, r.version)
        source = artifact_dir / r.name / r.version if artifact_dir is not None else None
        for a in r.artifacts:
            target = dest / a.filename
            fresh = False
            if source is not None and (source / a.filename).is_file():
                dest.mkdir(parents=True, exist_ok=True)
                if not target.exists() or target.read_bytes() != (source / a.filename).read_bytes():
                    shutil.copy2(source / a.filename, target)
                    fresh = True
            elif not target.is_file():
                where = source / a.filename if source is not None else f"{dest}/{a.filename} (no --artifactDir given)"
                raise DeploymentFailed(f"{r.name} {r.version}: artifact {a.uri} not found at {where}")
            if a.unarchive == "ZIP":
                out = self.layout.unarchived(r.name, r.version) / Path(a.filename).stem
                if out.is_dir() and not fresh:
                    continue
                if out.exists():
                    shutil.rmtree(out)
                out.mkdir(parents=True)
                try:
                    with zipfile.ZipFile(target) as z:
                        z.extractall(out)
                except zipfile.BadZipFile as exc:
                    raise DeploymentFailed(f"{r.name} {r.version}: artifact {a.filename} is not a ZIP: {exc}") from exc
        self.layout.work(r.name).mkdir(parents=True, exist_ok=True)
        return str(dest_recipe.relative_to(self.layout.root)), _artifact_digest(dest)

    def _register(self, r: Recipe, configuration: Mapping, token: str | None = None) -> None:
        try:
            self.server.register_component(r.name, token=token, version=r.version, configuration=configuration)
        except accesscontrol.PolicyError as exc:
            raise DeploymentFailed(f"{r.name}: {exc}") from exc

    def _offer(self, rec: Record) -> None:
        while True:
            deferrals = self.server.lifecycle.offer_update(rec.deployment_id, timeout=self.offer_timeout)
            waits = {c: d for c, d in deferrals.items() if d.recheck_after_ms > 0}
            if not waits:
                return
            longest = max(d.recheck_after_ms for d in waits.values())
            for c, d in waits.items():
                note = f"{c} deferred the update by {d.recheck_after_ms} ms: {d.message or ''}".rstrip(": ")
                rec.deferrals.append(note)
                log.info("deployment %s: %s", rec.deployment_id, note)
            self._save(rec)
            if self._stop.wait(longest / 1000.0):
                raise DeploymentFailed("the nucleus stopped while the update was deferred")

    def deploy(self, rec: Record) -> None:
        req = rec.request
        recipe_dir = Path(req["recipe_dir"]).resolve() if req.get("recipe_dir") else None
        artifact_dir = Path(req["artifact_dir"]).resolve() if req.get("artifact_dir") else None
        roots = dict(self.roots)
        roots.update(req.get("add") or {})
        for name in req.get("remove") or []:
            roots.pop(name, None)
        updates = req.get("configuration") or {}
        available = self._available(recipe_dir)
        new = self.resolve(roots, available)
        unknown = sorted(set(updates) - set(new))
        if unknown:
            raise DeploymentFailed(f"configuration update for {', '.join(unknown)}, which the deployment does not include")

        prepared = {name: self._prepare(r, artifact_dir) for name, r in new.items()}
        configs = {name: resolve_configuration(self.deployed.get(name, {}).get("configuration"),
                                               r.default_configuration, updates.get(name), name)
                   for name, r in new.items()}
        removed = [n for n in self.deployed if n not in new]
        replaced, reconfigured, restart = [], [], []
        for name, r in new.items():
            old = self.deployed.get(name)
            if old is None:
                continue
            if (old["version"] != r.version or old.get("fingerprint") != _fingerprint(r)
                    or old.get("digest") != prepared[name][1]):
                replaced.append(name)
            elif old["configuration"] != configs[name]:
                reconfigured.append(name)
            service = self.runner.service(name)
            if name not in replaced and service is not None and service.state == BROKEN:
                restart.append(name)
        added = [n for n in new if n not in self.deployed]
        if removed or replaced or reconfigured or added:
            self._offer(rec)
        try:
            self._apply(rec, new, roots, prepared, configs, removed, replaced, reconfigured, restart, added)
        finally:
            # Sent whatever the outcome, as the nucleus's UpdateSystemPolicyService does after the
            # update action: a component that held its work for the update goes on.
            self.server.lifecycle.post_update(rec.deployment_id)

    def _apply(self, rec: Record, new: dict[str, Recipe], roots: dict, prepared: dict, configs: dict,
               removed: list, replaced: list, reconfigured: list, restart: list, added: list) -> None:
        """Steps 5 to 7 of the module doc."""
        for name in reconfigured + replaced:
            if self.server.config.has_validator(name):
                proposed = {k: v for k, v in configs[name].items() if k != "accessControl"}
                report = self.server.config.validate(name, proposed, rec.deployment_id, self.validate_timeout)
                if report is not None and report.status == model.ConfigurationValidityStatus.REJECTED:
                    raise DeploymentFailed(f"{INVALID_CONFIG} {{ name = {name}, message = {report.message} }}")

        order = self.runner.order()
        for name in reversed(order):
            if name in removed or name in replaced:
                self.runner.remove(name)
                if name in removed:
                    self.server.unregister_component(name)
                    del self.deployed[name]
        for name in reconfigured:
            config = configs[name]
            if config.get("accessControl") != self.deployed[name]["configuration"].get("accessControl"):
                known = {"iot:thingName": self.server.thing_name}
                try:
                    policies = accesscontrol.parse(config.get("accessControl"), known, where=f"{name}.accessControl")
                except accesscontrol.PolicyError as exc:
                    raise DeploymentFailed(f"{name}: {exc}") from exc
                self.server.acl.set_policies(name, policies)
            self.server.config.replace(name, {k: v for k, v in config.items() if k != "accessControl"})
            self.deployed[name]["configuration"] = config
        started = []
        for name in added + replaced:
            r = new[name]
            token = None
            try:
                token = self.server.component(name).token
            except KeyError:
                pass
            self._register(r, configs[name], token)
            self.runner.add(r)
            self.deployed[name] = {"version": r.version, "recipe": prepared[name][0],
                                   "configuration": configs[name], "digest": prepared[name][1],
                                   "fingerprint": _fingerprint(r)}
            started.append(name)
        self.roots = roots
        self._persist()
        self.runner.start_all(started)
        for name in restart:
            self.runner.service(name).request_restart()
        self._settle(started + restart)

    def _settle(self, names: list[str]) -> None:
        deadline = time.monotonic() + self.settle_timeout
        pending = set(names)
        while pending:
            for name in list(pending):
                s = self.runner.service(name)
                if s is None or s.state in (RUNNING, FINISHED):
                    pending.discard(name)
                elif s.state == BROKEN:
                    raise DeploymentFailed(f"Service {name} in broken state after deployment: {s.status_reason}")
            if pending and (time.monotonic() > deadline or self._stop.wait(0.05)):
                raise DeploymentFailed(f"{', '.join(sorted(pending))} not RUNNING within {self.settle_timeout:g} s")

    def _persist(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"roots": self.roots, "components": self.deployed}, indent=2, default=str))
        tmp.replace(self.state_file)
