"""The executor interface: results in item order, shared values, unknown specs refused."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from onnxopt.errors import InputError
from onnxopt.executors import LocalExecutor, make_executor

ROOT = Path(__file__).resolve().parent.parent


def _scaled(shared, item):
    return shared["k"] * item


def test_local_map_keeps_order_and_reports_progress():
    ex = make_executor("local")
    assert isinstance(ex, LocalExecutor)
    seen = []
    out = ex.map(_scaled, ex.share({"k": 3}), [5, 1, 4], progress=lambda d, t: seen.append((d, t)))
    assert out == [15, 3, 12]
    assert seen == [(1, 3), (2, 3), (3, 3)]
    ex.close()


def test_unknown_executor_is_refused():
    with pytest.raises(InputError, match="unknown executor 'dask'"):
        make_executor("dask")


def test_the_default_path_never_imports_ray(tmp_path):
    """optimize and the local executor run with an importable `ray` on the path and never load it."""
    fake = tmp_path / "ray"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    script = (
        "import importlib.util, sys\n"
        f"assert importlib.util.find_spec('ray').origin == {str(fake / '__init__.py')!r}\n"
        "import onnxopt\n"
        "from onnxopt.executors import make_executor\n"
        "result = onnxopt.optimize('models/digits_mlp.onnx', 'cleanup', inputs='models/digits_test.npz')\n"
        "assert result.passed\n"
        "ex = make_executor('local')\n"
        "assert ex.map(max, ex.share(0), [-1, 2]) == [0, 2]\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="Ray is installed here")
def test_ray_executor_without_ray_says_how_to_install_it():
    with pytest.raises(InputError, match=r"--executor ray needs Ray: pip install 'onnxopt\[ray\]'"):
        make_executor("ray")
