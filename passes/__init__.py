"""The passes shipped with onnxopt, one module each; importing registers them."""

from . import dce  # noqa: F401
