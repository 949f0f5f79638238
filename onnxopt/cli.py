"""Command line: argument parsing and exit codes; the work is done by the public API.

Exit codes: 0 success, 1 validation failed, 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from . import api, io, progress
from . import html as html_report
from .data import Dataset, load_dataset
from .errors import InputError, OnnxoptError
from .metrics import check_overrides, load_metric
from .pipeline import EXACT, Tolerance, VerifyFailed, describe_pass, presets, registered_passes
from .report import format_comparison, format_inspect, inspect_model, write_text_atomic
from .synthetic import find_inputs
from .validate import compare

log = logging.getLogger("onnxopt")


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line and exit 2 like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"onnxopt: error: {message} (see {self.prog} --help)\n")


def _dims(items: Optional[list[str]]) -> dict[str, int]:
    dims = {}
    for item in items or []:
        name, _, value = item.partition("=")
        if not name or not value.strip().isdigit():
            raise InputError(f"--dim expects NAME=VALUE with a positive integer, got '{item}'")
        dims[name] = int(value)
    return dims


def _kinds(items: Optional[list[str]]) -> Optional[dict[str, str]]:
    """--output-kind NAME=KIND items -> a mapping (checked against the model by the API)."""
    return check_overrides(items, []) if items else None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inputs", metavar="DATA", help="validation inputs: .npz, .npy or a folder of them")
    p.add_argument("--dim", action="append", metavar="NAME=VALUE", help="bind a symbolic input dimension for synthetic inputs")
    p.add_argument("--tolerance", metavar="SPEC", help="e.g. 'atol=1e-4,rtol=1e-3' or 'min_cosine=0.999,max_top1_drop=0.5'")
    p.add_argument("--ort-opt-level", choices=["disable", "basic", "extended", "all"], default=None,
                   help="ONNX Runtime graph optimization level for validation (default: all, as deployed)")
    p.add_argument("--latency-runs", type=int, default=None, metavar="N",
                   help="runs for median latency (0: skip; default: as many as fit in about 2 s for both models)")
    p.add_argument("--seed", type=int, default=None, help="seed for synthetic inputs (default 0)")
    p.add_argument("--labels", metavar="FILE", help="labels for validation: .npz/.npy, one row per sample "
                   "(the array 'labels': class labels, or text ids for perplexity; all arrays reach --metric)")
    p.add_argument("--metric", metavar="MODULE:FUNCTION", help="your metric: module:function or file.py:function "
                   "(or a class with update/result); bound it with --tolerance max_metric_drop=NAME:VALUE")
    p.add_argument("--output-kind", action="append", metavar="NAME=KIND",
                   help="judge output NAME as KIND: classes, sequence, lm, embedding or other (repeatable)")
    p.add_argument("--report", metavar="FILE", help="write the JSON report here")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no warnings (errors and the summary still print)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxopt", description="Optimize ONNX models and prove, in ONNX Runtime, that they still compute the same thing.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("optimize", help="run a pipeline of passes, validate, write the result")
    p.add_argument("model")
    p.add_argument("-o", "--output", help="output path (default: <model>.opt.onnx beside the input)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--passes", help="pipeline, e.g. 'fold,noop,dce' (default: cleanup)")
    group.add_argument("--recipe", help="YAML recipe: passes, calibration, inputs, tolerance, verify_each")
    p.add_argument("--calib", metavar="DATA", help="calibration data: .npz, .npy or a folder of them")
    p.add_argument("--verify-each", action="store_true", help="validate after every pass; stop at the first that breaks tolerance")
    p.add_argument("--repro-dir", help="where --verify-each saves a reproducer (default: <output>.repro)")
    p.add_argument("--no-prerequisites", action="store_true",
                   help="do not run the passes a pass needs first (fold_bn before qdq, prune, svd)")
    p.add_argument("--no-validate", action="store_true", help="skip validation (not recommended)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 and write nothing when validation cannot run (no synthetic input runs the model)")
    p.add_argument("--keep-on-fail", action="store_true", help="write the model even when validation fails")
    p.add_argument("--in-place", action="store_true", help="allow the output path to be the input model")
    p.add_argument("--external-data", action="store_true", help="store weights in a .data file beside the model")
    p.add_argument("--max-growth", metavar="SPEC", help="how much larger than the input the result may be: "
                   "a fraction or percentage of its size (at least 64 KiB), or 'none' (default: 1%%)")
    p.add_argument("--html", metavar="FILE", help="write an HTML report here: per-pass changes, per-output errors "
                   "(needs plotly: pip install 'onnxopt[html]')")
    _common(p)

    p = sub.add_parser("inspect", help="opsets, ops, parameters by dtype, inputs and outputs")
    p.add_argument("model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--debug", action="store_true", help="show tracebacks")

    p = sub.add_parser("compare", help="run two models on the same inputs and report the differences")
    p.add_argument("reference")
    p.add_argument("candidate")
    _common(p)

    _tune_parser(sub)

    p = sub.add_parser("passes", help="list the passes and their options")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="onnxopt: %(levelname)s: %(message)s", level=logging.WARNING,
                        handlers=[progress.LogHandler()])  # log lines go around progress bars
    progress.configure(quiet=getattr(args, "quiet", False))
    try:
        return {"optimize": cmd_optimize, "inspect": cmd_inspect, "compare": cmd_compare,
                "tune": cmd_tune, "passes": cmd_passes}[args.command](args)
    except OnnxoptError as exc:
        if args.debug:
            raise
        print(f"onnxopt: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxopt: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so plainly, traceback on request
        if args.debug:
            raise
        print(f"onnxopt: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 3


def _default_output(model: str) -> Path:
    path = Path(model)
    stem = path.name[:-5] if path.name.endswith(".onnx") else path.name
    return path.with_name(stem + ".opt.onnx")


def _check_outputs(output: Path, args: argparse.Namespace) -> None:
    """Every path the command will write, and plotly for --html, checked before the work, not after it."""
    io.check_output_path(output)
    if args.report:
        io.check_output_path(Path(args.report), "report")
    if args.html:
        io.check_output_path(Path(args.html), "HTML report")
        html_report.require_plotly()


def cmd_optimize(args: argparse.Namespace) -> int:
    output = Path(args.output) if args.output else _default_output(args.model)
    if io.same_file(output, args.model) and not args.in_place:
        raise InputError(f"{output}: output path is the input model; pass --in-place to overwrite it")
    _check_outputs(output, args)
    try:
        result = api.optimize(
            args.model, args.passes, recipe=args.recipe, calibration=args.calib, inputs=args.inputs,
            tolerance=args.tolerance, validate=not args.no_validate, verify_each=args.verify_each or None,
            dims=_dims(args.dim), seed=args.seed, ort_opt_level=args.ort_opt_level,
            latency_runs=args.latency_runs, repro_dir=args.repro_dir or f"{output}.repro",
            max_growth=args.max_growth, strict=args.strict,
            prerequisites=False if args.no_prerequisites else None,
            output_kinds=_kinds(args.output_kind), metric=args.metric, labels=args.labels)
    except VerifyFailed as failure:
        print(f"onnxopt: error: {failure}", file=sys.stderr)
        print("\n".join(format_comparison(failure.comparison)), file=sys.stderr)
        if failure.repro_dir:
            print(f"onnxopt: reproducer saved in {failure.repro_dir}", file=sys.stderr)
        return 1
    written = result.passed or args.keep_on_fail
    if written:
        result.save(output, external_data=True if args.external_data else None, in_place=args.in_place, force=True)
    if args.report:
        write_text_atomic(Path(args.report), result.to_json() + "\n")
    if args.html:
        html_report.write_optimize_report(result.to_dict(), args.html)
    print(result.summary())
    if result.not_run:
        print(f"onnxopt: warning: validation not run; {output} is written unchecked (see 'validation:' above)",
              file=sys.stderr)
    if not result.passed:
        print(f"onnxopt: error: validation failed: {result.validation.headline()}"
              + ("" if written else "; nothing written (use --keep-on-fail to write anyway)"), file=sys.stderr)
        return 1
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_model(args.model)
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    if args.report:
        io.check_output_path(Path(args.report), "report")
    reference, candidate = io.load(args.reference), io.load(args.candidate)
    kinds = check_overrides(args.output_kind, [o.name for o in reference.graph.output])
    hook = load_metric(args.metric)  # a bad metric fails before any model runs
    dims = _dims(args.dim)
    seed = args.seed or 0
    data = load_dataset(args.inputs, reference, what="inputs") if args.inputs else _synthetic(reference, dims, seed)
    tol = Tolerance.parse(args.tolerance) or EXACT
    result = compare(reference, candidate, data, tol, ort_opt_level=args.ort_opt_level or "all",
                     latency_runs=args.latency_runs, output_kinds=kinds, metric=hook, labels=args.labels)
    print(f"onnxopt compare: {args.reference} vs {args.candidate}")
    print("\n".join(format_comparison(result)))
    print(f"size: {Path(args.reference).stat().st_size:,} B -> {Path(args.candidate).stat().st_size:,} B")
    if args.report:
        write_text_atomic(Path(args.report), json.dumps(result.to_dict(), indent=2) + "\n")
    if not result.passed:
        print(f"onnxopt: error: the models differ: {result.headline()}", file=sys.stderr)
        return 1
    return 0


def _synthetic(model, dims: dict[str, int], seed: int) -> Dataset:
    """Synthetic inputs the reference runs on, or one clear error."""
    probe = find_inputs(model, dims=dims, seed=seed)
    if not probe.found:
        raise InputError(f"{probe.error}; give --inputs")
    return probe.dataset(seed, (f"synthetic inputs: {probe.description} (set dims with --dim NAME=VALUE)",))


# ----------------------------------------------------------------- tune

def _tune_parser(sub) -> None:
    p = sub.add_parser("tune", help="meet a size or latency target within an accuracy budget, per layer")
    p.add_argument("model")
    p.add_argument("--calib", metavar="DATA", required=True, help="calibration data: .npz, .npy or a folder of them")
    p.add_argument("--inputs", metavar="DATA", help="data the accuracy budget is measured on (default: "
                   "calibration samples the passes do not read)")
    p.add_argument("--target", required=True, metavar="KIND=RATIO",
                   help="size=0.25 (a quarter of the file) or latency=0.5 (half the median time)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-drop", type=float, metavar="POINTS",
                        help="points of the budget metric the model may lose (default 1)")
    budget.add_argument("--tolerance", metavar="SPEC", help="a validation tolerance every point must pass instead")
    p.add_argument("-o", "--output", help="output path (default: <model>.tuned.onnx beside the input)")
    p.add_argument("--executor", default="local", metavar="SPEC", help="local, ray or ray://HOST:PORT")
    p.add_argument("--workers", type=int, default=None, help="concurrent evaluations (default: the executor's)")
    p.add_argument("--report", metavar="FILE", help="write the JSON report here")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0); the same seed gives the same pipeline")
    p.add_argument("--samples", type=int, default=None, metavar="N",
                   help="samples the budget metric is measured on during the search (default 512)")
    p.add_argument("--calib-samples", type=int, default=None, metavar="N",
                   help="calibration samples the passes read (default 128; 64 from a million parameters)")
    p.add_argument("--int8", choices=["auto", "static", "dynamic"], default="auto",
                   help="qdq mode of int8 layers (auto: static with convolutions, else dynamic)")
    p.add_argument("--max-evaluations", type=int, default=None, metavar="N",
                   help="stop the search after N evaluations and report the best point found (default 400)")
    p.add_argument("--keep-on-fail", action="store_true", help="write the closest point when the target is not met")
    p.add_argument("--labels", metavar="FILE", help="labels for --inputs: the budget metric becomes accuracy")
    p.add_argument("--output-kind", action="append", metavar="NAME=KIND",
                   help="judge output NAME as KIND: classes, sequence, lm, embedding or other (repeatable)")
    p.add_argument("--dim", action="append", metavar="NAME=VALUE", help="bind a symbolic input dimension")
    p.add_argument("--html", metavar="FILE", help="write an HTML report here: the trade-off curve, per-layer "
                   "sensitivity and settings, validation (needs plotly: pip install 'onnxopt[html]')")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no warnings (errors and the summary still print)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def cmd_tune(args: argparse.Namespace) -> int:
    from .tune import tune

    default = _default_output(args.model)
    output = Path(args.output) if args.output else default.with_name(default.name.replace(".opt.onnx", ".tuned.onnx"))
    if io.same_file(output, args.model):
        raise InputError(f"{output}: output path is the input model")
    _check_outputs(output, args)
    extra = {k: v for k, v in (("samples", args.samples), ("calibration_samples", args.calib_samples),
                               ("max_evaluations", args.max_evaluations)) if v is not None}
    result = tune(args.model, args.calib, inputs=args.inputs, target=args.target, max_drop=args.max_drop,
                  tolerance=args.tolerance, executor=args.executor, workers=args.workers, seed=args.seed,
                  labels=args.labels, output_kinds=_kinds(args.output_kind), dims=_dims(args.dim),
                  int8=args.int8, **extra)
    written = result.met or args.keep_on_fail
    if written:
        result.save(output, force=True)
    if args.report:
        result.write_report(Path(args.report))
    if args.html:
        html_report.write_tune_report(result.to_dict(), args.html)
    print(result.summary())
    seed = f" --seed {args.seed}" if args.seed else ""
    print(f"reproduce: onnxopt optimize {args.model} --passes '{result.pipeline}' --calib {args.calib}{seed}")
    if written:
        print(f"written: {output}")
    if not result.met:
        print(f"onnxopt: error: target not met: {result.message}"
              + ("" if written else "; nothing written (use --keep-on-fail to write the closest point)"),
              file=sys.stderr)
        return 1
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    for name, cls in registered_passes().items():
        kind = "exact" if cls.exact else "lossy"
        print(f"{name} ({kind}): {cls.summary()}")
        for option, kind_text, default, text in describe_pass(cls):
            print(f"    {option} = {default}    ({kind_text})" + (f": {text}" if text else ""))
    for name, (pipeline, fixed) in presets().items():
        print(f"{name} (preset): {pipeline}" + (" (to a fixed point)" if fixed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
