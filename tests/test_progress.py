"""Progress bars: on stderr only where someone watches, silenced by --quiet, harmless without tqdm."""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxopt import calibrate, progress
from onnxopt.cli import main
from onnxopt.data import count_samples, iter_feeds, load_dataset
from onnxopt.executors import LocalExecutor
from onnxopt.validate import Reference

ROOT = Path(__file__).resolve().parent.parent
HAS_TQDM = progress.available()
needs_tqdm = pytest.mark.skipif(not HAS_TQDM, reason="tqdm is not installed: no bars to see")


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    """Automatic mode, no delay (bars show at once, every step drawn), everything put back afterwards."""
    monkeypatch.delenv(progress.ENV, raising=False)
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    monkeypatch.setattr(progress, "REFRESH_S", 0.0)
    yield
    progress.configure(quiet=False)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeTqdm:
    """Records what a bar was told: description, total, and the count it reached."""

    made: list["FakeTqdm"] = []

    def __init__(self, desc=None, total=None, unit="it", file=None, **_):
        self.desc, self.total, self.unit, self.file = desc, total, unit, file
        self.n, self.closed = 0, False
        FakeTqdm.made.append(self)

    def update(self, k=1):
        assert not self.closed
        self.n += k

    def refresh(self):
        pass

    def close(self):
        self.closed = True


@pytest.fixture
def fake_tqdm(monkeypatch):
    """Bars forced on and recorded, whether tqdm is installed or not."""
    FakeTqdm.made = []
    monkeypatch.setattr(progress, "_tqdm", FakeTqdm)
    progress.set_enabled(True)
    return FakeTqdm.made


def bars(made, desc):
    return [b for b in made if b.desc == desc]


# ----------------------------------------------------------------- when bars show

@needs_tqdm
def test_quiet_when_stderr_is_not_a_terminal(capsys):
    with progress.task("calibrating", total=5, unit="sample") as bar:
        bar.advance(5)
    out, err = capsys.readouterr()
    assert not progress.enabled()
    assert out == "" and err == ""


@needs_tqdm
def test_a_terminal_sees_the_bar_with_count_rate_and_time_left_on_stderr(monkeypatch, capsys):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert progress.enabled()
    with progress.task("calibrating", total=4, unit="sample") as bar:
        for _ in range(4):
            bar.advance(1)
    shown = term.getvalue()
    assert "calibrating" in shown and "4/4" in shown and "sample/s" in shown
    assert "<" in shown  # elapsed<remaining
    assert capsys.readouterr().out == ""


@needs_tqdm
@pytest.mark.parametrize("env, forced", [("0", True), ("off", None)])
def test_env_zero_silences_even_a_terminal(monkeypatch, env, forced):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setenv(progress.ENV, env)
    progress.set_enabled(forced)
    with progress.task("calibrating", total=3) as bar:
        bar.advance(3)
    assert term.getvalue() == ""


@needs_tqdm
def test_env_one_shows_bars_on_any_stream(monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV, "1")
    for _ in progress.iterate(range(3), "sweeping", unit="point"):
        pass
    out, err = capsys.readouterr()
    assert "sweeping" in err and "3/3" in err and out == ""


@needs_tqdm
def test_a_short_task_shows_nothing_before_the_delay(monkeypatch):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    monkeypatch.setattr(progress, "DELAY_S", 60.0)
    with progress.task("calibrating", total=3) as bar:
        bar.advance(3)
    assert term.getvalue() == ""


def test_without_tqdm_nothing_is_shown_and_every_call_works(monkeypatch, capsys):
    monkeypatch.setattr(progress, "_tqdm", None)
    progress.set_enabled(True)
    assert not progress.available() and not progress.enabled()
    with progress.task("calibrating", total=3) as bar:
        bar.advance(2)
        bar.set_total(4)
        bar.update_to(4)
    assert bar.done == 4 and not bar.shown
    assert list(progress.iterate([1, 2, 3], "layers")) == [1, 2, 3]
    report = progress.callback("evaluating")
    report(1, 2)
    report(2, 2)
    assert capsys.readouterr() == ("", "")


def test_a_minimal_install_without_tqdm_imports_and_runs_the_cli(tmp_path):
    """tqdm blocked at import: onnxopt loads, the CLI runs, nothing but the summary is printed."""
    shutil.copy(ROOT / "models" / "digits_mlp.onnx", tmp_path / "m.onnx")
    code = ("import sys; sys.modules['tqdm'] = None\n"
            "from onnxopt import progress, cli\n"
            "assert not progress.available()\n"
            f"sys.exit(cli.main(['optimize', {str(tmp_path / 'm.onnx')!r}, '--passes', 'dce', "
            "'--latency-runs', '0']))\n")
    env = {**os.environ, progress.ENV: "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "PASSED" in done.stdout and "\r" not in done.stderr


# ----------------------------------------------------------------- the three forms

def test_callback_counts_done_of_total_and_closes_at_the_end(fake_tqdm):
    report = progress.callback("evaluating", unit="candidate")
    LocalExecutor().map(_square, None, [1, 2, 3], progress=report)
    (bar,) = fake_tqdm
    assert (bar.desc, bar.unit, bar.total, bar.n, bar.closed) == ("evaluating", "candidate", 3, 3, True)
    report(1, 2)  # a second sweep gets a bar of its own
    report(2, 2)
    assert len(fake_tqdm) == 2 and (fake_tqdm[1].total, fake_tqdm[1].n, fake_tqdm[1].closed) == (2, 2, True)


def _square(_, x):
    return x * x


def test_callback_learns_the_total_late_and_counts_jumps(fake_tqdm):
    report = progress.callback("timing", unit="run")
    report(1, 5)
    report(4)  # total as before
    report(5)
    (bar,) = fake_tqdm
    assert (bar.total, bar.n, bar.closed) == (5, 5, True)


def test_task_and_iterate_count_and_close_even_on_error(fake_tqdm):
    assert list(progress.iterate(["a", "b"], "layers", unit="layer")) == ["a", "b"]
    with pytest.raises(RuntimeError):
        with progress.task("calibrating", total=10) as bar:
            bar.advance(3)
            raise RuntimeError("stop")
    layers, calib = fake_tqdm
    assert (layers.total, layers.n, layers.closed) == (2, 2, True)
    assert (calib.total, calib.n, calib.closed) == (10, 3, True)


def test_bars_write_to_the_stderr_of_the_moment(fake_tqdm, monkeypatch):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    progress.Bar("x")
    assert fake_tqdm[0].file is term


# ----------------------------------------------------------------- wired into the long work

def test_calibration_counts_samples_against_the_expected_total(fake_tqdm):
    model = onnx.load(ROOT / "models" / "digits_cnn.onnx")
    data = calibrate.CalibrationSet(str(ROOT / "models" / "digits_calib.npz"), model, samples=100)
    name = model.graph.node[0].output[0]
    calibrate.stream_tensors(model, [name], calibrate.CountedFeeds(data), lambda batch: None)
    (bar,) = bars(fake_tqdm, "calibrating")
    assert bar.unit == "sample" and bar.total == bar.n == 128  # whole batches of 32 until past 100


def test_validation_and_timing_bars(fake_tqdm):
    model = onnx.load(ROOT / "models" / "digits_mlp.onnx")
    data = load_dataset(str(ROOT / "models" / "digits_test.npz"), model)
    ref = Reference(model, data, latency_runs=3)
    ref.compare(model, ref_tolerance())
    ref.close()
    for desc in ("validating: original", "validating: noise floor (disable)", "validating: optimized"):
        (bar,) = bars(fake_tqdm, desc)
        assert (bar.total, bar.n, bar.closed) == (data.samples, data.samples, True), desc
    for desc in ("timing: original", "timing: optimized"):
        (bar,) = bars(fake_tqdm, desc)
        assert (bar.total, bar.n, bar.closed) == (3, 3, True), desc


def ref_tolerance():
    from onnxopt.pipeline import EXACT
    return EXACT


@pytest.mark.parametrize("pipeline, loop", [("woq", "woq: int4 weights"),
                                             ("svd(rank_ratio=0.5,latency_gate=false)", "svd: decomposing"),
                                             ("prune(sparsity=0.5)", "prune: layers")])
def test_per_layer_loops_of_the_compressing_passes(fake_tqdm, pipeline, loop):
    import onnxopt

    onnxopt.optimize(str(ROOT / "models" / "digits_mlp.onnx"), pipeline,
                     calibration=str(ROOT / "models" / "digits_calib.npz"), validate=False)
    (bar,) = bars(fake_tqdm, loop)
    assert bar.n == bar.total >= 1 and bar.closed and bar.unit in ("layer", "weight")
    assert all(b.closed for b in fake_tqdm)


def test_synthetic_input_search_counts_tries(fake_tqdm):
    from onnxopt.synthetic import find_inputs

    probe = find_inputs(onnx.load(ROOT / "models" / "digits_cnn.onnx"))
    assert probe.found
    (bar,) = bars(fake_tqdm, "finding synthetic inputs")
    assert bar.n == probe.attempts - 1 and bar.closed  # the try that ran ends the search


@pytest.mark.parametrize("batch_size, limit", [(32, None), (32, 100), (50, 64), (400, None), (7, 7)])
def test_count_samples_matches_what_the_feeds_give(batch_size, limit):
    model = onnx.load(ROOT / "models" / "digits_cnn.onnx")
    path = str(ROOT / "models" / "digits_calib.npz")
    given = sum(n for _, _, n in iter_feeds(path, model, batch_size=batch_size, limit=limit))
    assert count_samples(path, model, batch_size=batch_size, limit=limit) == given


def test_count_samples_of_arrays_and_of_what_it_cannot_tell():
    model = onnx.load(ROOT / "models" / "digits_cnn.onnx")
    x = np.zeros((10, 1, 8, 8), np.float32)
    assert count_samples({"input": x}, model) == 10
    assert count_samples([{"input": x}, {"input": x[:3]}], model) == 13
    assert count_samples(iter([{"input": x}]), model) is None  # one-shot: reading it would use it up
    assert count_samples({"wrong": x}, model) is None


# ----------------------------------------------------------------- the command line

@pytest.fixture
def cnn(tmp_path):
    for name in ("digits_cnn.onnx", "digits_test.npz", "digits_calib.npz"):
        shutil.copy(ROOT / "models" / name, tmp_path / name)
    return tmp_path / "digits_cnn.onnx"


def _optimize(cnn, capsys, *extra):
    code = main([str(a) for a in ["optimize", cnn, "--passes", "cleanup,qdq", "--calib",
                                  cnn.parent / "digits_calib.npz", "--inputs", cnn.parent / "digits_test.npz",
                                  "--latency-runs", "2", *extra]])
    out, err = capsys.readouterr()
    return code, out, err


@needs_tqdm
def test_cli_shows_bars_on_stderr_only_and_quiet_silences_them(cnn, capsys, monkeypatch):
    monkeypatch.setenv(progress.ENV, "1")  # stderr is captured, not a terminal: force the bars on
    code, out, err = _optimize(cnn, capsys)
    assert code == 0, err
    assert "calibrating" in err and "264/264" in err and "validating: optimized" in err
    assert "calibrating" not in out and "it/s" not in out and "sample/s" not in out
    code, quiet_out, quiet_err = _optimize(cnn, capsys, "--quiet")
    assert code == 0 and quiet_err == ""
    assert "PASSED" in quiet_out and "accuracy 99.44% -> 99.44%" in quiet_out  # the summary stays


def test_cli_makes_bars_for_the_long_steps_and_none_with_quiet(cnn, capsys, fake_tqdm, monkeypatch):
    monkeypatch.setenv(progress.ENV, "1")
    code, out, err = _optimize(cnn, capsys)
    assert code == 0, err
    made = {b.desc: (b.n, b.total) for b in fake_tqdm}
    assert made["calibrating"] == (264, 264)  # 360 samples less the 96 the guard holds out
    assert made["validating: original"] == made["validating: optimized"] == (360, 360)
    assert made["timing: original"] == made["timing: optimized"] == (2, 2)
    assert all(b.closed for b in fake_tqdm)
    fake_tqdm.clear()
    code, out, err = _optimize(cnn, capsys, "--quiet")
    assert code == 0 and fake_tqdm == [] and "PASSED" in out


def test_cli_quiet_drops_warnings_but_not_errors(cnn, capsys, caplog):
    caplog.set_level(logging.WARNING)
    code = main(["optimize", str(cnn), "--passes", "qdq", "--inputs", str(cnn.parent / "digits_test.npz"),
                 "--latency-runs", "0", "--quiet", "-o", str(cnn.parent / "q.onnx")])
    assert code == 0 and not [r for r in caplog.records if r.name == "onnxopt" and r.levelno < logging.ERROR]
    code = main(["optimize", str(cnn), "--passes", "qdq", "--inputs", str(cnn.parent / "digits_test.npz"),
                 "--latency-runs", "0", "-o", str(cnn.parent / "q.onnx")])
    assert code == 0 and any("no calibration data" in r.getMessage() for r in caplog.records)
    code = main(["compare", str(cnn), str(cnn.parent / "missing.onnx"), "--quiet"])
    assert code == 2 and "missing.onnx" in capsys.readouterr().err
