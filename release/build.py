"""``gateway build``: what ``gdk component build`` makes (GDK 1.6.2, zip build system), without GDK.

Each component is a GDK project: a folder with ``gdk-config.json`` and ``recipe.yaml``. The
gateway's is the repository root, the model's is ``components/model/`` (GDK reads only the
first component of a config, so there are two). Each ``recipe.yaml`` is a symlink to its
template in ``recipes/``; GDK resolves it, so the built recipe is named after the template
(``gateway.yaml``, ``model.yaml``).

The build, step by step as GDK's ``BuildCommand``, ``Zip`` and ``BuildRecipeTransformer`` do it:

1. ``greengrass-build/`` is removed and made again with ``recipes/`` and
   ``artifacts/<component name>/<version>/``; ``version`` is the config's, so ``NEXT_PATCH``
   stays ``NEXT_PATCH`` here (``gdk component publish`` replaces it with the next patch version
   of the component in the cloud, or 1.0.0). ``--version`` gives a real one for a local deploy.
2. The project folder is copied to ``zip-build/<folder name>/`` leaving out, as glob patterns
   from the folder (``**`` recursive): ``gdk-config.json``, ``greengrass-build``, the recipe's
   file name, and then either the config's ``build.options.excludes`` or, when the config has
   no ``build.options`` at all, GDK's defaults ``**/test*``, ``**/.*``, ``**/node_modules``.
   (A ``zip_name`` alone drops the defaults too: our configs list every exclude.)
3. The copy is zipped (``shutil.make_archive``, members relative to the copy) as
   ``zip-build/<zip_name>.zip``: ``zip_name`` if set, the component name if set to ``""``,
   else the project folder's name.
4. The recipe (at most 16,000 bytes, or it is refused) gets ``ComponentName``,
   ``ComponentVersion`` and ``ComponentPublisher`` (the config's ``author``) from the config,
   keys matched case-insensitively and keeping their spelling. Each artifact whose URI starts
   with ``s3://`` is looked up by file name in the build folders (``zip-build/`` beside every
   ``gdk-config.json`` under the project); when found it is copied to the artifacts folder and
   its URI becomes ``s3://BUCKET_NAME/COMPONENT_NAME/COMPONENT_VERSION/<file>`` (GDK would next
   look on S3; here a missing one is an error). The recipe is written in its own format
   (YAML by ``yaml.safe_dump(sort_keys=False)``, so the template's comments do not survive).

Before step 2 the component's wheelhouse is made in the project folder (see
:mod:`release.wheelhouse`); a real ``gdk component build`` zips the one found there.
``greengrass-build/`` is what ``greengrass-cli deployment create --recipeDir
greengrass-build/recipes --artifactDir greengrass-build/artifacts`` takes.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from release import wheelhouse

REPO = Path(__file__).resolve().parents[1]
#: GDK's MAX_RECIPE_FILE_SIZE_BYTES.
MAX_RECIPE_BYTES = 16_000
GDK_CONFIG = "gdk-config.json"
BUILD_DIR = "greengrass-build"
ZIP_BUILD = "zip-build"
DEFAULT_EXCLUDES = ["**/test*", "**/.*", "**/node_modules"]
S3_PREFIX = "s3://"
BUILT_URI = "s3://BUCKET_NAME/COMPONENT_NAME/COMPONENT_VERSION"
PROJECTS = {"gateway": Path("."), "model": Path("components/model")}


class BuildError(Exception):
    """The build cannot go on; the message names the file and what is wrong."""


@dataclass
class Built:
    component: str
    version: str
    recipe: Path
    artifacts: list[Path]
    wheels: list[Path]


@dataclass
class Project:
    """One GDK project folder and what its gdk-config.json says."""

    root: Path
    name: str
    version: str
    publisher: str
    options: dict
    recipe: Path

    @classmethod
    def load(cls, root: Path) -> "Project":
        config_file = root / GDK_CONFIG
        try:
            config = json.loads(config_file.read_text())
            (name, component), = config["component"].items()
            build = component["build"]
        except FileNotFoundError as exc:
            raise BuildError(f"{config_file}: not found") from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BuildError(f"{config_file}: not a GDK config with one component and a build section ({exc})") from exc
        if build.get("build_system") != "zip":
            raise BuildError(f"{config_file}: component.{name}.build.build_system must be zip")
        recipes = [p for p in (root / "recipe.json", root / "recipe.yaml") if p.exists()]
        if len(recipes) != 1:
            raise BuildError(f"{root}: needs exactly one of recipe.json, recipe.yaml (found {len(recipes)})")
        return cls(root=root, name=name, version=component.get("version", "NEXT_PATCH"),
                   publisher=component.get("author", ""), options=build.get("options", {}) or {},
                   recipe=recipes[0].resolve())

    def excludes(self) -> list[str]:
        patterns = [GDK_CONFIG, BUILD_DIR, self.recipe.name]
        return patterns + (self.options.get("excludes", []) if self.options else DEFAULT_EXCLUDES)

    def zip_name(self) -> str:
        setting = self.options.get("zip_name")
        if setting is None:
            return self.root.name
        return setting or self.name


def _ignored(root: Path, patterns: list[str]) -> set[str]:
    found: set[str] = set()
    for pattern in patterns:
        found |= set(glob.glob(f"{root}{os.path.sep}{pattern}", recursive=True))
    return found


def make_zip(project: Project) -> Path:
    """Steps 2 and 3: the project folder, less the excludes, as ``zip-build/<zip_name>.zip``."""
    zip_build = (project.root / ZIP_BUILD).resolve()
    copy = zip_build / project.root.name
    shutil.rmtree(zip_build, ignore_errors=True)
    unwanted = _ignored(project.root, project.excludes())

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {n for n in names
                if str(Path(folder) / n) in unwanted or f"{Path(folder) / n}{os.path.sep}" in unwanted}

    shutil.copytree(project.root, copy, ignore=ignore)
    return Path(shutil.make_archive(str(zip_build / project.zip_name()), "zip", root_dir=copy))


def _set(mapping: dict, key: str, value: Any) -> None:
    """Set ``key`` case-insensitively, keeping an existing key's spelling (GDK's update_value)."""
    for existing in mapping:
        if existing.lower() == key.lower():
            mapping[existing] = value
            return
    mapping[key] = value


def _get(mapping: dict, key: str) -> Any:
    for existing, value in mapping.items():
        if existing.lower() == key.lower():
            return value
    return None


def _build_folders(project: Project) -> list[Path]:
    configs = {p.parent for p in project.root.resolve().rglob(GDK_CONFIG)}
    return sorted(d / ZIP_BUILD for d in configs if (d / ZIP_BUILD).exists())


def transform_recipe(project: Project, version: str, artifacts_dir: Path, recipes_dir: Path) -> tuple[Path, list[Path]]:
    """Step 4: the built recipe in ``recipes_dir``; returns it and the artifacts copied."""
    size = project.recipe.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise BuildError(f"{project.recipe}: {size} bytes; GDK refuses a recipe over {MAX_RECIPE_BYTES} bytes")
    text = project.recipe.read_text(encoding="utf-8")
    try:
        recipe = json.loads(text) if project.recipe.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise BuildError(f"{project.recipe}: not valid {project.recipe.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(recipe, dict):
        raise BuildError(f"{project.recipe}: a recipe must be a mapping")
    _set(recipe, "ComponentName", project.name)
    _set(recipe, "ComponentVersion", version)
    _set(recipe, "ComponentPublisher", project.publisher)
    copied: list[Path] = []
    folders = _build_folders(project)
    for manifest in _get(recipe, "Manifests") or []:
        for artifact in _get(manifest, "Artifacts") or []:
            uri = _get(artifact, "URI")
            if not isinstance(uri, str) or not uri.startswith(S3_PREFIX):
                continue
            file_name = Path(uri).name
            source = next((f / file_name for f in folders if (f / file_name).is_file()), None)
            if source is None:
                raise BuildError(f"{project.recipe}: artifact {uri}: no {file_name} in {[str(f) for f in folders]} "
                                 "(GDK would look for that URI on S3)")
            copied.append(Path(shutil.copy(source, artifacts_dir)))
            _set(artifact, "Uri", f"{BUILT_URI}/{file_name}")
    out = recipes_dir / project.recipe.name
    if project.recipe.suffix == ".json":
        out.write_text(json.dumps(recipe, indent=4), encoding="utf-8")
    else:
        with out.open("w", encoding="utf-8") as f:
            yaml.safe_dump(recipe, f, sort_keys=False)
    return out, copied


def build(component: str = "gateway", *, repo: Path = REPO, version: str | None = None, platform: str | None = None,
          python_version: str | None = None, requirements: list[str] | None = None, out=sys.stdout) -> Built:
    """Build one component into ``<project>/greengrass-build/``, as ``gdk component build`` would.

    ``requirements`` replaces the wheelhouse's own list (tests use a short one).
    """
    if component not in PROJECTS:
        raise BuildError(f"component must be one of {', '.join(PROJECTS)}, not {component!r}")
    project = Project.load((repo / PROJECTS[component]).resolve())
    version = version or project.version
    try:
        wheels = wheelhouse.make(component, project.root / "wheelhouse", repo=repo, platform=platform,
                                 python_version=python_version, requirements=requirements)
    except wheelhouse.WheelhouseError as exc:
        raise BuildError(str(exc)) from exc
    print(f"wheelhouse: {len(wheels)} wheels in {project.root / 'wheelhouse'}", file=out)
    gg_build = project.root / BUILD_DIR
    shutil.rmtree(gg_build, ignore_errors=True)
    recipes_dir = gg_build / "recipes"
    artifacts_dir = gg_build / "artifacts" / project.name / version
    recipes_dir.mkdir(parents=True)
    artifacts_dir.mkdir(parents=True)
    archive = make_zip(project)
    print(f"zip: {archive} ({archive.stat().st_size / 1e6:.1f} MB)", file=out)
    recipe, artifacts = transform_recipe(project, version, artifacts_dir, recipes_dir)
    print(f"recipe: {recipe}", file=out)
    for artifact in artifacts:
        print(f"artifact: {artifact}", file=out)
    return Built(component=project.name, version=version, recipe=recipe, artifacts=artifacts, wheels=wheels)
