"""The installed package holds every module of the source tree (a missing subpackage breaks only installs)."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = config["package-dir"]
    listed = set(config["packages"])
    found = set()
    for top, folder in (("onnxopt", "onnxopt"), ("onnxopt.passes", "passes")):
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((top, *rel)))
    assert found <= listed, f"add to pyproject's packages: {sorted(found - listed)}"
    for name in listed - {"onnxopt"}:
        if name in dirs:
            assert (ROOT / dirs[name] / "__init__.py").is_file()


def test_package_code_never_imports_the_source_tree_name_passes():
    """Installed, the passes live at onnxopt.passes: an absolute ``passes.`` import works from a
    checkout (and in the tests) and fails for every user (qdq's GPTQ rounding did once)."""
    offenders = [f"{path.relative_to(ROOT)}:{i}" for folder in ("onnxopt", "passes")
                 for path in (ROOT / folder).rglob("*.py")
                 for i, line in enumerate(path.read_text().splitlines(), 1)
                 if line.lstrip().startswith(("from passes.", "import passes", "from passes import"))]
    assert not offenders, offenders
