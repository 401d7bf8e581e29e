"""The zero-state model: a classifier of "this meter reads 0 now", beside the consumption model.

About 10 % of the fleet's readings are exactly 0 (a meter off, broken, or a loop shut for the
season). One regression cannot serve both uses of the model's output: trained on every reading it
learns to hedge towards 0 (better RMSLE of the model alone, 1.56 on unseen buildings), trained
without the known-bad zero stretches it predicts what a working meter uses (a 0 then stands out,
but the model alone scores 1.75 on all readings). With the zero state the model is two parts:

- ``level``: the regression of log1p(reading) fitted on the non-zero readings only: what the meter
  uses when it is on;
- ``p_zero``: a LightGBM binary classifier on every reading: the chance that it reads 0.

The output stays one number, log1p(expected) = (1 − p_zero) · level, the expectation of
log1p(reading) under the two parts, which is what RMSLE rewards. Both parts go into the one ONNX
graph (:func:`append_to_graph`), so the gateway, the hot-swap checks and the scorer see the same
input and output as for a plain model. ``gateway model train`` and ``gateway cycle`` train it by
default (``--no-zero-state``, ``cycle.zero_state: false`` for the regression alone); ``gateway model
quality`` compares it with the plain recipes: only the zero-state model is at least as good as a
plain regression on every reading in each view, and as sharp on dropouts as the working-meter one.

It needs data: trained on a handful of buildings (the demo's seven, 8,000 readings) the classifier
is too coarse and pulls a building that never reads 0 down; ``cycle.zero_state: false`` there.
"""

from __future__ import annotations

import numpy as np

#: The classifier's objective; its other LightGBM settings are the regression's.
OBJECTIVE = "binary"
PREFIX = "zero_state_"


def fit(X: np.ndarray, is_zero: np.ndarray, params: dict, rounds: int, threads: int):
    """The classifier of "reads 0", on every row given."""
    from gateway.model.train import fit_lightgbm

    return fit_lightgbm(X, np.asarray(is_zero, dtype=np.float64), {**params, "objective": OBJECTIVE}, rounds, threads)


def combine(level_log: np.ndarray, p_zero: np.ndarray) -> np.ndarray:
    """log1p(expected) from the level (log1p, ≥ 0) and the chance of a 0."""
    return (1.0 - p_zero) * np.maximum(level_log, 0.0)


def append_to_graph(model, classifier, input_name: str, level: str, output: str) -> None:
    """Add ``classifier`` (converted by onnxmltools) to ``model``'s graph, reading the same input,
    and make ``output`` = (1 − p_zero) · max(``level``, 0)."""
    from onnx import TensorProto, compose, helper
    from onnxmltools import convert_lightgbm
    from onnxmltools.convert.common.data_types import FloatTensorType

    n_features = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    clf = convert_lightgbm(classifier, initial_types=[(input_name, FloatTensorType([None, n_features]))],
                           target_opset=15, zipmap=False)
    clf = compose.add_prefix(clf, PREFIX)
    probabilities = next(o.name for o in clf.graph.output if "prob" in o.name)
    for node in clf.graph.node:
        node.input[:] = [input_name if name == PREFIX + input_name else name for name in node.input]
    g = model.graph
    g.node.extend(clf.graph.node)
    g.initializer.extend(clf.graph.initializer)
    g.initializer.extend([
        helper.make_tensor("zero_state_combine_column", TensorProto.INT64, [1], [1]),
        helper.make_tensor("zero_state_combine_one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("zero_state_combine_zero", TensorProto.FLOAT, [], [0.0]),
    ])  # fmt: skip
    g.node.extend([
        helper.make_node("Gather", [probabilities, "zero_state_combine_column"], ["zero_state_combine_p"], axis=1),
        helper.make_node("Sub", ["zero_state_combine_one", "zero_state_combine_p"], ["zero_state_combine_on"]),
        helper.make_node("Max", [level, "zero_state_combine_zero"], ["zero_state_combine_level"]),
        helper.make_node("Mul", ["zero_state_combine_on", "zero_state_combine_level"], [output]),
    ])  # fmt: skip
    domains = {o.domain for o in model.opset_import}  # both come from one converter: same versions
    model.opset_import.extend(o for o in clf.opset_import if o.domain not in domains)
