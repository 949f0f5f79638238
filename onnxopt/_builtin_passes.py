"""Import the shipped passes (the top-level ``passes/`` folder) as ``onnxopt.passes``.

An installed package has ``onnxopt/passes`` (pyproject maps the folder
there). In a source checkout the folder sits beside ``onnxopt/``; load it
under the same module name so both layouts behave alike.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

try:
    importlib.import_module("onnxopt.passes")
except ModuleNotFoundError as exc:
    if exc.name != "onnxopt.passes":
        raise
    folder = Path(__file__).resolve().parent.parent / "passes"
    spec = importlib.util.spec_from_file_location(
        "onnxopt.passes", folder / "__init__.py", submodule_search_locations=[str(folder)])
    if spec is None or spec.loader is None:
        raise
    module = importlib.util.module_from_spec(spec)
    sys.modules["onnxopt.passes"] = module
    spec.loader.exec_module(module)
