"""End-to-end CLI: what users see, exit codes, and that nothing is written on failure."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from onnxopt.cli import main
from models_for_tests import mlp, save

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cnn(tmp_path):
    for name in ("digits_cnn.onnx", "digits_test.npz", "digits_calib.npz"):
        shutil.copy(ROOT / "models" / name, tmp_path / name)
    return tmp_path / "digits_cnn.onnx"


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_optimize_writes_default_output_and_report(cnn, capsys):
    report = cnn.parent / "report.json"
    code, out, err = run(["optimize", cnn, "--inputs", cnn.parent / "digits_test.npz", "--report", report,
                          "--latency-runs", "3"], capsys)
    assert code == 0, err
    assert (cnn.parent / "digits_cnn.opt.onnx").is_file()
    assert "pipeline: cleanup" in out and "PASSED" in out and "latency (median)" in out
    data = json.loads(report.read_text())
    assert data["passed"] and data["pipeline"] == "cleanup"
    umask = os.umask(0)
    os.umask(umask)
    assert report.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600
    assert data["validation"]["outputs"][0]["accuracy_candidate"] == pytest.approx(358 / 360)
    assert [p["name"] for p in data["passes"]][:3] == ["fold", "shape_fold", "fold_bn"]


def test_validation_failure_exits_1_and_writes_nothing(cnn, capsys):
    before = cnn.read_bytes()
    # An impossible tolerance: any float error at all fails; identical outputs would pass, so
    # use a negative atol that even equality cannot meet.
    code, out, err = run(["optimize", cnn, "-o", cnn.parent / "out.onnx", "--tolerance", "atol=-1",
                          "--latency-runs", "0"], capsys)
    assert code == 1
    assert "validation failed" in err and "nothing written" in err
    assert not (cnn.parent / "out.onnx").exists()
    assert cnn.read_bytes() == before
    code, out, err = run(["optimize", cnn, "-o", cnn.parent / "out.onnx", "--tolerance", "atol=-1",
                          "--keep-on-fail", "--latency-runs", "0"], capsys)
    assert code == 1 and (cnn.parent / "out.onnx").exists()


def test_nan_only_inputs_fail_validation_with_one_line(cnn, capsys):
    x = np.load(cnn.parent / "digits_test.npz")["input"][:8]
    np.savez(cnn.parent / "nan.npz", input=np.full_like(x, np.nan))
    report = cnn.parent / "r.json"
    code, out, err = run(["optimize", cnn, "-o", cnn.parent / "out.onnx", "--inputs", cnn.parent / "nan.npz",
                          "--report", report], capsys)
    assert code == 1 and "PASSED" not in out and not (cnn.parent / "out.onnx").exists()
    assert len(err.strip().splitlines()) == 1 and "not computable" in err and "'input' 512 of 512" in err
    validation = json.loads(report.read_text())["validation"]
    assert validation["outputs"][0]["compared"] == 0 and validation["inputs_nonfinite"]["input"]["nan"] == 512


def test_default_run_prints_the_floor_and_adapts_latency_runs(cnn, capsys):
    report = cnn.parent / "r.json"
    code, out, err = run(["optimize", cnn, "-o", cnn.parent / "out.onnx", "--inputs", cnn.parent / "digits_test.npz",
                          "--report", report], capsys)
    assert code == 0, err
    validation = json.loads(report.read_text())["validation"]
    floor = validation["outputs"][0]["floor_max_abs"]
    assert floor > 0 and f"(runtime noise {floor:.3g})" in out and "floor_multiple=8" in out
    runs = validation["latency_runs"]
    assert len(runs) == 2 and all(1 <= r <= 100 for r in runs) and f"{runs[0]} / {runs[1]} runs" in out


def test_large_model_is_validated_from_mapped_files_and_saved_the_same(cnn, capsys, monkeypatch):
    from onnxopt import api, runtime, serialize

    small = api.optimize(cnn, inputs=cnn.parent / "digits_test.npz")
    monkeypatch.setattr(runtime, "FILE_SESSION_BYTES", -1)
    monkeypatch.setattr(serialize, "STREAM_BYTES", -1)
    large = api.optimize(cnn, inputs=cnn.parent / "digits_test.npz")
    assert large.original is None and small.original is not None  # released: read from the file again if needed
    size_line = [line for line in small.summary().splitlines() if line.startswith("size:")]
    assert large.totals == small.totals and size_line and size_line[0] in large.summary()
    assert large.validation.outputs[0].max_abs == small.validation.outputs[0].max_abs
    large.save(cnn.parent / "large.onnx")
    small.save(cnn.parent / "small.onnx")
    assert (cnn.parent / "large.onnx").read_bytes() == (cnn.parent / "small.onnx").read_bytes()


@pytest.mark.parametrize("case", ["truncated", "random", "missing_external", "same_path", "unknown_pass",
                                  "bad_option", "bad_inputs_dtype", "bad_inputs_name", "bad_inputs_shape",
                                  "empty_dir", "bad_max_growth"])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case):
    model = tmp_path / "m.onnx"
    save(mlp(), model)
    args = ["optimize", model, "-o", tmp_path / "out.onnx", "--latency-runs", "0"]
    expect = {
        "truncated": "not a valid ONNX model", "random": "not a valid ONNX model",
        "missing_external": "missing external data file", "same_path": "output path is the input model",
        "unknown_pass": "unknown pass 'fold_everything'; known passes:", "bad_option": "pass 'dce' has no option 'depth'",
        "bad_inputs_dtype": "input 'x' must be float32, validation data has float64",
        "bad_inputs_name": "validation data has array 'image' but the model's inputs are: x",
        "bad_inputs_shape": "input 'x' has shape [batch, 4], validation data has shape [2, 5]",
        "empty_dir": "folder holds no .npz or .npy files",
        "bad_max_growth": "max_growth: expected a fraction (0.05), a percentage (5%) or 'none', got 'lots'",
    }[case]
    if case == "truncated":
        model.write_bytes(model.read_bytes()[:100])
    elif case == "random":
        model.write_bytes(np.random.default_rng(0).bytes(2000))
    elif case == "missing_external":
        import onnx
        onnx.save_model(mlp(), str(model), save_as_external_data=True, location="w.bin", size_threshold=0)
        (tmp_path / "w.bin").unlink()
    elif case == "same_path":
        args[3] = model
    elif case == "unknown_pass":
        args += ["--passes", "fold_everything"]
    elif case == "bad_option":
        args += ["--passes", "dce(depth=3)"]
    elif case == "bad_max_growth":
        args += ["--max-growth", "lots"]
    elif case.startswith("bad_inputs") or case == "empty_dir":
        arrays = {"bad_inputs_dtype": {"x": np.zeros((2, 4))}, "bad_inputs_name": {"image": np.zeros((2, 4), np.float32)},
                  "bad_inputs_shape": {"x": np.zeros((2, 5), np.float32)}}.get(case)
        data = tmp_path / "data"
        data.mkdir()
        if arrays:
            np.savez(data / "d.npz", **arrays)
        args += ["--inputs", data]
    before = sorted(os.listdir(tmp_path))
    model_bytes = model.read_bytes()
    code, out, err = run(args, capsys)
    assert code == 2
    assert expect in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == before and model.read_bytes() == model_bytes


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["optimize"])
    assert info.value.code == 2
    assert "onnxopt: error:" in capsys.readouterr().err


def test_verify_each_cli_saves_reproducer(cnn, capsys):
    import onnxopt
    from onnxopt.pipeline import Pass, PassResult, register_pass

    @register_pass
    class NegateOutput(Pass):
        """Negates the graph output (broken on purpose)."""

        name = "negate_output"

        def run(self, graph, ctx):
            onnxopt.graph.insert_after(graph, graph.outputs[0], "Neg")
            return PassResult(True, {})

    out = cnn.parent / "o.onnx"
    code, stdout, err = run(["optimize", cnn, "-o", out, "--passes", "dce,negate_output", "--verify-each",
                             "--inputs", cnn.parent / "digits_test.npz"], capsys)
    assert code == 1
    assert "pass 'negate_output' took the model out of tolerance" in err
    assert "accuracy 99.44% ->" in err
    assert (cnn.parent / "o.onnx.repro" / "before.onnx").is_file()
    assert (cnn.parent / "o.onnx.repro" / "pipeline.txt").read_text().strip() == "negate_output"
    assert not out.exists()


def test_inspect_and_passes_and_compare(cnn, capsys):
    code, out, _ = run(["inspect", cnn], capsys)
    assert code == 0
    assert "IR version 8, opsets: ai.onnx 17" in out
    assert "Conv 3, BatchNormalization 3, Relu 3" in out
    assert "input: float [batch, 1, 8, 8]" in out and "logits: float [batch, 10]" in out
    code, out, _ = run(["inspect", cnn, "--json"], capsys)
    assert json.loads(out)["ops"]["Conv"] == 3
    code, out, _ = run(["passes"], capsys)
    assert code == 0 and "dce (exact):" in out
    assert "    identities = true    (true|false): also remove Identity nodes, reconnecting their consumers\n" in out
    other = cnn.parent / "mlp.onnx"
    shutil.copy(ROOT / "models" / "digits_mlp.onnx", other)
    code, out, err = run(["compare", cnn, other, "--inputs", cnn.parent / "digits_test.npz", "--latency-runs", "0"],
                         capsys)
    assert code == 1 and "FAILED" in out  # two different models
    assert err.startswith("onnxopt: error: the models differ: output 'logits'") and err.count("\n") == 1
    code, out, _ = run(["compare", cnn, cnn, "--latency-runs", "0", "--dim", "batch=4"], capsys)
    assert code == 0 and "identical" in out and "4 sample(s) from synthetic inputs" in out


# ----------------------------------------------------------------- no data given

def test_no_data_finds_inputs_the_model_runs_on(tmp_path, capfd):
    from test_synthetic import detector
    model, report = save(detector(), tmp_path / "det.onnx"), tmp_path / "report.json"
    code = main(["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "--latency-runs", "0",
                 "--report", str(report)])
    out, err = capfd.readouterr()
    assert code == 0 and (tmp_path / "out.onnx").is_file()
    assert "validation inputs: synthetic (image: float32[1,3,64,64]; dims batch=1, height=64, width=64)" in out
    used = json.loads(report.read_text())["validation_inputs"]
    assert used["kind"] == "synthetic" and used["dims"] == {"batch": 1, "height": 64, "width": 64}
    assert "onnxruntime" not in err


def test_no_runnable_input_writes_an_exact_result_with_a_warning(tmp_path, capfd):
    from test_synthetic import never_runs
    model, out_path = save(never_runs(), tmp_path / "m.onnx"), tmp_path / "out.onnx"
    code = main(["optimize", str(model), "-o", str(out_path), "--latency-runs", "0"])
    out, err = capfd.readouterr()
    assert code == 0 and out_path.is_file()
    assert "validation: not run (ONNX Runtime cannot run the original model on synthetic inputs" in out
    assert "node 'n_y' (Reshape)" in out and "; give --inputs)" in out
    assert err.count("\n") == 1 and err.startswith("onnxopt: warning: validation not run")
    assert "onnxruntime" not in err and "[E:" not in err  # ORT's own log lines stay silent
    out_path.unlink()
    assert main(["optimize", str(model), "-o", str(out_path), "--strict"]) == 1
    _, err = capfd.readouterr()
    assert not out_path.exists() and "--strict refuses" in err
    assert main(["optimize", str(model), "-o", str(out_path), "--passes", "prune(sparsity=0.5)"]) == 1
    _, err = capfd.readouterr()
    assert not out_path.exists() and "a lossy pipeline is not written unvalidated" in err


@pytest.mark.parametrize("samples, held_out", [(64, True), (512, False)])
def test_lossy_pipeline_validates_on_calibration_samples_it_did_not_read(cnn, capsys, samples, held_out):
    report = cnn.parent / "r.json"
    code, out, err = run(["optimize", cnn, "--passes", f"cleanup,qdq(samples={samples})", "--calib",
                          cnn.parent / "digits_calib.npz", "--latency-runs", "0", "--report", report], capsys)
    assert code == 0, err
    used = json.loads(report.read_text())["validation_inputs"]
    if held_out:
        assert used["kind"] == "calibration held out" and used["samples"] == 256
        assert "256 held-out calibration samples (64-319 of" in out
    else:
        assert used["kind"] == "calibration tail" and used["samples"] == 90
        assert "the last 90 of 360 calibration samples" in out and "calibration read them too" in out


@pytest.mark.parametrize("flag", ["-o", "--report"])
def test_output_or_report_naming_a_directory_exits_2_before_work(tmp_path, capsys, flag):
    model = save(mlp(), tmp_path / "m.onnx")
    folder = tmp_path / "isdir.onnx"
    folder.mkdir()
    args = ["optimize", model, "--latency-runs", "0", flag, folder]
    code, out, err = run(args, capsys)
    assert code == 2 and out == ""  # refused before any pass ran
    assert err.strip() == f"onnxopt: error: {folder}: {'output' if flag == '-o' else 'report'} path is a directory; name a file"
    assert sorted(os.listdir(tmp_path)) == ["isdir.onnx", "m.onnx"] and os.listdir(folder) == []


def test_corrupt_string_field_exits_2(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    model.write_bytes(mlp().SerializeToString().replace(b"relu1", b"\xb3elu1"))
    code, out, err = run(["optimize", model, "-o", tmp_path / "out.onnx"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "not a valid ONNX model (corrupt file: graph.node[2].name" in err and "not valid UTF-8" in err
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("argv, hint", [([], "(see onnxopt --help)"), (["optimize"], "(see onnxopt optimize --help)"),
                                        (["compare", "a.onnx"], "(see onnxopt compare --help)")])
def test_usage_error_names_the_right_help(capsys, argv, hint):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("onnxopt: error:") and err.strip().endswith(hint)


def test_qdq_runs_fold_bn_first_and_says_so(cnn, capsys):
    import onnx

    data = cnn.parent / "digits_calib.npz"
    out, report = cnn.parent / "q.onnx", cnn.parent / "r.json"
    code, text, err = run(["optimize", cnn, "--passes", "qdq", "--calib", data, "--latency-runs", "0",
                           "-o", out, "--report", report], capsys)
    assert code == 0, err
    assert "fold_bn (auto)" in text and "note (fold_bn): run before 'qdq'" in text and "run 'cleanup' first" not in text
    rep = json.loads(report.read_text())
    assert rep["pipeline"].startswith("fold_bn(") and ",qdq(" in rep["pipeline"]
    assert rep["passes"][0]["name"] == "fold_bn" and rep["passes"][0]["required_by"] == "qdq"
    qdq = next(p for p in rep["passes"] if p["name"] == "qdq")
    assert qdq["stats"]["quantized_Conv"] == 3 and qdq["stats"]["skipped_batchnorm_not_folded"] == 0
    assert not any(n.op_type == "BatchNormalization" for n in onnx.load(str(out)).graph.node)
    # the printed pipeline reproduces the run
    code, _, err = run(["optimize", cnn, "--passes", rep["pipeline"], "--calib", data, "--latency-runs", "0",
                        "-o", cnn.parent / "q2.onnx", "--no-validate"], capsys)
    assert code == 0, err
    assert (cnn.parent / "q2.onnx").read_bytes() == out.read_bytes()


def test_no_prerequisites_keeps_batchnorm_layers_float(cnn, capsys):
    report = cnn.parent / "r.json"
    code, text, err = run(["optimize", cnn, "--passes", "qdq", "--calib", cnn.parent / "digits_calib.npz",
                           "--latency-runs", "0", "-o", cnn.parent / "q.onnx", "--report", report,
                           "--no-prerequisites"], capsys)
    assert code == 0, err
    rep = json.loads(report.read_text())
    assert rep["pipeline"].startswith("qdq(") and rep["pipeline"].endswith(",prerequisites=false)")
    assert [p["name"] for p in rep["passes"]] == ["qdq", "dce"]
    assert rep["passes"][0]["stats"]["skipped_batchnorm_not_folded"] == 3 and "run 'cleanup' first" in text


def test_scalar_labels_exit_2(tmp_path, capsys):
    model = save(mlp(), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 4), np.float32), labels=np.array(3))
    code, out, err = run(["optimize", model, "-o", tmp_path / "o.onnx", "--inputs", tmp_path / "d.npz"], capsys)
    assert code == 2 and err.strip().endswith("'labels' holds a single value; it needs one label per sample")


def test_empty_list_attribute_survives_export(tmp_path, capsys):
    # gs cannot type an empty list attribute on export; it used to end in an internal error
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("ReduceSum", ["x"], ["y"], name="sum_all", keepdims=0)
    node.attribute.append(onnx.AttributeProto(name="axes", type=onnx.AttributeProto.INTS))  # axes=[]: all
    graph = helper.make_graph([helper.make_node("Identity", ["x0"], ["x"], name="id"), node], "g",
                              [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    model = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)]), tmp_path / "m.onnx")
    code, out, err = run(["optimize", model, "-o", tmp_path / "o.onnx", "--passes", "noop,dce", "--latency-runs", "0"],
                         capsys)
    assert code == 0, err
    written = onnx.load(str(tmp_path / "o.onnx"))
    kept = next(n for n in written.graph.node if n.op_type == "ReduceSum")
    axes = next(a for a in kept.attribute if a.name == "axes")
    assert axes.type == onnx.AttributeProto.INTS and list(axes.ints) == [] and len(written.graph.node) == 1


def test_calibration_data_with_nan_is_refused_before_any_pass(cnn, capsys):
    calib = dict(np.load(cnn.parent / "digits_calib.npz"))
    calib["input"] = calib["input"][:16].copy()
    calib["input"][5, 0, 3, 3] = np.nan
    np.savez(cnn.parent / "bad_calib.npz", **calib)
    before = cnn.read_bytes()
    code, out, err = run(["optimize", cnn, "-o", cnn.parent / "out.onnx", "--passes", "cleanup,qdq",
                          "--calib", cnn.parent / "bad_calib.npz", "--latency-runs", "0"], capsys)
    assert code == 2 and not (cnn.parent / "out.onnx").exists() and cnn.read_bytes() == before
    assert len(err.strip().splitlines()) == 1
    assert "calibration data input 'input' holds NaN (sample 5)" in err


# ----------------------------------------------------------------- output kinds and the metric hook

HOOK = '''
import numpy as np

def accuracy(outputs, labels):
    return {"accuracy": float(np.mean(outputs["logits"].argmax(1) == labels["labels"]))}

def broken(outputs, labels):
    raise RuntimeError("no labels here")

def words(outputs, labels):
    return {"accuracy": "high"}
'''


@pytest.fixture
def hook(cnn):
    (cnn.parent / "hook.py").write_text(HOOK)
    with np.load(cnn.parent / "digits_test.npz") as data:
        np.savez(cnn.parent / "labels.npz", labels=data["labels"])
    return cnn.parent / "hook.py"


def test_digits_outputs_are_class_scores_and_kinds_can_be_overridden(cnn, capsys):
    data = cnn.parent / "digits_test.npz"
    code, out, err = run(["optimize", cnn, "--inputs", data, "--latency-runs", "0"], capsys)
    assert code == 0, err
    assert "  logits [classes]: identical" in out or "  logits [classes]: ok" in out
    assert "judged as: logits classes (a final Gemm to N outputs)" in out and "top-1 agreement 100.00%" in out
    code, out, err = run(["optimize", cnn, "--inputs", data, "--latency-runs", "0", "--output-kind", "logits=embedding"],
                         capsys)
    assert code == 0, err
    assert "logits [embedding]" in out and "logits embedding (set by the user)" in out
    assert "top-1" not in out and "per-vector cosine mean" in out
    code, out, err = run(["optimize", cnn, "-o", cnn.parent / "x.onnx", "--output-kind", "probs=classes"], capsys)
    assert code == 2 and "output_kinds names 'probs', which is not an output of the model" in err
    assert not (cnn.parent / "x.onnx").exists()


def test_metric_hook_passes_and_its_figures_are_reported(cnn, hook, capsys):
    report = cnn.parent / "r.json"
    code, out, err = run(["optimize", cnn, "--inputs", cnn.parent / "digits_test.npz", "--labels",
                          cnn.parent / "labels.npz", "--metric", f"{hook}:accuracy", "--tolerance",
                          "atol=1e-5,rtol=1e-4,floor_multiple=8,max_metric_drop=accuracy:0.01",
                          "--latency-runs", "0", "--report", report], capsys)
    assert code == 0, err
    assert f"metric accuracy ({hook}:accuracy; higher is better): ok: 0.994444 -> 0.994444 (drop 0, limit 0.01)" in out
    (metric,) = json.loads(report.read_text())["validation"]["metrics"]
    assert metric["name"] == "accuracy" and metric["reference"] == pytest.approx(358 / 360) and metric["passed"]


def test_metric_drop_past_the_limit_exits_1_and_writes_nothing(cnn, hook, capsys):
    model = cnn.parent / "digits_mlp.onnx"
    shutil.copy(ROOT / "models" / "digits_mlp.onnx", model)
    out_path = cnn.parent / "pruned.onnx"
    code, out, err = run(["optimize", model, "-o", out_path, "--passes", "prune(sparsity=0.95)", "--inputs",
                          cnn.parent / "digits_test.npz", "--metric", f"{hook}:accuracy", "--tolerance",
                          "min_cosine=0,max_metric_drop=accuracy:0.01", "--latency-runs", "0"], capsys)
    assert code == 1
    assert "metric accuracy" in out and "FAIL" in out
    assert err.startswith("onnxopt: error: validation failed: metric 'accuracy': 0.975 -> ")
    assert "nothing written" in err and not out_path.exists()


@pytest.mark.parametrize("spec,message", [
    ("{hook}:broken", "metric {hook}:broken raised RuntimeError: no labels here"),
    ("{hook}:words", "metric {hook}:words returned 'accuracy': str; expected a dict of names to numbers"),
    ("{hook}:missing", "metric {hook}:missing: '{hook}' has no 'missing'"),
    ("no_such_metrics_module:f", "metric no_such_metrics_module:f: cannot import 'no_such_metrics_module': "
                                 "ModuleNotFoundError"),
    ("{dir}/nowhere.py:f", "metric {dir}/nowhere.py:f: no such file"),
])
def test_bad_metric_hook_exits_2_with_one_line_and_writes_nothing(cnn, hook, capsys, spec, message):
    spec = spec.format(hook=hook, dir=cnn.parent)
    out_path, report = cnn.parent / "out.onnx", cnn.parent / "r.json"
    code, out, err = run(["optimize", cnn, "-o", out_path, "--inputs", cnn.parent / "digits_test.npz",
                          "--metric", spec, "--latency-runs", "0", "--report", report], capsys)
    assert code == 2
    assert err.startswith("onnxopt: error: " + message.format(hook=hook, dir=cnn.parent)) and err.count("\n") == 1
    assert not out_path.exists() and not report.exists()


def test_recipe_names_metric_labels_and_kinds_relative_to_itself(cnn, hook):
    import onnxopt

    recipe = cnn.parent / "recipe.yaml"
    recipe.write_text("passes: cleanup\ninputs: digits_test.npz\nlabels: labels.npz\nmetric: hook.py:accuracy\n"
                      "output_kinds: {logits: other}\ntolerance: {atol: 1.0e-5, floor_multiple: 8, "
                      "max_metric_drop: {accuracy: 0.01}}\n")
    result = onnxopt.optimize(cnn, recipe=recipe, latency_runs=0)
    assert result.passed
    (metric,) = result.validation.metrics
    assert (metric.name, metric.limit, metric.source) == ("accuracy", 0.01, f"{cnn.parent / 'hook.py'}:accuracy")
    assert result.validation.outputs[0].kind == "other" and result.validation.outputs[0].top1_agreement is None
