"""`gateway build` (release/build.py): GDK 1.6.2's greengrass-build/ layout, checked against GDK's schemas."""

import io
import json
import shutil
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from release import build as release_build
from release.build import Project, build

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = next((p for p in (REPO.parent / "shared" / "schemas", Path("/work/shared/schemas")) if p.is_dir()),
               REPO.parent / "shared" / "schemas")
ALLOWED_TOP = {"gateway", "components", "wheelhouse", "data"}


def lower_keys(obj):
    """As GDK's RecipeValidator does before it validates."""
    if isinstance(obj, dict):
        return {k.lower(): lower_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [lower_keys(v) for v in obj]
    return obj


def schema(name: str) -> dict:
    path = SCHEMAS / name
    assert path.is_file(), f"{path}: GDK's schema is missing (shared/schemas beside the repository)"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of what the build reads, plus decoys the excludes must keep out of the zip."""
    root = tmp_path_factory.mktemp("checkout") / "meter-gateway-src"
    root.mkdir()
    for name in ("gateway", "components", "recipes", "models", "data", "emulator", "tests"):
        shutil.copytree(REPO / name, root / name, symlinks=True,
                        ignore=shutil.ignore_patterns("wheelhouse", "greengrass-build", "zip-build"))
    for name in ("gdk-config.json", "pyproject.toml", "README.md", "recipe.yaml"):
        src = REPO / name
        if src.is_symlink():
            (root / name).symlink_to(src.readlink())
        else:
            shutil.copy2(src, root / name)
    (root / ".venv" / "lib").mkdir(parents=True)
    (root / ".venv" / "lib" / "x.py").write_text("")
    (root / "gateway" / "__pycache__").mkdir(exist_ok=True)
    (root / "gateway" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def built(project):
    # A wheelhouse of the meter-gateway wheel and pip only keeps this fast; the full one is the
    # same code path with pyproject's pinned dependencies.
    out = io.StringIO()
    gateway = build("gateway", repo=project, requirements=[], out=out)
    model = build("model", repo=project, requirements=[], version="0.1.0", out=out)
    return gateway, model


def members(zip_path: Path) -> list[str]:
    return zipfile.ZipFile(zip_path).namelist()


def test_gateway_layout_is_gdks(built, project):
    gateway, _ = built
    gg = project / "greengrass-build"
    assert sorted(str(p.relative_to(gg)) for p in gg.rglob("*") if p.is_file()) == [
        "artifacts/org.metergateway.Gateway/NEXT_PATCH/meter-gateway.zip", "recipes/gateway.yaml"]
    assert gateway.version == "NEXT_PATCH"  # as GDK builds it; publish picks the next patch


def test_model_layout_with_a_version(built, project):
    _, model = built
    gg = project / "components" / "model" / "greengrass-build"
    assert sorted(str(p.relative_to(gg)) for p in gg.rglob("*") if p.is_file()) == [
        "artifacts/org.metergateway.Model/0.1.0/model.zip", "recipes/model.yaml"]
    recipe = yaml.safe_load(model.recipe.read_text())
    assert recipe["ComponentVersion"] == "0.1.0"


@pytest.mark.parametrize("which", [0, 1])
def test_built_recipes_are_valid_and_small(built, which):
    recipe_file = built[which].recipe
    assert recipe_file.stat().st_size < 16_000
    jsonschema.Draft7Validator(schema("greengrass-recipe.schema.json")).validate(
        lower_keys(yaml.safe_load(recipe_file.read_text())))


@pytest.mark.parametrize("template", ["gateway.yaml", "model.yaml"])
def test_templates_are_under_gdks_limit(template):
    assert (REPO / "recipes" / template).stat().st_size <= release_build.MAX_RECIPE_BYTES


@pytest.mark.parametrize("config", ["gdk-config.json", "components/model/gdk-config.json"])
def test_gdk_configs_are_valid(config):
    jsonschema.validate(json.loads((REPO / config).read_text()), schema("gdk-config.schema.json"))


def test_recipe_keys_come_from_gdk_config_and_uris_are_rewritten(built):
    gateway, model = built
    for b, zip_name in ((gateway, "meter-gateway.zip"), (model, "model.zip")):
        recipe = yaml.safe_load(b.recipe.read_text())
        assert recipe["ComponentName"] == b.component
        assert recipe["ComponentPublisher"] == "meter-gateway"
        (artifact,) = recipe["Manifests"][0]["Artifacts"]
        assert artifact["URI"] == f"s3://BUCKET_NAME/COMPONENT_NAME/COMPONENT_VERSION/{zip_name}"
        assert [a.name for a in b.artifacts] == [zip_name]


def test_gateway_zip_holds_only_what_runs_on_the_device(built):
    names = members(built[0].artifacts[0])
    assert {n.split("/")[0] for n in names} <= ALLOWED_TOP
    for must in ("gateway/install.py", "gateway/runner.py", "components/gateway/main.py",
                 "data/building_metadata.csv"):
        assert must in names
    assert any(n.startswith("wheelhouse/meter_gateway-") for n in names)
    assert any(n.startswith("wheelhouse/pip-") for n in names)
    for banned in ("emulator/", "tests/", ".venv/", "components/model/", "recipes/", "release/"):
        assert not [n for n in names if n.startswith(banned)], banned
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or "/." in f"/{n}"]


def test_model_zip_holds_the_model_and_its_announcer(built):
    names = members(built[1].artifacts[0])
    for must in ("main.py", "install.py", "models/README.md", "models/ashrae-lgbm/model.onnx",
                 "models/ashrae-lgbm/golden.json", "models/ashrae-lgbm/manifest.json"):
        assert must in names
    assert {n.split("/")[1] for n in names if n.startswith("wheelhouse/") and n != "wheelhouse/"} == {
        w.name for w in built[1].wheels}
    assert "recipe.yaml" not in names and "gdk-config.json" not in names


def test_meter_gateway_wheel_ships_gateway_alone(built):
    (wheel,) = [w for w in built[0].wheels if w.name.startswith("meter_gateway-")]
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"gateway", "meter_gateway-0.1.0.dist-info"}


def test_zip_name_rules(tmp_path):
    def project(options):
        return Project(root=tmp_path / "my-folder", name="org.x.Y", version="1.0.0", publisher="",
                       options=options, recipe=tmp_path / "recipe.yaml")

    assert project({}).zip_name() == "my-folder"
    assert project({"excludes": ["a"]}).zip_name() == "my-folder"
    assert project({"zip_name": ""}).zip_name() == "org.x.Y"
    assert project({"zip_name": "z"}).zip_name() == "z"
    assert project({}).excludes() == ["gdk-config.json", "greengrass-build", "recipe.yaml",
                                      "**/test*", "**/.*", "**/node_modules"]
    assert project({"zip_name": "z"}).excludes() == ["gdk-config.json", "greengrass-build", "recipe.yaml"]


def test_oversized_recipe_is_refused(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    (root / "gdk-config.json").write_text(json.dumps({"component": {"org.x.Y": {
        "author": "a", "version": "1.0.0", "build": {"build_system": "zip"}, "publish": {"bucket": "b"}}},
        "gdk_version": "1.6.2"}))
    (root / "recipe.yaml").write_text("RecipeFormatVersion: '2020-01-25'\n# " + "x" * 16_000 + "\n")
    p = Project.load(root)
    with pytest.raises(release_build.BuildError, match=r"16000 bytes"):
        release_build.transform_recipe(p, "1.0.0", tmp_path, tmp_path)


def test_deployment_names_both_components_with_policies():
    doc = json.loads((REPO / "cloud" / "deployment.json").read_text())
    assert doc["targetArn"].split(":")[5].startswith("thinggroup/")
    assert {"org.metergateway.Gateway", "org.metergateway.Model"} <= set(doc["components"])
    merge = json.loads(doc["components"]["org.metergateway.Gateway"]["configurationUpdate"]["merge"])
    assert merge["publisher"]["type"] == "ipc"
    nucleus = json.loads(doc["components"]["aws.greengrass.Nucleus"]["configurationUpdate"]["merge"])
    assert nucleus == {"interpolateComponentConfiguration": True}  # {iot:thingName} in accessControl
    assert doc["deploymentPolicies"]["componentUpdatePolicy"]["action"] == "NOTIFY_COMPONENTS"
    assert doc["deploymentPolicies"]["failureHandlingPolicy"] == "ROLLBACK"
