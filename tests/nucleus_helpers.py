"""Helpers for the local nucleus's runner and deployment tests: small recipes in tmp folders."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from emulator.nucleus.runner import wait_for

PY = sys.executable


class Project:
    """A --recipeDir and --artifactDir pair that tests fill with components."""

    def __init__(self, base: Path) -> None:
        self.recipes = base / "recipes"
        self.artifacts = base / "artifacts"
        self.recipes.mkdir(parents=True)
        self.artifacts.mkdir(parents=True)

    def component(self, name: str, version: str = "1.0.0", *, lifecycle: dict, deps: dict | None = None,
                  config: dict | None = None, files: dict[str, str] | None = None, zips: dict | None = None) -> dict:
        """Write a recipe (JSON, mixed-case keys as people write them) and its artifacts."""
        artifacts = []
        folder = self.artifacts / name / version
        folder.mkdir(parents=True, exist_ok=True)
        for fname, text in (files or {}).items():
            (folder / fname).write_text(text)
            artifacts.append({"URI": f"s3://bucket/{name}/{version}/{fname}"})
        for zname, members in (zips or {}).items():
            import zipfile

            with zipfile.ZipFile(folder / zname, "w") as z:
                for member, text in members.items():
                    z.writestr(member, text)
            artifacts.append({"Uri": f"s3://bucket/{name}/{version}/{zname}", "Unarchive": "ZIP"})
        recipe = {"RecipeFormatVersion": "2020-01-25", "ComponentName": name, "ComponentVersion": version,
                  "ComponentDependencies": {d: {"VersionRequirement": ">=1.0.0", "DependencyType": t}
                                            for d, t in (deps or {}).items()},
                  "ComponentConfiguration": {"DefaultConfiguration": config or {}},
                  "Manifests": [{"Platform": {"os": "windows"}, "Lifecycle": {"Run": "exit 9"}},
                                {"Platform": {"os": "linux"}, "Lifecycle": lifecycle, "Artifacts": artifacts}]}
        (self.recipes / f"{name}-{version}.json").write_text(json.dumps(recipe))
        return recipe


def short_dir() -> Path:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer
    return Path(tempfile.mkdtemp(prefix="ggn-", dir="/tmp"))


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def wait_lines(path: Path, predicate, timeout: float = 20.0) -> list[str]:
    assert wait_for(lambda: predicate(lines(path)), timeout), f"{path}: {lines(path)}"
    return lines(path)
