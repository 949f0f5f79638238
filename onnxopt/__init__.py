"""onnxopt: a graph-level ONNX model optimizer that proves, in ONNX Runtime, what it changed.

Typical use::

    import onnxopt
    model = onnxopt.load("models/digits_cnn.onnx")
    result = onnxopt.optimize(model, "dce")
    result.save("digits_cnn.opt.onnx")
    tuned = onnxopt.tune("models/digits_cnn.onnx", "models/digits_calib.npz", target="size=0.25", max_drop=1)
"""

from __future__ import annotations

from . import graph
from .api import Recipe, optimize
from .data import Dataset, load_dataset, synthetic_dataset
from .errors import InputError, OnnxoptError, PassError, ValidationFailed
from .io import load, save
from .pipeline import (Pass, PassContext, PassManager, PassResult, Pipeline, Tolerance, VerifyFailed,
                       register_pass, register_preset, registered_passes)
from .report import OptimizeResult, inspect_model
from .tune import TuneResult, tune
from .validate import Comparison, compare

__version__ = "0.1.0"

__all__ = [
    "load", "save", "optimize", "tune", "TuneResult", "compare", "inspect_model", "graph",
    "Pass", "PassContext", "PassResult", "PassManager", "Pipeline", "Recipe", "Tolerance",
    "register_pass", "register_preset", "registered_passes",
    "OptimizeResult", "Comparison", "Dataset", "load_dataset", "synthetic_dataset",
    "OnnxoptError", "InputError", "PassError", "ValidationFailed", "VerifyFailed",
]

from . import _builtin_passes  # noqa: E402,F401  (makes onnxopt.passes importable from a source checkout too)
