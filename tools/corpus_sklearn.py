"""Tabular corpus models: scikit-learn estimators trained on its bundled datasets, converted by skl2onnx.

    VENV/bin/python tools/corpus_sklearn.py CACHE [NAME ...]

Needs scikit-learn and skl2onnx (a venv of their own; tools/corpus.py calls this script with
--sklearn-python). Every model is trained seeded on the first 75% of a bundled dataset (no
download) and gets the held-out rows as inputs.npz (`X`, float32). Writes CACHE/<name>/model.onnx
and inputs.npz and prints one JSON line per model with the library versions. ZipMap is turned
off (class probabilities come out as a tensor).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _models():
    from sklearn import datasets
    from sklearn.decomposition import PCA
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestRegressor
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return {
        "skl_breast_cancer_gbt": (datasets.load_breast_cancer, lambda: GradientBoostingClassifier(
            n_estimators=60, max_depth=3, random_state=0)),
        "skl_diabetes_forest": (datasets.load_diabetes, lambda: RandomForestRegressor(
            n_estimators=40, max_depth=8, random_state=0)),
        "skl_wine_scaler_pca_logreg": (datasets.load_wine, lambda: make_pipeline(
            StandardScaler(), PCA(n_components=8, random_state=0), LogisticRegression(max_iter=500))),
        "skl_digits_mlp": (datasets.load_digits, lambda: make_pipeline(
            StandardScaler(), MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=400, random_state=0))),
        "skl_iris_svc": (datasets.load_iris, lambda: make_pipeline(
            StandardScaler(), SVC(probability=True, random_state=0))),
    }


def build(cache: Path, names: list[str]) -> None:
    import sklearn
    import skl2onnx
    from skl2onnx import to_onnx

    for name, (load, make) in _models().items():
        if names and name not in names:
            continue
        X, y = load(return_X_y=True)
        X = X.astype(np.float32)
        order = np.random.default_rng(0).permutation(len(X))
        X, y = X[order], y[order]
        cut = int(len(X) * 0.75)
        est = make().fit(X[:cut], y[:cut])
        options = {id(est): {"zipmap": False}} if hasattr(est, "predict_proba") else None
        onx = to_onnx(est, X[:1], target_opset={"": 17, "ai.onnx.ml": 3}, options=options)
        onx.graph.input[0].name  # the single input is called X
        d = cache / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.onnx").write_bytes(onx.SerializeToString())
        test = X[cut:cut + 32]
        np.savez(d / "inputs.npz", **{onx.graph.input[0].name: test})
        score = float(est.score(X[cut:], y[cut:]))
        print(json.dumps({"name": name, "sklearn": sklearn.__version__, "skl2onnx": skl2onnx.__version__,
                          "score": round(score, 4), "dataset": load.__name__}))


if __name__ == "__main__":
    build(Path(sys.argv[1]).expanduser(), sys.argv[2:])
