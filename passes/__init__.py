"""The passes shipped with onnxopt, one module each; importing a module registers its pass.

Every module in this package is imported, so adding a pass is adding a file.
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
