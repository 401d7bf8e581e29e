"""Recipes: a component's name, version, dependencies, default configuration, lifecycle, artifacts.

A recipe is YAML or JSON. Its keys are case-insensitive, as the nucleus reads them
(``componentName`` and ``ComponentName`` are one key); the ``DefaultConfiguration`` below them
is the component's and keeps its case. Of ``Manifests`` the first whose ``Platform`` fits this
machine (``os`` linux or ``*``/``all``; ``architecture``, when given, this one) is used; its
``Lifecycle`` (or the recipe's top-level one) and ``Artifacts``.

Lifecycle steps (``Install``, ``Startup``, ``Run``, ``Shutdown``) are a script string or
``{Script, Timeout, RequiresPrivilege, Setenv}``; defaults are the nucleus's: install 120 s,
startup 120 s, shutdown 15 s, run none. ``Setenv`` at the lifecycle level applies to every step.

:func:`interpolate` replaces the recipe variables in a script or a Setenv value:
``{artifacts:path}``, ``{artifacts:decompressedPath}``, ``{configuration:/json/pointer}``,
``{work:path}``, ``{kernel:rootPath}``, ``{iot:thingName}``, and ``{<dep>:artifacts:path}``,
``{<dep>:artifacts:decompressedPath}``, ``{<dep>:configuration:/pointer}`` for a declared
dependency. A variable the nucleus would not know (another namespace, a component that is not
a dependency) is left as written, as the nucleus leaves it; a configuration key that does not
exist becomes the empty string.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from gateway.errors import GatewayError

STEPS = ("install", "startup", "run", "shutdown")
DEFAULT_TIMEOUTS = {"install": 120.0, "startup": 120.0, "shutdown": 15.0, "run": None}
HARD, SOFT = "HARD", "SOFT"
ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "aarch64", "arm64": "aarch64", "armv7l": "arm",
        "armv8l": "arm", "i686": "x86", "i386": "x86"}


class RecipeError(GatewayError):
    """A recipe that cannot be read; the message names the file and the key."""


@dataclass(frozen=True)
class Step:
    script: str
    timeout: float | None
    requires_privilege: bool = False
    setenv: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Artifact:
    uri: str
    unarchive: str = "NONE"  # ZIP or NONE

    @property
    def filename(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Dependency:
    requirement: str
    type: str = HARD


@dataclass
class Recipe:
    name: str
    version: str
    dependencies: dict[str, Dependency]
    default_configuration: dict
    steps: dict[str, Step]
    setenv: dict[str, str]
    artifacts: list[Artifact]
    source: Path | None = None
    raw: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """What makes two recipes the same component version (its whole content)."""
        return json.dumps(self.raw, sort_keys=True, default=str)


def _lower(value: Any, keep: frozenset[str] = frozenset({"defaultconfiguration", "setenv", "componentdependencies"})) -> Any:
    """Lower-case the keys of recipe structure, not of the component's own data."""
    if isinstance(value, list):
        return [_lower(v, keep) for v in value]
    if not isinstance(value, Mapping):
        return value
    out = {}
    for k, v in value.items():
        lk = str(k).lower()
        if lk in keep:
            out[lk] = v if lk != "componentdependencies" else {
                name: _lower(dep, keep) for name, dep in (v or {}).items()}
        else:
            out[lk] = _lower(v, keep)
    return out


def _platform_fits(plat: Mapping | None) -> bool:
    if not plat:
        return True
    os_name = str(plat.get("os", "*")).lower()
    if os_name not in ("linux", "*", "all"):
        return False
    arch = plat.get("architecture")
    if arch and str(arch).lower() not in ("*", "all"):
        return str(arch).lower() == ARCH.get(platform.machine().lower(), platform.machine().lower())
    return True


def _step(name: str, value: Any, where: str) -> Step | None:
    if value is None:
        return None
    if isinstance(value, str):
        return Step(value, DEFAULT_TIMEOUTS[name])
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where}: lifecycle step {name} must be a script or a mapping with Script, got {value!r}")
    script = value.get("script")
    if not isinstance(script, str):
        raise RecipeError(f"{where}: lifecycle step {name} has no Script")
    timeout = value.get("timeout", DEFAULT_TIMEOUTS[name])
    try:
        timeout = None if timeout is None else float(timeout)
    except (TypeError, ValueError):
        raise RecipeError(f"{where}: {name}.Timeout {timeout!r} is not a number of seconds") from None
    privileged = str(value.get("requiresprivilege", False)).lower() == "true"
    return Step(script, timeout, privileged, {str(k): str(v) for k, v in (value.get("setenv") or {}).items()})


def parse(raw: Any, where: str = "recipe", source: Path | None = None) -> Recipe:
    """A :class:`Recipe` from the parsed YAML/JSON document; RecipeError names ``where``."""
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{where}: a recipe is a mapping, got {type(raw).__name__}")
    r = _lower(raw)
    name, version = r.get("componentname"), r.get("componentversion")
    if not isinstance(name, str) or not name:
        raise RecipeError(f"{where}: ComponentName is missing")
    if version is None:
        raise RecipeError(f"{where}: ComponentVersion is missing")
    deps = {}
    for dep, spec in (r.get("componentdependencies") or {}).items():
        spec = spec or {}
        dtype = str(spec.get("dependencytype", HARD)).upper()
        if dtype not in (HARD, SOFT):
            raise RecipeError(f"{where}: ComponentDependencies.{dep}.DependencyType {dtype!r} is not HARD or SOFT")
        deps[dep] = Dependency(str(spec.get("versionrequirement", "*")), dtype)
    conf = (r.get("componentconfiguration") or {}).get("defaultconfiguration") or {}
    if not isinstance(conf, Mapping):
        raise RecipeError(f"{where}: ComponentConfiguration.DefaultConfiguration must be a mapping")
    manifest: Mapping = {}
    manifests = r.get("manifests") or []
    if manifests:
        fits = [m for m in manifests if _platform_fits((m or {}).get("platform"))]
        if not fits:
            raise RecipeError(f"{where}: no manifest fits this platform (os linux, {platform.machine()})")
        manifest = fits[0] or {}
    lifecycle = manifest.get("lifecycle") or r.get("lifecycle") or {}
    steps = {}
    for s in STEPS:
        step = _step(s, lifecycle.get(s), where)
        if step is not None:
            steps[s] = step
    setenv = {str(k): str(v) for k, v in (lifecycle.get("setenv") or {}).items()}
    artifacts = [Artifact(str(a["uri"]), str(a.get("unarchive", "NONE")).upper())
                 for a in manifest.get("artifacts") or [] if a and a.get("uri")]
    return Recipe(name, str(version), deps, dict(conf), steps, setenv, artifacts, source, dict(raw))


def load(path: str | Path) -> Recipe:
    """Read a recipe file (``.yaml``, ``.yml`` or ``.json``)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path}: cannot read the recipe: {exc}") from exc
    return parse(raw, str(path), path)


def load_dir(folder: str | Path) -> dict[tuple[str, str], Recipe]:
    """Every recipe in a folder (a --recipeDir), by (name, version)."""
    out = {}
    for p in sorted(Path(folder).iterdir()):
        if p.suffix.lower() in (".yaml", ".yml", ".json") and p.is_file():
            r = load(p)
            out[(r.name, r.version)] = r
    return out


# -- versions ---------------------------------------------------------------------------------

def _vkey(v: str) -> tuple:
    core = v.split("+", 1)[0]
    main, _, pre = core.partition("-")
    nums = tuple(int(x) if x.isdigit() else 0 for x in (main.split(".") + ["0", "0"])[:3])
    return nums + ((1,) if not pre else (0, pre))


def version_key(v: str) -> tuple:
    return _vkey(v)


def satisfies(version: str, requirement: str) -> bool:
    """Whether ``version`` meets an npm-style requirement (``>=1.0.0 <2.0.0``, ``^1.2``, ``~1.2.3``, ``1.0.0``, ``*``)."""
    req = (requirement or "*").strip()
    if req in ("", "*", "x"):
        return True
    for alternative in req.split("||"):
        if all(_clause(version, c) for c in alternative.split()):
            return True
    return False


def _clause(version: str, clause: str) -> bool:
    m = re.match(r"^(>=|<=|>|<|=|\^|~)?v?(.+)$", clause)
    if not m:
        return False
    op, target = m.group(1) or "=", m.group(2)
    if target in ("*", "x"):
        return True
    v, t = _vkey(version), _vkey(target)
    if op == "^":
        upper = (t[0] + 1, 0, 0) if t[0] else ((0, t[1] + 1, 0) if t[1] else (0, 0, t[2] + 1))
        return t <= v < upper + (0,)
    if op == "~":
        return t <= v < (t[0], t[1] + 1, 0, 0)
    return {"=": v[:3] == t[:3] and v == t, ">=": v >= t, "<=": v <= t, ">": v > t, "<": v < t}[op]


# -- interpolation ----------------------------------------------------------------------------

VARIABLE = re.compile(r"\{(?:([^{}:\s]+):)?(artifacts|configuration|work|kernel|iot):([^{}]+)\}")


@dataclass(frozen=True)
class Context:
    """What a component's variables resolve to."""

    name: str
    artifacts_path: Path
    decompressed_path: Path
    work_path: Path
    root_path: Path
    thing_name: str
    configuration: Mapping


def pointer(config: Any, ptr: str) -> tuple[bool, Any]:
    """The value at a JSON pointer (``/a/b``) of ``config``."""
    node = config
    if ptr in ("", "/"):
        return True, node
    for part in ptr.lstrip("/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return "" if value is None else str(value)


def interpolate(text: str, own: Context, deps: Mapping[str, Context] | None = None) -> str:
    """Replace the recipe variables in ``text`` (see the module doc); ``deps`` by dependency name."""
    deps = deps or {}

    def one(m: re.Match) -> str:
        comp, ns, key = m.group(1), m.group(2), m.group(3)
        if comp is not None:
            ctx = deps.get(comp)
            if ctx is None or ns not in ("artifacts", "configuration"):
                return m.group(0)
        else:
            ctx = own
        if ns == "artifacts":
            if key == "path":
                return str(ctx.artifacts_path)
            if key == "decompressedPath":
                return str(ctx.decompressed_path)
        elif ns == "configuration":
            found, value = pointer(ctx.configuration, key)
            return _text(value) if found else ""
        elif ns == "work" and key == "path":
            return str(ctx.work_path)
        elif ns == "kernel" and key == "rootPath":
            return str(ctx.root_path)
        elif ns == "iot" and key == "thingName":
            return ctx.thing_name
        return m.group(0)

    return VARIABLE.sub(one, text)


Resolver = Callable[[str], Context]
