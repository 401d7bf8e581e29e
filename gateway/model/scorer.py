"""Load a model folder, prove it is the model this gateway expects, and score feature rows.

A folder (``model.onnx``, ``golden.json``, ``manifest.json``) is accepted only when:

- onnxruntime loads it, with one float input of ``len(FEATURE_NAMES)`` columns and one output;
- its ``feature_names`` metadata equals :data:`gateway.model.features.FEATURE_NAMES`, in order;
- its golden vectors, scored here, match the stored outputs within :data:`GOLDEN_TOLERANCE`.

Anything else raises :class:`gateway.errors.ModelError` saying which check failed, so a hot swap
keeps the running model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gateway.errors import ModelError
from gateway.model.features import FEATURE_NAMES

GOLDEN_TOLERANCE = 1e-4


class Scorer:
    """A verified ONNX model. ``predict_log(X)`` → log1p(expected reading), the cold-start prediction."""

    def __init__(self, model_dir: str | Path, intra_op_threads: int = 1):
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
        path = self.model_dir / "model.onnx"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidProtobuf, NoSuchFile...)
            raise ModelError(f"{path}: cannot load: {exc}") from exc
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(f"{path}: expected 1 input and 1 output, found {len(inputs)} and {len(outputs)}")
        self._input = inputs[0].name
        self._output = outputs[0].name
        width = inputs[0].shape[1] if len(inputs[0].shape) == 2 else None
        if width != len(FEATURE_NAMES):
            raise ModelError(f"{path}: input has {width} columns, features.FEATURE_NAMES has {len(FEATURE_NAMES)}")
        meta = self._session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, str] = dict(meta)
        self._check_features(path)
        self.version: str = meta.get("model_version", "")
        if not self.version:
            raise ModelError(f"{path}: metadata has no model_version")
        self._check_golden()

    def _check_features(self, path: Path) -> None:
        raw = self.metadata.get("feature_names")
        if raw is None:
            raise ModelError(f"{path}: metadata has no feature_names")
        try:
            names = tuple(json.loads(raw))
        except ValueError as exc:
            raise ModelError(f"{path}: metadata feature_names is not JSON: {exc}") from exc
        if names != FEATURE_NAMES:
            diff = next((i for i, (a, b) in enumerate(zip(names, FEATURE_NAMES)) if a != b), min(len(names), len(FEATURE_NAMES)))
            got = names[diff] if diff < len(names) else "(end)"
            want = FEATURE_NAMES[diff] if diff < len(FEATURE_NAMES) else "(end)"
            raise ModelError(f"{path}: feature_names differ from features.FEATURE_NAMES at column {diff}: model has {got!r}, gateway has {want!r}")

    def _check_golden(self) -> None:
        path = self.model_dir / "golden.json"
        try:
            golden = json.loads(path.read_text())
            X = np.array([[np.nan if v is None else v for v in row] for row in golden["rows"]], dtype=np.float32)
            want = np.array(golden["expected"], dtype=np.float64)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{path}: cannot read golden vectors: {exc}") from exc
        if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] != len(FEATURE_NAMES) or len(want) != len(X):
            raise ModelError(f"{path}: golden vectors must be rows of {len(FEATURE_NAMES)} features with one expected output each")
        got = self.predict_log(X)
        diff = float(np.max(np.abs(got - want)))
        if not diff <= GOLDEN_TOLERANCE:
            raise ModelError(f"{path}: golden vectors do not match: max abs diff {diff:.3g} > {GOLDEN_TOLERANCE:g}")

    def predict_log(self, X: np.ndarray) -> np.ndarray:
        """log1p(expected reading) per row of ``X`` (float32, columns FEATURE_NAMES), as float64."""
        X = np.ascontiguousarray(X, dtype=np.float32)
        if len(X) == 0:
            return np.empty(0)
        out = self._session.run([self._output], {self._input: X})[0]
        return out.reshape(-1).astype(np.float64)
