"""The Ray executor against Ray itself: an instance it starts (2 local workers), a head started here
with `ray start` joined by address and through Ray Client, and a Ray session already open.

Every form must give the in-process executor's results, in item order, from a value put in the
object store once. Skipped when Ray is not installed (``pip install '.[ray]'``) or a head cannot start.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install '.[ray]'); not installed here")

from onnxopt.errors import InputError
from onnxopt.executors import TaskFailed, make_executor
from onnxopt.executors.ray_executor import RayExecutor, ship_package

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
PIPELINES = ["dce", "cleanup", "fold_bn,dce", "noop,dedup"]


def optimized_digest(model_bytes: bytes, pipeline: str) -> tuple[str, str]:
    """A real task: run a pipeline on the shared model bytes (passes imported on the worker)."""
    import onnx

    import onnxopt

    result = onnxopt.optimize(onnx.load_from_string(model_bytes), pipeline, validate=False)
    return result.pipeline, hashlib.sha256(result.model.SerializeToString()).hexdigest()


def scaled_after_delay(shared: dict, item: tuple[int, float]) -> tuple[int, bool]:
    """Waits so that later items finish first; reports whether the shared array is the store's
    read-only copy."""
    value, delay = item
    time.sleep(delay)
    return int(shared["k"]) * value + int(shared["table"].sum()), bool(shared["table"].flags.writeable)


def timed_sleep(shared: None, seconds: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def fails_on_three(shared: dict, item: int) -> int:
    if item == 3:
        raise ValueError(f"item {item} is not allowed")
    if item == 4:
        raise InputError("bad calibration file")
    return item


def shipped_onnxopt(shared: None, item: int) -> list[str]:
    """The onnxopt copies a worker can import from the folders Ray shipped (runtime resources)."""
    return sorted(str(Path(p) / "onnxopt") for p in sys.path
                  if "runtime_resources" in p and (Path(p) / "onnxopt" / "passes" / "__init__.py").is_file())


# Workers import this module's functions by value: the tests folder is not shipped to them.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_a_checkout_is_shipped_laid_out_as_installed(tmp_path):
    shipped = ship_package(tmp_path)
    assert shipped == tmp_path / "onnxopt"
    assert (shipped / "executors" / "ray_executor.py").is_file()
    assert (shipped / "passes" / "__init__.py").is_file() and (shipped / "passes" / "qdq" / "plan.py").is_file()
    assert not list(shipped.rglob("__pycache__"))
    installed = tmp_path / "site" / "onnxopt"
    (installed / "passes").mkdir(parents=True)
    (installed / "passes" / "__init__.py").write_text("")
    assert ship_package(tmp_path / "stage", installed) == installed  # already laid out: shipped as is


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _answers(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(autouse=True)
def time_limit():
    """A Ray that hangs fails its test after 3 minutes instead of holding the whole run."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError("the Ray test ran past 3 minutes")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(180)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def auth():
    """Ray's token authentication (its default) with a token of the test's own, not ~/.ray's."""
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        mp.delenv("RAY_ADDRESS", raising=False)
        # Ray's core reads RAY_AUTH_MODE when first loaded (at collection here); re-read it, as
        # Ray itself does when it turns authentication on (Ray versions before tokens lack this).
        config = getattr(ray._raylet, "Config", None)
        if config is not None and hasattr(config, "initialize"):
            config.initialize("")
        yield env


@pytest.fixture(scope="module")
def head(auth):
    """A Ray head with 2 CPUs started here (`ray start --head --block`), stopped after the module."""
    gcs_port, client_port = _free_ports(2)
    temp = tempfile.mkdtemp(prefix="rayt")  # short: Ray's socket paths must stay under 107 bytes
    workdir = tempfile.mkdtemp(prefix="onnxopt-head-")  # not the checkout: workers get onnxopt shipped
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--num-cpus", "2",
           "--port", str(gcs_port), "--ray-client-server-port", str(client_port), "--temp-dir", temp,
           "--include-dashboard=false", "--disable-usage-stats"]
    log = open(Path(workdir) / "head.log", "w+")
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not ((Path(temp) / "ray_current_cluster").exists() and _answers(client_port)):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                tail = log.read()[-800:]
                pytest.skip(f"a local Ray head could not start here (ray start --head): {tail}")
            time.sleep(0.2)
        yield {"gcs": f"127.0.0.1:{gcs_port}", "client": f"ray://127.0.0.1:{client_port}", "proc": proc}
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` (it stops the head's processes); SIGKILL to its own process
    group if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def model_bytes() -> bytes:
    return MODEL.read_bytes()


@pytest.fixture(scope="module")
def local_digests(model_bytes):
    ex = make_executor("local")
    return ex.map(optimized_digest, ex.share(model_bytes), PIPELINES)


def _check_workload(ex, model_bytes, local_digests):
    progress = []
    out = ex.map(optimized_digest, ex.share(model_bytes), PIPELINES,
                 progress=lambda done, total: progress.append((done, total)))
    assert out == local_digests
    assert progress == [(i + 1, len(PIPELINES)) for i in range(len(PIPELINES))]


def test_two_local_workers_start_their_own_instance_and_stop_it(auth, model_bytes, local_digests):
    try:
        ex = make_executor("ray", workers=2)
    except InputError as exc:
        if "cannot start a local Ray instance" in str(exc):
            pytest.skip(f"Ray cannot start here: {exc}")
        raise
    try:
        assert isinstance(ex, RayExecutor) and ex.started and ex.workers == 2
        assert ray.cluster_resources()["CPU"] == 2
        _check_workload(ex, model_bytes, local_digests)
        # Later items finish first; results still come back in item order.
        items = [(1, 0.6), (2, 0.3), (3, 0.0), (4, 0.0)]
        shared = {"k": 10, "table": np.arange(40_000, dtype=np.int64)}
        expected = [(10 * v + int(shared["table"].sum()), False) for v, _ in items]
        assert ex.map(scaled_after_delay, ex.share(shared), items) == expected
    finally:
        ex.close()
    assert not ray.is_initialized()


def test_joined_head_shares_once_keeps_order_and_names_a_failed_item(head, model_bytes, local_digests,
                                                                     monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", head["gcs"])
    ex = make_executor("ray")
    try:
        assert not ex.started and ex.workers == 2
        assert shipped_onnxopt(None, 0) == []  # this process has none; the workers get one
        assert ex.map(shipped_onnxopt, None, [0])[0], "workers import onnxopt from the shipped copy"
        _check_workload(ex, model_bytes, local_digests)

        puts = []
        real_put = ray.put
        monkeypatch.setattr(ray, "put", lambda value, **kw: puts.append(1) or real_put(value, **kw))
        table = np.arange(40_000, dtype=np.int64)
        handle = ex.share({"k": 3, "table": table})
        assert isinstance(handle, ray.ObjectRef)
        first = ex.map(scaled_after_delay, handle, [(5, 0.2), (1, 0.0), (4, 0.0)])
        second = ex.map(scaled_after_delay, handle, [(2, 0.0)])
        assert [v for v, _ in first + second] == [3 * v + int(table.sum()) for v in (5, 1, 4, 2)]
        assert not any(w for _, w in first + second), "tasks read the object store's read-only copy"
        assert len(puts) == 1, "the shared value is put once for every task of every map"

        with pytest.raises(TaskFailed, match=r"^item 2 \(3\) failed on a Ray worker: "
                                             r"ValueError: item 3 is not allowed$") as info:
            ex.map(fails_on_three, None, [1, 2, 3])
        assert info.value.index == 2 and info.value.exit_code == 3
        with pytest.raises(TaskFailed, match=r"item 0 \(4\) .*InputError: bad calibration file") as info:
            ex.map(fails_on_three, None, [4])
        assert info.value.exit_code == 2  # bad input stays bad input

        # A second executor in this Ray session (the caller's, for it): used, capped, left open.
        one = make_executor("ray", workers=1)
        assert one.workers == 1 and not one.started
        spans = sorted(one.map(timed_sleep, None, [0.3, 0.3, 0.3]))
        assert all(end <= next_start for (_, end), (next_start, _) in itertools.pairwise(spans)), spans
        one.close()
        assert ray.is_initialized()
    finally:
        ex.close()
    assert not ray.is_initialized()
    assert head["proc"].poll() is None, "closing a joined executor leaves the head running"


def test_ray_client_address_gives_the_local_results(head, model_bytes, local_digests):
    ex = make_executor(head["client"], workers=2)
    try:
        assert not ex.started and ex.workers == 2
        _check_workload(ex, model_bytes, local_digests)
    finally:
        ex.close()
    assert not ray.is_initialized()
    assert head["proc"].poll() is None


def test_tune_on_the_joined_head_chooses_the_local_pipeline(head, monkeypatch):
    """The same seed gives the same tuned pipeline on 2 Ray workers of a head started here as in
    process: evaluations are independent and choices read results in item order."""
    from onnxopt.tune import tune

    args = ("models/digits_cnn.onnx", "models/digits_calib.npz")
    kw = dict(inputs="models/digits_test.npz", target="size=0.5", max_drop=1, seed=0, samples=128)
    local = tune(*args, executor="local", **kw)
    monkeypatch.setenv("RAY_ADDRESS", head["gcs"])
    remote = tune(*args, executor="ray", workers=2, **kw)
    assert local.met and remote.met and "qdq(" in local.pipeline
    assert remote.pipeline == local.pipeline and remote.layers == local.layers
    assert (remote.executor, remote.workers) == ("ray", 2) and remote.evaluations == local.evaluations
