"""Pass registry, pipeline strings, recipes, the pass manager, contracts and --verify-each."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import numpy as np
import onnx_graphsurgeon as gs
import pytest

import onnxopt
from onnxopt import graph as G
from onnxopt.errors import InputError, PassError
from onnxopt.pipeline import (Group, Pass, PassContext, PassResult, Pipeline, Tolerance, VerifyFailed,
                              get_pass, growth_limit, parse_max_growth, register_pass, register_preset)
from models_for_tests import mlp


@dataclass
class ToyOptions:
    ratio: Union[float, Literal["auto"]] = 0.5
    count: int = 3
    enabled: bool = True
    names: list[str] = field(default_factory=list)
    label: Optional[str] = None


@register_pass
class ToyPass(Pass):
    """Does nothing; here to test option parsing."""

    name = "toy"
    Options = ToyOptions

    def run(self, graph, ctx):
        return PassResult(False, {"seen": len(graph.nodes)})


@register_pass
class ScaleOutput(Pass):
    """Multiplies the first graph output by 1.5 (a deliberately broken, lossy pass)."""

    name = "scale_output"
    exact = False
    tolerance = Tolerance(min_cosine=0.99)  # scaling keeps cosine at 1; SNR catches it below

    def run(self, graph, ctx):
        out = graph.outputs[0]
        G.insert_after(graph, out, "Mul", extra_inputs=[gs.Constant("onepointfive", np.array(1.5, np.float32))])
        return PassResult(True, {})


@register_pass
class RenameOutput(Pass):
    """Breaks the interface contract by renaming the graph output."""

    name = "rename_output"

    def run(self, graph, ctx):
        graph.outputs[0].name = "renamed"
        return PassResult(True, {})


@register_pass
class Crash(Pass):
    """Raises."""

    name = "crash"

    def run(self, graph, ctx):
        raise RuntimeError("boom")


@register_pass
class AddZeros(Pass):
    """Adds the sum of a zero tensor of 100 KiB to the first output (exact, and grows the model)."""

    name = "add_zeros"
    allowances: list = []

    def run(self, graph, ctx):
        AddZeros.allowances.append(ctx.growth_allowance)
        total = gs.Variable("zeros_sum", dtype=np.float32, shape=[])
        graph.nodes.append(gs.Node("ReduceSum", inputs=[gs.Constant("zeros_100k", np.zeros(25600, np.float32))],
                                   outputs=[total], attrs={"keepdims": 0}))
        G.insert_after(graph, graph.outputs[0], "Add", extra_inputs=[total])
        return PassResult(True, {})


def test_parse_options_and_canonical_round_trip():
    p = Pipeline.parse("dce, toy(ratio=auto,count=7,enabled=false,names=a;b*;c,label=x) ,dce(identities=false)")
    assert [s.name for s in p.steps] == ["dce", "toy", "dce"]
    toy = p.steps[1]
    assert toy.options.ratio == "auto" and toy.options.count == 7 and toy.options.enabled is False
    assert toy.options.names == ["a", "b*", "c"] and toy.options.label == "x"
    text = p.canonical()
    assert text == ("dce(identities=true),toy(ratio=auto,count=7,enabled=false,names=a;b*;c,label=x),"
                    "dce(identities=false)")
    assert Pipeline.parse(text).canonical() == text
    assert Pipeline.parse("toy(ratio=0.25)").steps[0].options.ratio == 0.25


def test_recipe_style_list_gives_same_pipeline():
    listed = Pipeline.parse(["dce", {"toy": {"ratio": 0.75, "names": ["a", "b"]}}])
    assert listed.canonical() == Pipeline.parse("dce,toy(ratio=0.75,names=a;b)").canonical()


@pytest.mark.parametrize("text, message", [
    ("nope", "unknown pass 'nope'; known passes: "),
    ("toy(colour=red)", "pass 'toy' has no option 'colour'; its options: ratio"),
    ("toy(count=1.5)", "pass 'toy' option 'count': expected an integer"),
    ("toy(ratio=lots)", "pass 'toy' option 'ratio': expected float | auto"),
    ("toy(enabled=maybe)", "expected true or false"),
    ("toy(count=1", "unbalanced '('"),
    ("toy(count)", "expected key=value"),
    ("9bad", "cannot read pipeline item '9bad'"),
])
def test_pipeline_errors_name_the_problem(text, message):
    with pytest.raises(InputError) as info:
        Pipeline.parse(text)
    assert message in str(info.value)
    if "unknown pass" in message:
        assert "dce" in str(info.value) and "toy" in str(info.value)


def test_preset_runs_to_fixed_point():
    calls = []

    @register_pass
    class Countdown(Pass):
        """Reports a change twice, then settles."""

        name = "countdown"

        def run(self, graph, ctx):
            calls.append(1)
            return PassResult(len(calls) <= 2, {})

    register_preset("settle", "countdown,dce")
    pipeline = Pipeline.parse("settle")
    assert isinstance(pipeline.steps[0], Group) and pipeline.canonical() == "settle"
    result = onnxopt.optimize(mlp(), pipeline, validate=False)
    assert len(calls) == 3  # two rounds with a change, one to confirm the fixed point
    # dce found nothing in round 2 and nothing changed after it, so round 3 skips it
    assert [r.name for r in result.records] == ["countdown", "dce"] * 2 + ["countdown"]


def test_manager_records_each_pass():
    result = onnxopt.optimize(mlp(), "toy,dce", validate=False)
    toy, dce = result.records
    assert toy.stats == {"seen": 5} and not toy.modified
    assert (dce.nodes_before, dce.nodes_after) == (5, 4)
    assert (dce.params_before, dce.params_after) == (32 + 8 + 24 + 9, 32 + 8 + 24)
    assert dce.bytes_after == 4 * (32 + 8 + 24)
    assert dce.stats["nodes_removed"] == 1 and dce.stats["initializers_removed"] == 1
    assert result.to_dict()["pipeline"] == "toy(ratio=0.5,count=3,enabled=true,names=,label=none),dce(identities=true)"


def test_contract_violation_names_the_pass():
    with pytest.raises(PassError, match="pass 'rename_output' broke a contract: graph output 'y'"):
        onnxopt.optimize(mlp(), "rename_output", validate=False)


def test_crashing_pass_is_named():
    with pytest.raises(PassError, match="pass 'crash' failed: RuntimeError: boom"):
        onnxopt.optimize(mlp(), "dce,crash", validate=False)


def test_verify_each_names_first_breaking_pass_and_saves_reproducer(tmp_path):
    repro = tmp_path / "repro"
    with pytest.raises(VerifyFailed) as info:
        onnxopt.optimize(mlp(), "dce,scale_output,dce", tolerance="min_snr_db=20", verify_each=True,
                         repro_dir=repro)
    failure = info.value
    assert failure.pass_.name == "scale_output"
    out = failure.comparison.outputs[0]
    assert out.snr_db == pytest.approx(20 * np.log10(1 / 0.5), abs=1e-3)  # 1.5x output: SNR 6.02 dB
    assert "pass 'scale_output' took the model out of tolerance" in str(failure)
    assert (repro / "pipeline.txt").read_text().strip() == "scale_output"
    before = onnxopt.load(repro / "before.onnx")
    assert [n.op_type for n in before.graph.node] == ["MatMul", "Add", "Relu", "MatMul"]  # after dce, before scale
    # the reproducer really reproduces
    again = onnxopt.optimize(before, (repro / "pipeline.txt").read_text().strip(), tolerance="min_snr_db=20")
    assert not again.passed


def test_final_validation_uses_pass_default_tolerance():
    result = onnxopt.optimize(mlp(), "scale_output")
    assert result.validation.tolerance == Tolerance(min_cosine=0.99)
    assert result.passed  # cosine is still 1 under a pure scale
    strict = onnxopt.optimize(mlp(), "scale_output", tolerance="atol=1e-3")
    assert not strict.passed
    with pytest.raises(onnxopt.ValidationFailed, match="not saving"):
        strict.save("never-written.onnx")


def test_pass_runs_directly_on_a_graph():
    g = G.import_graph(mlp())
    result = get_pass("dce")().run(g, PassContext())
    assert result.modified and result.stats["nodes_removed"] == 1
    assert [n.name for n in g.nodes] == ["mm1", "add1", "relu1", "mm2"]


def test_tolerance_parse_and_merge():
    t = Tolerance.parse("atol=1e-3, min_cosine=0.99")
    assert t == Tolerance(atol=1e-3, min_cosine=0.99)
    assert t.merged(Tolerance(atol=1e-2, min_cosine=0.999)) == Tolerance(atol=1e-2, min_cosine=0.99)
    with pytest.raises(InputError, match="tolerance has no field 'cos'"):
        Tolerance.parse("cos=0.9")


def test_recipe_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [dce]\ncalibrate: x.npz\n")
    with pytest.raises(InputError, match="unknown recipe key 'calibrate'; known keys: passes, calibration"):
        onnxopt.optimize(mlp(), recipe=bad)
    bad.write_text("passes: [dce, {toy: {colour: red}}]\n")
    with pytest.raises(InputError, match="pass 'toy' has no option 'colour'"):
        onnxopt.Recipe.load(bad)
    bad.write_text("passes: [dce\n")
    with pytest.raises(InputError, match="not valid YAML"):
        onnxopt.Recipe.load(bad)


def test_entry_point_plugins_load(monkeypatch):
    from importlib import metadata

    from onnxopt import pipeline

    class FakeEntry:
        name = "plugged"

        def load(self):
            class Plugged(Pass):
                """From a plugin."""

                name = "plugged"

                def run(self, graph, ctx):
                    return PassResult(False, {})
            return Plugged

    monkeypatch.setattr(pipeline.registry, "_plugins_loaded", False)
    monkeypatch.setattr(metadata, "entry_points", lambda group: [FakeEntry()] if group == "onnxopt.passes" else [])
    assert "plugged" in pipeline.registered_passes()
    assert Pipeline.parse("plugged").canonical() == "plugged"


def test_shipped_pass_modules_are_named_after_their_pass():
    """get_pass imports onnxopt.passes.<name> on demand, so the names must match (a module named _* is a
    helper of a pass, not a pass)."""
    import pkgutil

    import onnxopt.passes as shipped

    modules = {m.name for m in pkgutil.iter_modules(shipped.__path__) if not m.name.startswith("_")}
    registered = onnxopt.registered_passes()
    assert modules <= set(registered)
    assert {"dce", "fold", "fold_bn", "noop", "dedup", "qdq", "prune", "svd"} <= modules


# ----------------------------------------------------------------- growth limit

def test_growth_limit_parses_and_has_a_floor():
    assert [parse_max_growth(v) for v in ("5%", "0.05", 0.05, "none", "inf", float("inf"), 0)] == [
        0.05, 0.05, 0.05, None, None, None, 0.0]
    for bad in ("lots", "-1%", True, None):
        with pytest.raises(InputError, match="max_growth"):
            parse_max_growth(bad)
    assert growth_limit(100 << 20) == 1 << 20
    assert growth_limit(1000) == 64 << 10
    assert growth_limit(1000, None) is None


def test_a_pass_that_grows_the_model_past_the_limit_is_named():
    """Each pass is told what is left of the limit; one that adds more breaks a contract.
    Raised (or lifted) by the user, the same pipeline goes through."""
    AddZeros.allowances.clear()
    with pytest.raises(PassError, match=r"pass 'add_zeros' grew the tensor data .* over the growth limit of "
                                        r"64\.0 KiB \(max_growth=1% of the input, at least 64\.0 KiB\); raise it"):
        onnxopt.optimize(mlp(batch=2), "add_zeros", validate=False)
    assert AddZeros.allowances == [64 << 10]
    for limit in ("none", "50000%"):
        result = onnxopt.optimize(mlp(batch=2), "add_zeros", max_growth=limit)
        assert result.passed and result.records[0].bytes_after - result.records[0].bytes_before == 100 << 10
    result = onnxopt.optimize(mlp(batch=2), "add_zeros", recipe={"passes": "add_zeros", "max_growth": "none"},
                              validate=False)
    assert result.model.ByteSize() > 100 << 10


def test_every_shipped_option_has_a_one_line_description():
    """Declared with onnxopt.options.option(default, help=...); `onnxopt passes` prints it."""
    from onnxopt.pipeline import describe_pass

    shipped = {n: c for n, c in onnxopt.registered_passes().items() if c.__module__.startswith("onnxopt.passes.")}
    assert {"dce", "fold", "prune", "svd"} <= set(shipped)
    missing = [f"{name}.{option}" for name, cls in shipped.items()
               for option, _, _, text in describe_pass(cls) if not text.strip() or "\n" in text]
    assert missing == []
    rows = {option: (kind, default, text) for option, kind, default, text in describe_pass(shipped["prune"])}
    assert rows["sparsity"][:2] == ("float | auto", "0.5") and "all prunable weights" in rows["sparsity"][2]


# ----------------------------------------------------------------- prerequisites

from onnxopt.pipeline import PassManager, Requirement  # noqa: E402

_marks: list[str] = []


def _has_relu(graph) -> bool:
    return any(n.op == "Relu" for n in graph.nodes)


@register_pass
class DropRelu(Pass):
    """Test provider: bypass every Relu. Not exact."""

    name = "test_drop_relu"

    def run(self, graph, ctx):
        relus = [n for n in graph.nodes if n.op == "Relu"]
        for n in relus:
            G.bypass(graph, n)
        _marks.append(self.name)
        return PassResult(bool(relus), {"dropped": len(relus)})


@register_pass
class NeedsNoRelu(Pass):
    """Test pass: counts Relu nodes; declares that it needs none."""

    name = "test_needs_no_relu"
    requires = (Requirement("relu_free", "test_drop_relu", _has_relu, "no Relu"),)

    def run(self, graph, ctx):
        _marks.append(self.name)
        return PassResult(False, {"relus_seen": sum(n.op == "Relu" for n in graph.nodes)})


def _run(spec, model=None, **kw):
    _marks.clear()
    manager = PassManager(Pipeline.parse(spec), **kw)
    manager.run(model or mlp())
    return manager


def test_prerequisite_runs_once_before_the_pass_that_needs_it():
    m = _run("test_needs_no_relu,test_needs_no_relu")
    assert _marks == ["test_drop_relu", "test_needs_no_relu", "test_needs_no_relu"]
    assert [(r.name, r.auto, r.required_by) for r in m.records] == [
        ("test_drop_relu", True, "test_needs_no_relu"), ("test_needs_no_relu", False, None),
        ("test_needs_no_relu", False, None)]
    assert m.records[1].stats["relus_seen"] == 0
    assert "run before 'test_needs_no_relu', which needs no Relu" in m.records[0].notes[0]
    assert m.canonical() == "test_drop_relu,test_needs_no_relu,test_needs_no_relu"
    # the printed pipeline reproduces the run: the provider is not run twice
    again = _run(m.canonical())
    assert _marks == ["test_drop_relu", "test_needs_no_relu", "test_needs_no_relu"]
    assert again.canonical() == m.canonical()


def test_prerequisite_not_run_when_the_graph_does_not_need_it():
    _run("test_drop_relu,test_needs_no_relu")
    assert _marks == ["test_drop_relu", "test_needs_no_relu"]
    no_relu = mlp()
    no_relu.graph.node[2].op_type = "Sigmoid"
    m = _run("test_needs_no_relu", model=no_relu)
    assert _marks == ["test_needs_no_relu"] and m.canonical() == "test_needs_no_relu"


@pytest.mark.parametrize("spec, kw", [("test_needs_no_relu(prerequisites=false)", {}),
                                      ("test_needs_no_relu", {"prerequisites": False})])
def test_prerequisites_can_be_turned_off_per_pass_or_for_all(spec, kw):
    m = _run(spec, **kw)
    assert _marks == ["test_needs_no_relu"] and m.records[0].stats["relus_seen"] == 1
    assert m.canonical() == "test_needs_no_relu(prerequisites=false)"


def test_prerequisites_option_is_checked():
    with pytest.raises(InputError, match="pass 'test_needs_no_relu' option 'prerequisites': expected true or false"):
        Pipeline.parse("test_needs_no_relu(prerequisites=maybe)")
    assert Pipeline.parse("test_drop_relu(prerequisites=false)").canonical() == "test_drop_relu"  # nothing to turn off


def test_recipe_and_api_turn_prerequisites_off():
    from pathlib import Path

    models = Path(__file__).resolve().parent.parent / "models"
    recipe = {"passes": "qdq(samples=16)", "prerequisites": False, "calibration": str(models / "digits_calib.npz")}
    off = onnxopt.optimize(str(models / "digits_cnn.onnx"), recipe=recipe, validate=False)
    assert off.records[0].name == "qdq" and off.pipeline.endswith(",prerequisites=false)")
    on = onnxopt.optimize(str(models / "digits_cnn.onnx"), recipe={**recipe, "prerequisites": True}, validate=False)
    assert [r.name for r in on.records][:2] == ["fold_bn", "dce"] and on.records[0].required_by == "qdq"
    api_off = onnxopt.optimize(str(models / "digits_cnn.onnx"), recipe={**recipe, "prerequisites": True},
                               prerequisites=False, validate=False)
    assert api_off.records[0].name == "qdq"
