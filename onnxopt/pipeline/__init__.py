"""Passes, their registry, pipeline strings and recipes, and the pass manager.

A pipeline imports the model once, runs every pass on the same
onnx-graphsurgeon graph, checks the contracts after each pass, and exports
once at the end.

- ``tolerance``: what "the same outputs" means (Tolerance, EXACT).
- ``registry``: Pass, PassContext, PassResult, Requirement; registering passes, presets, plugins.
- ``parse``: pipeline strings to steps and back (Pipeline, Group).
- ``contracts``: what a pass must keep (interface, names, checker, growth allowance).
- ``manager``: PassManager, which runs a pipeline and records each pass.
"""

from __future__ import annotations

from .contracts import (
    GROWTH_FLOOR_BYTES,
    MAX_GROWTH,
    check_contracts,
    checker_error,
    duplicate_names,
    growth_limit,
    interface_of,
    parse_max_growth,
)
from .manager import PassManager, PassRecord, Verifier, VerifyFailed
from .parse import Group, Pipeline, Step, describe_pass
from .registry import (
    BN_FOLDED,
    CONSTANTS_FOLDED,
    NoOptions,
    Pass,
    PassContext,
    PassResult,
    Requirement,
    get_pass,
    presets,
    register_pass,
    register_preset,
    registered_passes,
)
from .tolerance import EXACT, FLOOR_MULTIPLE, Tolerance

__all__ = ["Tolerance", "FLOOR_MULTIPLE", "EXACT", "PassResult", "PassContext", "NoOptions", "Requirement", "BN_FOLDED", "CONSTANTS_FOLDED", "Pass", "register_pass", "register_preset", "registered_passes", "presets", "get_pass", "Group", "Step", "Pipeline", "describe_pass", "interface_of", "duplicate_names", "check_contracts", "checker_error", "MAX_GROWTH", "GROWTH_FLOOR_BYTES", "parse_max_growth", "growth_limit", "PassRecord", "Verifier", "PassManager", "VerifyFailed"]
