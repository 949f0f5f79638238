"""The executor interface: results in item order, shared values, unknown specs refused."""

import pytest

from onnxopt.errors import InputError
from onnxopt.executors import LocalExecutor, make_executor


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
