"""Where the shipped model and building metadata are, for commands that do not name them.

``GATEWAY_MODEL_DIR`` and ``GATEWAY_BUILDINGS_CSV`` override the repository's
``models/ashrae-lgbm`` and ``data/building_metadata.csv``. Each function returns None when
the file is not there (an installed package without the repository), never raises.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_NAME = "ashrae-lgbm"


def default_model() -> Path | None:
    """The model folder to use by default, or None."""
    path = Path(os.environ.get("GATEWAY_MODEL_DIR") or REPO / "models" / DEFAULT_MODEL_NAME)
    return path if (path / "model.onnx").is_file() else None


def default_buildings() -> Path | None:
    """The building metadata CSV to use by default, or None."""
    path = Path(os.environ.get("GATEWAY_BUILDINGS_CSV") or REPO / "data" / "building_metadata.csv")
    return path if path.is_file() else None
