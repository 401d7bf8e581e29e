"""Expected consumption and anomaly scores for every reading.

- :mod:`gateway.model.features`: the one feature module shared by training and inference.
- :mod:`gateway.model.ashrae`: the reader of ASHRAE-column CSVs (training and score_file).
- :mod:`gateway.model.train`: LightGBM training, evaluation on unseen buildings, checked ONNX export.
- :mod:`gateway.model.scorer`: loads and verifies a model folder, scores feature rows.
- :mod:`gateway.model.online`: per-meter online correction and anomaly score (state in SQLite).
- :mod:`gateway.model.score_file`: score a whole CSV file; :mod:`gateway.model.bench`: throughput.

Nothing here does work at import time; training needs the ``train`` extra.
"""
