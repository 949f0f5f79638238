"""HTML reports (onnxopt/html): the page is written, self-contained, holds the JSON report's numbers as
the page formats them, and renders in a headless browser where one is installed."""

from __future__ import annotations

import copy
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from onnxopt import html as html_report
from onnxopt.cli import main
from onnxopt.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
ARROW = "\u2192"

# The validation object as the optimize report holds it (Comparison.to_dict()), for a tuned digits CNN.
VALIDATION = {
    "outputs": [{
        "name": "logits", "dtype": "float32", "kind": "classes", "kind_reason": "a final Gemm to N outputs",
        "elements": 3600, "max_abs": 0.8123456, "mean_abs": 0.0731, "max_rel": 51.2, "cosine": 0.99961234,
        "snr_db": 31.4321, "mismatches": 3600, "identical": False, "top1_agreement": 0.9916666666666667,
        "sequence_match": None, "vector_cosine_mean": None, "vector_cosine_min": None,
        "perplexity_reference": None, "perplexity_candidate": None,
        "accuracy_reference": 0.9944444444444445, "accuracy_candidate": 0.9888888888888889,
        "floor_max_abs": 4.0531158447265625e-06, "allowed_abs": None, "compared": 3600,
        "nonfinite_reference": 0, "nonfinite_candidate": 0, "passed": True, "failures": []}],
    "tolerance": {"min_cosine": 0.99, "max_metric_drop": {"accuracy": 1.0}},
    "samples": 360, "batches": 12, "data": "models/digits_test.npz", "synthetic": False, "ort_opt_level": "all",
    "size_reference": 99364, "size_candidate": 23800, "latency_reference_ms": 0.41, "latency_candidate_ms": 0.30,
    "latency_runs": [100, 100], "floor_level": "disable", "inputs_nonfinite": {}, "notes": [],
    "metrics": [{"name": "accuracy", "reference": 99.44, "candidate": 98.89, "drop": 0.55, "lower_is_better": False,
                 "source": "logits", "limit": 1.0, "passed": True}],
    "passed": True, "identical": False,
}

PIPELINE = ("cleanup,prune(sparsity=0.5,method=wanda,layers=/7/Conv),"
            "qdq(mode=static,method=percentile,exclude=/0/Conv;/12/Gemm)")


def _candidate(setting, drop, saved, ms=0.0):
    return {"setting": setting, "drop": drop, "bytes_saved": saved, "ms_saved": ms}


def tune_report() -> dict:
    """A report as TuneResult.to_dict() gives it (TUNE_REPORT.md) for the shipped digits CNN."""
    return {
        "schema": "onnxopt.tune/1",
        "source": "models/digits_cnn.onnx",
        "output": "models/digits_cnn.tuned.onnx",
        "target": {"kind": "size", "value": 0.25},
        "budget": {"metric": "accuracy", "max_drop": 1.0},
        "met": True,
        "message": "size 0.24x <= 0.25x with accuracy 99.44% -> 98.89% (drop 0.55 <= 1.0)",
        "pipeline": PIPELINE,
        "baseline": {"bytes": 99364, "latency_ms": 0.41, "metrics": {"accuracy": 99.44}},
        "result": {"bytes": 23800, "latency_ms": 0.30, "metrics": {"accuracy": 98.89},
                   "size_ratio": 0.24, "latency_ratio": 0.73, "drop": 0.55},
        "layers": [
            {"name": "/0/Conv", "op": "Conv", "params": 160, "bytes": 640, "chosen": "float",
             "candidates": [_candidate("int8", 1.37, 432), _candidate("prune(0.5)", 2.78, 0)]},
            {"name": "/3/Conv", "op": "Conv", "params": 4640, "bytes": 18560, "chosen": "int8",
             "candidates": [_candidate("int8", 0.11, 13920, 0.01), _candidate("prune(0.5)", 0.83, 0)]},
            {"name": "/7/Conv", "op": "Conv", "params": 18496, "bytes": 73984, "chosen": "prune(0.5)+int8",
             "candidates": [_candidate("int8", 0.28, 55488, 0.02), _candidate("prune(0.5)", 0.42, 0),
                            _candidate("prune(0.5)+int8", 0.47, 64200, 0.02)]},
            {"name": "/12/Gemm", "op": "Gemm", "params": 650, "bytes": 2600, "chosen": "float",
             "candidates": [_candidate("int8", 0.56, 1950), _candidate("svd(0.5)", 4.17, 1300)]},
        ],
        "points": [
            {"label": "all int8", "pipeline": "cleanup,qdq(mode=static)", "size_ratio": 0.33,
             "latency_ratio": 0.70, "drop": 1.94, "cosine": 0.9991, "chosen": False},
            {"label": "greedy step 1", "pipeline": "cleanup,qdq(mode=static,exclude=/0/Conv)", "size_ratio": 0.34,
             "latency_ratio": 0.71, "drop": 0.83, "cosine": 0.9994, "chosen": False},
            {"label": "greedy step 2", "pipeline": "cleanup,qdq(mode=static,exclude=/0/Conv;/12/Gemm)",
             "size_ratio": 0.35, "latency_ratio": 0.72, "drop": 0.28, "cosine": 0.9996, "chosen": False},
            {"label": "greedy step 3", "pipeline": PIPELINE, "size_ratio": 0.24, "latency_ratio": 0.73,
             "drop": 0.55, "cosine": 0.9996, "chosen": True},
            {"label": "greedy step 4", "pipeline": "cleanup,prune(sparsity=0.75),qdq(mode=static)",
             "size_ratio": 0.19, "latency_ratio": 0.74, "drop": 2.5, "cosine": 0.9962, "chosen": False},
        ],
        "validation": copy.deepcopy(VALIDATION),
        "evaluations": 57, "executor": "local", "workers": 1, "seed": 0, "seconds": 12.3,
    }


def self_contained(text: str) -> bool:
    """No script, style sheet, image or frame fetched from the network."""
    remote = re.compile(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=\s*[\"']?\s*(https?:)?//", re.I)
    return not remote.search(text) and not re.search(r"@import\s+url\(\s*[\"']?https?:", text, re.I)


def without_plotly(monkeypatch):
    for name in ("plotly", "plotly.graph_objects", "plotly.offline"):
        monkeypatch.setitem(sys.modules, name, None)


# ----------------------------------------------------------------- without plotly (every environment)

def test_require_plotly_names_the_extra(monkeypatch):
    without_plotly(monkeypatch)
    with pytest.raises(InputError, match=re.escape("--html needs plotly: pip install 'onnxopt[html]'")):
        html_report.require_plotly()


def test_optimize_html_without_plotly_exits_2_before_any_work(tmp_path, monkeypatch, capsys):
    without_plotly(monkeypatch)
    monkeypatch.setattr("onnxopt.api.optimize", lambda *a, **k: pytest.fail("work started without plotly"))
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(ROOT / "models/digits_cnn.onnx"), "-o", str(out), "--report",
                 str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "onnxopt: error: --html needs plotly: pip install 'onnxopt[html]'"
    assert list(tmp_path.iterdir()) == []


def test_optimize_html_to_a_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("onnxopt.api.optimize", lambda *a, **k: pytest.fail("work started"))
    code = main(["optimize", str(ROOT / "models/digits_cnn.onnx"), "-o", str(tmp_path / "out.onnx"),
                 "--html", str(tmp_path)])
    assert code == 2 and "HTML report path is a directory" in capsys.readouterr().err


# ----------------------------------------------------------------- pages (plotly installed)

@pytest.fixture
def plotly():
    return pytest.importorskip("plotly")


@pytest.fixture(scope="module")
def optimize_run(tmp_path_factory):
    """One `optimize --html --report` run on the digits CNN: the page and the JSON report beside it."""
    pytest.importorskip("plotly")
    folder = tmp_path_factory.mktemp("optimize_html")
    argv = ["optimize", ROOT / "models/digits_cnn.onnx", "-o", folder / "out.onnx", "--passes", "cleanup,qdq",
            "--calib", ROOT / "models/digits_calib.npz", "--inputs", ROOT / "models/digits_test.npz",
            "--report", folder / "report.json", "--html", folder / "report.html", "--latency-runs", "5"]
    assert main([str(a) for a in argv]) == 0
    return (folder / "report.html").read_text(encoding="utf-8"), json.loads((folder / "report.json").read_text())


def test_optimize_page_holds_the_reports_numbers(optimize_run):
    page, report = optimize_run
    assert page.startswith("<!DOCTYPE html>") and self_contained(page)
    assert html.escape(report["pipeline"]) in page
    before, after = report["before"], report["after"]
    assert f"97.0 KiB {ARROW} 32.6 KiB" in page  # file sizes as the summary prints them
    assert f"{before['nodes']} {ARROW} {after['nodes']}" in page
    assert f"{before['parameters']:,} {ARROW} {after['parameters']:,}" in page
    out = report["validation"]["outputs"][0]
    assert f"{out['max_abs']:.3g}" in page and f"{out['floor_max_abs']:.3g}" in page
    assert f"{out['cosine']:.6f}" in page and f"{out['snr_db']:.1f} dB" in page
    assert f"accuracy 99.44% {ARROW} 99.44%" in page and "top-1 agreement 100.00%" in page
    assert "PASSED" in page and "min_cosine=0.99,max_top1_drop=1" in page
    qdq = next(p for p in report["passes"] if p["name"] == "qdq")
    assert f"{qdq['bytes_before']:,} {ARROW} {qdq['bytes_after']:,}" in page
    assert "bn folded 3" in page and "fold_bn x2" in page  # the fixed-point group merged as in the summary
    assert html.escape(qdq["notes"][0]) in page
    assert page.count('class="plotly-graph-div"') == 2  # bytes through the passes, errors vs noise floor


def test_optimize_page_of_a_failed_run_and_one_without_validation(plotly, optimize_run):
    _, report = optimize_run
    failed = copy.deepcopy(report)
    failed["passed"] = failed["validation"]["passed"] = failed["validation"]["outputs"][0]["passed"] = False
    failed["validation"]["outputs"][0]["failures"] = ["cosine 0.9 < min_cosine=0.99"]
    failed["output"] = None
    page = html_report.render_optimize_report(failed)
    assert "FAILED" in page and "cosine 0.9 &lt; min_cosine=0.99" in page and "(nothing written)" in page
    bare = {**report, "validation": None, "validation_not_run": "no synthetic input runs the model"}
    page = html_report.render_optimize_report(bare)
    assert "validation: not run (no synthetic input runs the model)" in page


def test_optimize_html_is_written_when_validation_fails(plotly, tmp_path, capsys):
    """Like the JSON report: the page shows why, while the model is not written."""
    page = tmp_path / "r.html"
    code = main(["optimize", str(ROOT / "models/digits_cnn.onnx"), "-o", str(tmp_path / "out.onnx"),
                 "--tolerance", "atol=-1", "--latency-runs", "0", "--html", str(page)])
    assert code == 1 and "validation failed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html"]
    text = page.read_text(encoding="utf-8")
    assert "FAILED" in text and "(nothing written)" in text and "exceeds atol=-1" in text


def test_tune_page_holds_the_reports_numbers(plotly, tmp_path):
    report = tune_report()
    path = html_report.write_tune_report(report, tmp_path / "tune.html")
    page = path.read_text(encoding="utf-8")
    assert self_contained(page) and [p.name for p in tmp_path.iterdir()] == ["tune.html"]
    assert html.escape(PIPELINE) in page and html.escape(report["message"]) in page
    assert "target met" in page and "target size \u2264 0.25x, accuracy drop \u2264 1 points" in page
    assert "evaluations: <b>57</b>" in page and "local (1 worker)" in page and "12.3 s" in page
    assert f"97.0 KiB {ARROW} 23.2 KiB" in page and "0.24x of the original" in page
    assert f"0.410 ms {ARROW} 0.300 ms" in page and "0.73x of the original" in page
    assert f"99.44 {ARROW} 98.89" in page and "drop 0.55 points" in page
    # the chosen setting per layer, with its own drop and bytes saved, and every setting measured
    assert "<b>prune(0.5)+int8</b>" in page and "64,200" in page and "prune(0.5)+int8 0.47" in page
    assert "svd(0.5) 4.17" in page and "<b>float</b>" in page
    # every point tried, in search order
    for p in report["points"]:
        assert html.escape(p["pipeline"]) in page and f"{p['drop']:.2f}" in page
    # the validation table: per-output figures as in the optimize page
    assert "0.812" in page and "4.05e-06" in page and "0.999612" in page and "31.4 dB" in page
    assert f"accuracy 99.44% {ARROW} 98.89%" in page and "top-1 agreement 99.17%" in page
    assert f"99.44 {ARROW} 98.89</td>" in page and "max_metric_drop=accuracy:1" in page  # the metric row
    assert page.count('class="plotly-graph-div"') == 3  # curve, sensitivity, errors vs noise floor


def test_tune_curve_marks_the_chosen_point_and_the_target_on_the_targets_axis(plotly):
    from onnxopt.html import charts

    report = tune_report()
    fig = charts.tradeoff(report["points"], "size_ratio", "size", 0.25, 1.0, "accuracy")
    traces = {t.name: t for t in fig.data}
    assert list(traces["chosen"].x) == [0.24] and list(traces["chosen"].y) == [0.55]
    assert list(traces["points tried"].x) == [0.33, 0.34, 0.35, 0.24, 0.19]
    assert list(traces["original"].x) == [1.0]
    # the best trade-offs: nothing tried beats them on both size and drop
    front = list(zip(traces["best trade-offs"].x, traces["best trade-offs"].y))
    assert front == [(0.19, 2.5), (0.24, 0.55), (0.35, 0.28), (1.0, 0.0)]
    shapes = [(s.x0, s.y0) for s in fig.layout.shapes]
    assert (0.25, 0) in shapes and (0, 1.0) in shapes  # the target (vertical) and the budget (horizontal)
    latency = {**report, "target": {"kind": "latency", "value": 0.5}}
    page = html_report.render_tune_report(latency)
    assert "latency (x of the original's median)" in page and "Latency vs accuracy drop" in page


def test_sensitivity_bars_put_the_most_sensitive_layer_on_top_and_outline_the_chosen_setting(plotly):
    from onnxopt.html import charts

    fig, shown = charts.sensitivity(tune_report()["layers"], "accuracy")
    assert shown == 4
    # bottom to top: by the least drop any setting of the layer causes
    assert list(fig.layout.yaxis.categoryarray) == ["/3/Conv", "/7/Conv", "/12/Gemm", "/0/Conv"]
    int8 = next(t for t in fig.data if t.name == "int8")
    assert list(int8.y) == ["/3/Conv", "/7/Conv", "/12/Gemm", "/0/Conv"] and list(int8.x) == [0.11, 0.28, 0.56, 1.37]
    assert list(int8.marker.line.width) == [2.5, 0, 0, 0]  # /3/Conv chose int8
    both = next(t for t in fig.data if t.name == "prune(0.5)+int8")
    assert list(both.y) == ["/7/Conv"] and list(both.marker.line.width) == [2.5]
    many = [{"name": f"layer{i}", "chosen": "float", "candidates": [_candidate("int8", i / 100, 10)]} for i in range(80)]
    fig, shown = charts.sensitivity(many, "accuracy")
    assert shown == charts.MAX_SENSITIVITY_LAYERS == 60
    assert fig.layout.yaxis.categoryarray[-1] == "layer79" and "layer19" not in fig.layout.yaxis.categoryarray


def test_tune_page_of_a_target_not_met_with_little_in_it(plotly):
    report = {"schema": "onnxopt.tune/1", "source": "m.onnx", "output": None, "met": False,
              "target": {"kind": "latency", "value": 0.5}, "budget": {"metric": "cosine", "max_drop": 0.1},
              "message": "latency 0.62x > 0.5x: closest point <cleanup,qdq>", "pipeline": "cleanup",
              "layers": [{"name": "<script>alert(1)</script>", "op": "MatMul", "chosen": "float", "candidates": []}],
              "points": [], "validation": None}
    page = html_report.render_tune_report(report)
    assert "target not met" in page and "(nothing written)" in page and "validation: skipped" in page
    assert "closest point &lt;cleanup,qdq&gt;" in page
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


# ----------------------------------------------------------------- a headless browser draws it

def _browser():
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def _dump_dom(page: Path, profile: Path) -> str:
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser (chromium) installed")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--host-resolver-rules=MAP * ~NOTFOUND",  # no network: the page must draw offline
           "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_pages_render_in_a_headless_browser(plotly, tmp_path, optimize_run):
    tune = html_report.write_tune_report(tune_report(), tmp_path / "tune.html")
    dom = _dump_dom(tune, tmp_path / "profile")
    assert dom.count('class="main-svg"') >= 3 * 2  # plotly drew each figure (two SVG layers each)
    assert dom.count("<table") >= 3 and "prune(0.5)+int8" in dom
    optimize = tmp_path / "optimize.html"
    optimize.write_text(optimize_run[0], encoding="utf-8")
    dom = _dump_dom(optimize, tmp_path / "profile")
    assert dom.count('class="main-svg"') >= 2 * 2 and dom.count("<table") >= 2
