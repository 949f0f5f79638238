"""The passes shipped with onnxopt, one module each; importing a module registers its pass.

Every module in this package is imported, so adding a pass is adding a file.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from onnxopt.pipeline import register_preset  # noqa: E402

# The graph cleanup onnxsim/onnxslim users expect, run until nothing changes:
# fold constants first (it exposes BatchNorm parameters and no-ops), then fold
# BatchNorm into its producer, drop no-ops, merge duplicates, remove the dead.
register_preset("cleanup", "fold,fold_bn,noop,dedup,dce")
