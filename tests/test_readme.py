"""The README's commands and code run as written, so the documentation cannot rot."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A scratch folder with models/ beside it, as in a fresh clone."""
    shutil.copytree(ROOT / "models", tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_opens_with_the_two_commands():
    first, second = _blocks("bash")[:2]
    assert first.strip().startswith("pip install . && onnxopt optimize models/")
    assert second.strip() == "pip install '.[test]' && pytest"
    ci = (ROOT / ".ci" / "run").read_text()
    assert second.strip() in ci


def test_readme_main_command_runs(workdir):
    command = _blocks("bash")[0].strip().split("&&", 1)[1].split()
    assert command[0] == "onnxopt"
    exe = shutil.which("onnxopt")  # the installed console script when present
    argv = [exe, *command[1:]] if exe else [sys.executable, "-m", "onnxopt", *command[1:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)} if not exe else None
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "PASSED" in done.stdout and "accuracy 99.44% -> 99.44%" in done.stdout
    assert (workdir / "models" / "digits_cnn.opt.onnx").is_file()


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_block_runs(workdir, index):
    code = _blocks("python")[index]
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__main__"})


def test_readme_recipe_block_is_a_valid_recipe(workdir):
    import onnxopt

    recipe_text = _blocks("yaml")[0]
    (workdir / "recipes").mkdir()
    (workdir / "recipes" / "r.yaml").write_text(recipe_text)
    result = onnxopt.optimize("models/digits_cnn.onnx", recipe="recipes/r.yaml")
    assert result.passed and result.validation.samples == 360
    assert result.records[0].verify is not None  # verify_each ran


@pytest.mark.parametrize("index", [i for i, b in enumerate(_blocks("bash")) if b.strip().startswith("onnxopt ")])
def test_readme_onnxopt_commands_run(workdir, index):
    import shlex

    from onnxopt.cli import main

    argv = shlex.split(_blocks("bash")[index].strip())[1:]
    assert main(argv) == 0
    if "qdq" in argv[argv.index("--passes") + 1] if "--passes" in argv else False:
        after = (workdir / "models" / "digits_cnn.opt.onnx").stat().st_size
        assert after < 0.4 * (workdir / "models" / "digits_cnn.onnx").stat().st_size
