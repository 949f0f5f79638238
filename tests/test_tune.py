"""onnxopt tune on the shipped digits CNN: the target met within the budget, the printed pipeline
reproducing the model through optimize, an unreachable target, bad input, and executor order."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from onnxopt import cli
from onnxopt.errors import InputError
from onnxopt.executors import LocalExecutor
from onnxopt.tune import tune
from onnxopt.tune.candidates import Layer, Passes, safe_glob, settings_for
from onnxopt.tune.target import Budget, Target

MODEL, CALIB, TEST = "models/digits_cnn.onnx", "models/digits_calib.npz", "models/digits_test.npz"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One CLI run: size=0.25 within 1 point of accuracy, the model and report written."""
    folder = tmp_path_factory.mktemp("tune")
    out, report, html = folder / "tuned.onnx", folder / "report.json", folder / "report.html"
    argv = ["tune", MODEL, "--calib", CALIB, "--inputs", TEST, "--target", "size=0.25",
            "--max-drop", "1", "-o", str(out), "--report", str(report), "--quiet"]
    code = cli.main(argv + (["--html", str(html)] if importlib.util.find_spec("plotly") else []))
    return code, out, json.loads(report.read_text()), html


def test_digits_cnn_meets_a_quarter_of_the_size_within_one_point(tuned):
    code, out, report, _ = tuned
    assert code == 0 and report["met"] is True
    assert report["result"]["size_ratio"] <= 0.25 and out.stat().st_size <= 0.25 * Path(MODEL).stat().st_size
    assert report["budget"] == {"metric": "accuracy", "max_drop": 1.0}
    assert 0 <= report["result"]["drop"] <= 1.0
    assert report["baseline"]["metrics"]["accuracy"] == pytest.approx(99.44, abs=0.01)
    assert report["validation"]["samples"] == 360
    # every layer is reported with what it was measured at, and the chosen setting is among them
    names = [row["name"] for row in report["layers"]]
    assert names == ["/0/Conv", "/3/Conv", "/7/Conv", "/12/Gemm"]
    for row in report["layers"]:
        assert row["chosen"] == "float" or row["chosen"] in {c["setting"] for c in row["candidates"]}
    assert sum(p["chosen"] for p in report["points"]) == 1
    assert report["evaluations"] >= len(report["points"]) and report["executor"] == "local"


def test_the_printed_pipeline_reproduces_the_model_byte_for_byte(tuned, tmp_path, capsys):
    _, out, report, _ = tuned
    again = tmp_path / "again.onnx"
    assert cli.main(["optimize", MODEL, "--passes", report["pipeline"], "--calib", CALIB, "-o", str(again),
                     "--latency-runs", "0"]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_the_html_page_holds_the_report_numbers(tuned):
    pytest.importorskip("plotly", reason="--html needs plotly (pip install 'onnxopt[html]')")
    _, _, report, html = tuned
    page = html.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "met" in page
    assert report["pipeline"].replace("&", "&amp;") in page.replace("&#x27;", "'")
    for row in report["layers"]:
        assert row["name"] in page and row["chosen"] in page


def test_an_unreachable_target_exits_1_with_the_closest_point(tmp_path, capsys):
    out, report = tmp_path / "t.onnx", tmp_path / "r.json"
    code = cli.main(["tune", MODEL, "--calib", CALIB, "--inputs", TEST, "--target", "size=0.02",
                     "--max-drop", "0.5", "-o", str(out), "--report", str(report),
                     "--samples", "96", "--calib-samples", "48"])
    err = capsys.readouterr().err
    assert code == 1 and "closest point: size" in err and "nothing written" in err
    assert not out.exists()
    data = json.loads(report.read_text())
    assert data["met"] is False and data["output"] is None
    assert data["result"]["size_ratio"] > 0.02 and data["result"]["drop"] is not None
    chosen = next(p for p in data["points"] if p["chosen"])
    assert chosen["within_budget"] and chosen["drop"] <= 0.5  # the closest point the search found in budget


@pytest.mark.parametrize("argv, message", [
    (["--target", "speed=2"], "expected size=RATIO or latency=RATIO"),
    (["--target", "size=1.5"], "must be in (0, 1)"),
    (["--target", "size=0.5", "--max-drop", "-1"], "max_drop"),
    (["--target", "size=0.5", "--executor", "spark"], "unknown executor"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "t.onnx"
    assert cli.main(["tune", MODEL, "--calib", CALIB, "-o", str(out), *argv]) == 2
    assert message in capsys.readouterr().err and not out.exists()


class Reversed(LocalExecutor):
    """Runs the items last first (as a pool might finish them), returning them in item order."""

    def map(self, fn, shared, items, progress=None):
        done = {i: fn(shared, items[i]) for i in reversed(range(len(items)))}
        return [done[i] for i in range(len(items))]


def test_the_choice_does_not_depend_on_the_order_evaluations_run():
    runs = [tune(MODEL, CALIB, inputs=TEST, target="size=0.5", max_drop=1, executor=ex)
            for ex in (LocalExecutor(), Reversed())]
    assert runs[0].met and "qdq(" in runs[0].pipeline
    assert runs[0].pipeline == runs[1].pipeline and runs[0].layers == runs[1].layers


def test_targets_budgets_and_pipeline_strings():
    assert Target.parse("size=25%") == Target("size", 0.25) and str(Target.parse("latency=0.5")) == "latency=0.5"
    with pytest.raises(InputError):
        Target.parse("latency=0")
    assert Budget.make().max_drop == 1.0 and Budget.make(tolerance="min_cosine=0.99").max_drop is None
    assert Budget.make(0.5).holds(0.5, False) and not Budget.make(0.5).holds(0.51, True)
    layers = [Layer("a,b", "Conv", 1, 4, "conv"), Layer("fc", "Gemm", 1, 4, "gemm")]
    spec = Passes("static", 64).pipeline({"a,b": "prune(0.5)+int8", "fc": "int4"}, layers)
    assert spec == ("prune(sparsity=0.5,pattern=structured,samples=64,only=a?b),"
                    "woq(bits=4,block_size=32,only=fc),qdq(mode=static,samples=64,smooth=false,rounding=nearest,guard=false,"
                    "only=a?b)")
    assert safe_glob("x[0];(y)") == "x?0???y?"
    # int8 weights with float activations: in the same qdq step, named again in weight_only=
    spec = Passes("static", 64).pipeline({"a,b": "int8w", "fc": "int8"}, layers)
    assert spec == "qdq(mode=static,samples=64,smooth=false,rounding=nearest,guard=false,only=fc;a?b,weight_only=a?b)"
    conv = Layer("c", "Conv", 1, 4, "conv")
    assert "int8w" in settings_for(conv, "size", "static") and "int8w" not in settings_for(conv, "latency", "static")
    assert "int8w" not in settings_for(Layer("m", "MatMul", 64, 256, "matmul", (8, 8)), "size", "dynamic")


def test_the_evaluation_budget_stops_the_search_at_the_closest_point(tmp_path, capsys):
    """A search cut short by --max-evaluations reports the best point found by then, says so, and
    exits 1 when that point misses the target."""
    report = tmp_path / "r.json"
    code = cli.main(["tune", MODEL, "--calib", CALIB, "--inputs", TEST, "--target", "size=0.25",
                     "--max-drop", "1", "-o", str(tmp_path / "t.onnx"), "--report", str(report),
                     "--samples", "96", "--calib-samples", "48", "--max-evaluations", "3", "--quiet"])
    data = json.loads(report.read_text())
    assert data["evaluations"] <= 3 and any("budget of 3 evaluations" in n for n in data.get("notes", []))
    assert code == (0 if data["met"] else 1)
    assert sum(p["chosen"] for p in data["points"]) == 1


def test_the_validation_tolerance_of_a_drop_budget_says_it_bounds_nothing():
    """Without a tolerance the final model is validated with one that bounds nothing (the budget is
    judged on the budget metric); the report says 'none' rather than 'min_cosine=-1'."""
    from onnxopt.pipeline.tolerance import Tolerance
    from onnxopt.tune.target import Budget

    assert str(Budget.make(max_drop=1.0).validation_tolerance()) == "none"
    assert str(Budget.make(max_drop=1.0, tolerance="min_cosine=0.99").validation_tolerance()) == "min_cosine=0.99"
    assert str(Tolerance(min_cosine=-1.0, atol=0.5)) == "atol=0.5"
