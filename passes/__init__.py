"""The passes shipped with onnxopt, one module each, named after its pass.

Modules are imported when their pass is first asked for (``onnxopt.passes.<name>``),
so a run pays only for the passes it uses; ``load_all`` imports every one (to list
them). Adding a pass is adding a file.
"""

import importlib
import pkgutil

from onnxopt.pipeline import register_preset


def load_all() -> None:
    """Import every pass module (each registers its pass)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


# The graph cleanup onnxsim/onnxslim users expect, run until nothing changes:
# fold constants first (it exposes BatchNorm parameters and no-ops), then fold
# BatchNorm into its producer, drop no-ops, merge duplicates, remove the dead.
register_preset("cleanup", "fold,shape_fold,fold_bn,noop,merge,dedup,dce")
