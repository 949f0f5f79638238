"""Passes, their registry, pipeline strings and recipes, and the pass manager.

A pipeline imports the model once, runs every pass on the same
onnx-graphsurgeon graph, checks the contracts after each pass, and exports
once at the end.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Optional, Union

import onnx
import onnx_graphsurgeon as gs

from . import graph as G
from .errors import InputError, OnnxoptError, PassError
from .options import (build_options, describe, format_value, option_help, option_items, option_types,
                      parse_value)
from .serialize import serialized_size

log = logging.getLogger("onnxopt")


@dataclass
class Tolerance:
    """What 'still computes the same thing' means; unset fields are not checked.

    ``atol``/``rtol`` are checked elementwise as in numpy.allclose; the others
    on each output as a whole; for float16/bfloat16 outputs atol and rtol are
    widened 10x/100x, as those types round that much coarser than float32.
    ``max_top1_drop`` is in accuracy points when labels are given, else in
    points of top-1 agreement lost. ``floor_multiple`` raises atol, per output,
    to that multiple of ONNX Runtime's own noise on it (the difference between
    the original run with all optimizations and with none): a rewrite is not
    held to more precision than the runtime has. It widens nothing else.
    """

    atol: Optional[float] = None
    rtol: Optional[float] = None
    min_cosine: Optional[float] = None
    min_snr_db: Optional[float] = None
    max_top1_drop: Optional[float] = None
    floor_multiple: Optional[float] = None

    @classmethod
    def parse(cls, spec: Union[str, dict, "Tolerance", None]) -> Optional["Tolerance"]:
        """From 'atol=1e-4,min_cosine=0.999', a mapping, or a Tolerance."""
        if spec is None or isinstance(spec, Tolerance):
            return spec
        if isinstance(spec, str):
            spec = dict(_split_kv(item, "tolerance") for item in _split_top(spec) if item.strip())
        known = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for key, raw in spec.items():
            if key not in known:
                raise InputError(f"tolerance has no field '{key}'; its fields: {', '.join(sorted(known))}")
            try:
                values[key] = float(raw)
            except (TypeError, ValueError):
                raise InputError(f"tolerance '{key}': expected a number, got {raw!r}") from None
        return cls(**values)

    def merged(self, other: "Tolerance") -> "Tolerance":
        """The looser of two tolerances, field by field."""
        out = {}
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a is None or b is None:
                out[f.name] = a if b is None else b
            elif f.name.startswith("min_"):
                out[f.name] = min(a, b)
            else:
                out[f.name] = max(a, b)
        return Tolerance(**out)

    def __str__(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name):g}" for f in dataclasses.fields(self)
                        if getattr(self, f.name) is not None) or "none"


# Exact passes: float32 rounding, or within 8x the runtime's own noise. Their error and the
# floor are both differences between two roundings of the same computation (fused or not,
# weights folded or not); 8x (3 bits) leaves room for a floor measured where ORT fuses
# little while a rewrite reorders more, and stays far below what a wrong rewrite does (a
# changed constant or axis moves outputs by their own scale, ~1e3x the floor or more).
FLOOR_MULTIPLE = 8.0
EXACT = Tolerance(atol=1e-5, rtol=1e-4, floor_multiple=FLOOR_MULTIPLE)


@dataclass
class PassResult:
    """What a pass did: whether it changed the graph, its statistics (counts), and notes for people
    (choices it made and why, layers it left alone by name)."""

    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    """What a pass may read besides the graph: data, seed, the opset, a logger.

    ``template`` is the model the pipeline started from; a pass that needs a
    ModelProto of its current graph (to run it in ORT for calibration) makes
    one with ``ctx.export(graph)``. ``growth_allowance`` is how many bytes of
    tensor data the pass may add to the model (set by the pass manager from the
    pipeline's ``max_growth``, ``math.inf`` when unlimited; None when no pass
    manager set it: a pass that can grow the model applies ``growth_limit`` to the
    graph it is given). ``cache`` holds what calibration collected (``calibrate.shared``) so
    that later passes of the same run reuse it while the model is unchanged.
    """

    opset: int = 0
    calibration: Any = None
    seed: int = 0
    dims: dict[str, int] = field(default_factory=dict)
    log: logging.Logger = log
    template: Optional[onnx.ModelProto] = None
    growth_allowance: Optional[float] = None
    cache: dict = field(default_factory=dict, repr=False)  # statistics shared by the passes of one run

    def export(self, graph: gs.Graph) -> onnx.ModelProto:
        """The graph as a ModelProto, with the original model's opsets and fields."""
        return G.export_model(graph, self.template or onnx.helper.make_model(onnx.GraphProto()))


@dataclass
class NoOptions:
    """For passes without options."""


# ----------------------------------------------------------------- prerequisites

@dataclass(frozen=True)
class Requirement:
    """A state of the graph a pass needs, the pass that brings it about, and whether a graph lacks it.

    ``needed(graph)`` must be cheap: the manager asks it before every pass that declares it.
    """

    name: str
    provider: str
    needed: Callable[[gs.Graph], bool]
    description: str = ""


_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _bn_after_layer(graph: gs.Graph) -> bool:
    """A BatchNormalization reads a Conv/ConvTranspose/Gemm/MatMul output (what fold_bn folds)."""
    return any(n.op == "BatchNormalization" and n.inputs and (maker := G.producer(n.inputs[0])) is not None
               and maker.op in _WEIGHTED for g in G.iter_graphs(graph, functions=False) for n in g.nodes)


def _from_constants(tensor: gs.Tensor, depth: int = 0) -> bool:
    """A value computed by a short chain of nodes from constants only (left for fold)."""
    if G.constant_source(tensor) is not None:
        return True
    maker = G.producer(tensor)
    if maker is None or depth > 4 or maker.op in ("RandomNormal", "RandomUniform", "RandomNormalLike",
                                                  "RandomUniformLike", "Multinomial", "Bernoulli"):
        return False
    if maker.op == "Constant":
        return True
    return bool(maker.inputs) and all(_from_constants(t, depth + 1) for t in maker.inputs if t.name)


def _weights_unfolded(graph: gs.Graph) -> bool:
    """A Conv/ConvTranspose/Gemm/MatMul weight is computed from constants rather than stored."""
    return any(n.op in _WEIGHTED and len(n.inputs) > 1 and G.constant_source(n.inputs[1]) is None
               and G.producer(n.inputs[1]) is not None and _from_constants(n.inputs[1])
               for g in G.iter_graphs(graph, functions=False) for n in g.nodes)


BN_FOLDED = Requirement("bn_folded", "fold_bn", _bn_after_layer,
                        "BatchNormalization folded into the layer before it")
CONSTANTS_FOLDED = Requirement("constants_folded", "fold", _weights_unfolded,
                               "weights computed from constants folded into stored tensors")


class Pass:
    """Base class: subclass, set ``name`` and ``Options``, implement ``run``, and register.

    ``exact`` passes keep outputs equal within float rounding; lossy passes set
    ``exact = False`` and a looser ``tolerance``. ``leaves_dangling`` asks the
    manager to run ``dce`` after the pass when it changed the graph. A pass whose
    option ``auto`` resolves at run time (from the data it was given) sets
    ``self.resolved`` to the options it used, so ``canonical()`` reproduces the run.
    ``requires`` lists Requirements (or names of passes always run first); the
    manager runs each provider before the pass when the graph needs it, unless
    ``prerequisites`` is off (``name(prerequisites=false)`` in a pipeline).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    exact: ClassVar[bool] = True
    tolerance: ClassVar[Tolerance] = EXACT
    leaves_dangling: ClassVar[bool] = False
    resolved: Any = None  # the options as the last run used them, auto values resolved
    requires: ClassVar[tuple[Union[Requirement, str], ...]] = ()

    def __init__(self, options: Any = None, *, prerequisites: bool = True, **values: Any) -> None:
        if options is None:
            options = build_options(self.name, self.Options, values)
        elif values:
            raise TypeError("give either an options object or keyword values, not both")
        self.options = options
        self.prerequisites = prerequisites

    @classmethod
    def requirements(cls) -> list[Requirement]:
        """``requires`` with pass names turned into always-needed Requirements."""
        return [r if isinstance(r, Requirement) else Requirement(r, r, lambda graph: True, f"'{r}' first")
                for r in cls.requires]

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def canonical(self) -> str:
        """The text that reproduces this pass, every option spelled out."""
        items = [(k, format_value(v)) for k, v in
                 option_items(self.resolved if self.resolved is not None else self.options)]
        if self.requires and not self.prerequisites:
            items.append(("prerequisites", "false"))
        if not items:
            return self.name
        return f"{self.name}(" + ",".join(f"{k}={v}" for k, v in items) + ")"

    @classmethod
    def summary(cls) -> str:
        """First line of the docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


_REGISTRY: dict[str, type[Pass]] = {}
_PRESETS: dict[str, tuple[str, bool]] = {}
_plugins_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name`` in pipelines and recipes."""
    if not cls.name or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", cls.name):
        raise ValueError(f"pass {cls.__name__} needs a name made of letters, digits and _")
    if not dataclasses.is_dataclass(cls.Options):
        raise ValueError(f"pass '{cls.name}': Options must be a dataclass")
    _REGISTRY[cls.name] = cls
    return cls


def register_preset(name: str, pipeline: str, fixed_point: bool = True) -> None:
    """A named group of passes, run to a fixed point when ``fixed_point``."""
    _PRESETS[name] = (pipeline, fixed_point)


def _load_passes() -> None:
    """Import the package of shipped passes (which registers the presets); passes load on demand."""
    from . import _builtin_passes  # noqa: F401


def _load_plugins() -> None:
    """Register third-party passes from the ``onnxopt.passes`` entry-point group, once."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib import metadata  # reading installed distributions is slow; only when needed

    for entry in metadata.entry_points(group="onnxopt.passes"):
        try:
            loaded = entry.load()
        except Exception as exc:  # a broken plugin must not break the tool
            log.warning("cannot load pass plugin '%s': %s", entry.name, exc)
            continue
        if isinstance(loaded, type) and issubclass(loaded, Pass) and loaded.name not in _REGISTRY:
            register_pass(loaded)


def _load_builtin(name: str) -> None:
    """Import ``onnxopt.passes.<name>``: a shipped pass lives in the module named after it."""
    _load_passes()
    if re.fullmatch(r"[a-z_][a-z0-9_]*", name) and importlib.util.find_spec(f"onnxopt.passes.{name}"):
        importlib.import_module(f"onnxopt.passes.{name}")


def _load_all() -> None:
    _load_passes()
    from onnxopt.passes import load_all

    load_all()
    _load_plugins()


def registered_passes() -> dict[str, type[Pass]]:
    """Name -> pass class, built-ins and plugins."""
    _load_all()
    return dict(sorted(_REGISTRY.items()))


def presets() -> dict[str, tuple[str, bool]]:
    _load_passes()
    return dict(_PRESETS)


def get_pass(name: str) -> type[Pass]:
    """The pass registered as ``name``, importing only what it needs (its module, else plugins)."""
    if name not in _REGISTRY:
        _load_builtin(name)
    if name not in _REGISTRY:
        _load_plugins()
    if name not in _REGISTRY:
        _load_all()
        known = ", ".join(sorted([*_REGISTRY, *_PRESETS]))
        raise InputError(f"unknown pass '{name}'; known passes: {known}")
    return _REGISTRY[name]


# ----------------------------------------------------------------- pipelines

@dataclass
class Group:
    """Passes run in order, repeated until none changes the graph when ``fixed_point``."""

    name: str
    steps: list[Pass]
    fixed_point: bool = True
    max_rounds: int = 10

    def canonical(self) -> str:
        return self.name


Step = Union[Pass, Group]


class Pipeline:
    """An ordered list of passes and preset groups."""

    def __init__(self, steps: Iterable[Step]) -> None:
        self.steps = list(steps)

    @classmethod
    def parse(cls, spec: Union[str, "Pipeline", Iterable[Any], None]) -> "Pipeline":
        """From 'dce,prune(sparsity=0.5)', a recipe-style list, Pass objects, or a Pipeline."""
        if isinstance(spec, Pipeline):
            return spec
        if spec is None:
            return cls([])
        if isinstance(spec, str):
            return cls(_make_step(*_parse_item(item)) for item in _split_top(spec) if item.strip())
        steps: list[Step] = []
        for item in spec:
            if isinstance(item, (Pass, Group)):
                steps.append(item)
            elif isinstance(item, str):
                steps.extend(cls.parse(item).steps)
            elif isinstance(item, dict) and len(item) == 1:
                (name, values), = item.items()
                steps.append(_make_step(str(name), dict(values or {})))
            else:
                raise InputError(f"cannot read pipeline entry {item!r}: use a name, 'name(opt=value)' or {{name: {{opt: value}}}}")
        return cls(steps)

    def canonical(self) -> str:
        return ",".join(step.canonical() for step in self.steps)

    def passes(self) -> list[Pass]:
        """Every pass, groups expanded."""
        return [p for s in self.steps for p in (s.steps if isinstance(s, Group) else [s])]

    def __str__(self) -> str:
        return self.canonical()


def _make_step(name: str, values: dict[str, Any]) -> Step:
    _load_passes()  # registers the presets
    if name in _PRESETS and name not in _REGISTRY:
        if values:
            raise InputError(f"preset '{name}' takes no options")
        text, fixed = _PRESETS[name]
        return Group(name, Pipeline.parse(text).passes(), fixed_point=fixed)
    cls = get_pass(name)
    prerequisites = True
    if "prerequisites" in values and "prerequisites" not in option_types(cls.Options):
        try:
            prerequisites = parse_value(bool, values.pop("prerequisites"))
        except ValueError as exc:
            raise InputError(f"pass '{name}' option 'prerequisites': {exc}") from None
    return cls(build_options(name, cls.Options, values), prerequisites=prerequisites)


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise InputError(f"unbalanced ')' in pipeline '{text}'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise InputError(f"unbalanced '(' in pipeline '{text}'")
    parts.append("".join(cur))
    return parts


def _split_kv(item: str, where: str) -> tuple[str, str]:
    if "=" not in item:
        raise InputError(f"{where}: expected key=value, got '{item.strip()}'")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def _parse_item(item: str) -> tuple[str, dict[str, str]]:
    item = item.strip()
    match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?", item, re.S)
    if not match:
        raise InputError(f"cannot read pipeline item '{item}': expected name or name(option=value,...)")
    name, body = match.group(1), match.group(2)
    values = dict(_split_kv(kv, f"pass '{name}'") for kv in _split_top(body or "") if kv.strip())
    return name, values


def describe_pass(cls: type[Pass]) -> list[tuple[str, str, str, str]]:
    """(option, type, default, description) rows for ``onnxopt passes``; the description is the
    option's ``help`` (declared with ``onnxopt.options.option``), '' when it has none."""
    defaults = cls.Options()
    helps = option_help(cls.Options)
    return [(name, describe(kind), format_value(getattr(defaults, name)), helps.get(name, ""))
            for name, kind in option_types(cls.Options).items()]


# ----------------------------------------------------------------- contracts

def interface_of(graph: gs.Graph) -> list[tuple[str, str, str, Any]]:
    """(role, name, dtype, shape) for every graph input and output."""
    rows = []
    for role, tensors in (("input", graph.inputs), ("output", graph.outputs)):
        for t in tensors:
            shape = None if t.shape is None else tuple(t.shape)
            rows.append((role, t.name, str(t.dtype), shape))
    return rows


def duplicate_names(graph: gs.Graph) -> set[str]:
    """Value names held by more than one tensor object, and node names used twice, all scopes."""
    owners: dict[str, int] = {}
    dups: set[str] = set()
    seen_nodes: set[str] = set()
    for g in G.iter_graphs(graph, functions=False):
        for node in g.nodes:
            if node.name:
                if node.name in seen_nodes:
                    dups.add(f"node {node.name}")
                seen_nodes.add(node.name)
            for t in [*node.inputs, *node.outputs]:
                if t.name and owners.setdefault(t.name, id(t)) != id(t):
                    dups.add(f"value {t.name}")
    return dups


def check_contracts(graph: gs.Graph, interface: list, dups_before: set[str], who: str) -> None:
    """Raise PassError when ``who`` changed the interface or introduced duplicate names."""
    now = interface_of(graph)
    if now != interface:
        for old, new in zip(interface, now):
            if old != new:
                raise PassError(f"pass '{who}' broke a contract: graph {old[0]} '{old[1]}' "
                                f"(dtype {old[2]}, shape {old[3]}) became '{new[1]}' (dtype {new[2]}, shape {new[3]})")
        raise PassError(f"pass '{who}' broke a contract: the number of graph inputs or outputs changed "
                        f"({len(interface)} -> {len(now)})")
    new_dups = duplicate_names(graph) - dups_before
    if new_dups:
        raise PassError(f"pass '{who}' broke a contract: names no longer unique: {', '.join(sorted(new_dups)[:5])}")


def checker_error(model: onnx.ModelProto, structure_only: bool = False) -> Optional[str]:
    """The ONNX checker's first complaint, or None.

    ``structure_only`` checks the graph without the initializers' bytes (their
    types and shapes stay): enough after passes, whose tensors gs writes whole,
    and it saves serialising every weight again.
    """
    from .io import fits_in_proto, skeleton

    try:
        if structure_only:
            onnx.checker.check_model(skeleton(model))
        elif fits_in_proto(model):
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        return str(exc).strip().splitlines()[0]
    return None


# ----------------------------------------------------------------- growth limit
# How much larger than its input the optimized model may be, unless the user says otherwise:
# a fraction of the input's size, and at least GROWTH_FLOOR_BYTES (tiny models).
MAX_GROWTH = 0.01
GROWTH_FLOOR_BYTES = 64 << 10


def parse_max_growth(spec: Any) -> Optional[float]:
    """``max_growth`` from '1%', '0.01', 0.01, or 'none' (no limit, also inf); None means no limit."""
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("none", "off", "inf", "unlimited"):
            return None
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise InputError(f"max_growth: expected a fraction (0.05), a percentage (5%) or 'none', "
                             f"got {spec!r}") from None
    elif isinstance(spec, (int, float)) and not isinstance(spec, bool):
        value = float(spec)
    else:
        raise InputError(f"max_growth: expected a fraction (0.05), a percentage (5%) or 'none', got {spec!r}")
    if value != value or value < 0:
        raise InputError(f"max_growth must be 0 or more, got {spec!r}")
    return None if value == float("inf") else value


def growth_limit(input_bytes: int, max_growth: Optional[float] = MAX_GROWTH) -> Optional[int]:
    """The bytes a model of ``input_bytes`` may grow by: ``max_growth`` of it, at least
    GROWTH_FLOOR_BYTES; None when unlimited."""
    if max_growth is None:
        return None
    return max(int(max_growth * input_bytes), GROWTH_FLOOR_BYTES)


# ----------------------------------------------------------------- manager

@dataclass
class PassRecord:
    """One pass as it ran: timing, size before and after, its statistics."""

    name: str
    canonical: str
    seconds: float
    modified: bool
    nodes_before: int
    nodes_after: int
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    stats: dict[str, Any]
    auto: bool = False
    verify: Optional[dict] = None
    notes: list[str] = field(default_factory=list)
    required_by: Optional[str] = None  # run as a prerequisite of this pass

    def after_sizes(self) -> tuple[int, int, int]:
        return self.nodes_after, self.params_after, self.bytes_after


Verifier = Callable[[onnx.ModelProto, list[Pass]], Any]


class PassManager:
    """Runs a pipeline on one imported graph, recording and policing every pass.

    ``verify`` (for verify-each) is called with the model after each pass and
    the passes run so far; it returns a comparison with ``passed`` and
    ``to_dict()``. When a pass leaves the tolerance, the manager raises
    ``VerifyFailed`` carrying the model from before that pass.

    ``max_growth`` bounds how much larger than its input the model may become
    (see ``growth_limit``; None: no limit). Each pass gets what is left of that
    allowance in ``ctx.growth_allowance`` and a pass that can grow the model
    (``fold``) stays within it; a pass that adds tensor data past the limit
    breaks a contract and is named, and the exported model is checked as a whole.
    Before a pass that declares ``requires``, the manager runs each providing
    pass the graph needs, once per run (not when it already ran), and records
    it; ``prerequisites=False`` turns that off for every pass.
    """

    def __init__(self, pipeline: Pipeline, ctx: Optional[PassContext] = None,
                 verify: Optional[Verifier] = None, max_growth: Optional[float] = MAX_GROWTH,
                 prerequisites: bool = True) -> None:
        self.pipeline = pipeline
        self.ctx = ctx or PassContext()
        self.verify = verify
        self.max_growth = max_growth
        self.prerequisites = prerequisites
        self.limit: Optional[int] = None  # bytes the model may grow by; set by run
        self.start_bytes = 0  # tensor data when the run started
        self.records: list[PassRecord] = []
        self.inserted: dict[int, list[Pass]] = {}  # step index -> prerequisites run before it

    def run(self, model: onnx.ModelProto) -> onnx.ModelProto:
        self.template = model
        self.graph = G.import_graph(model)
        self.ctx.opset = self.ctx.opset or _default_opset(model)
        self.ctx.template = model
        self.interface = interface_of(self.graph)
        self.dups = duplicate_names(self.graph)
        self.ran: list[Pass] = []
        self.version = 0  # bumped by every pass that changes the graph
        self.last_model = model
        self.input_bytes = serialized_size(model)
        self.limit = growth_limit(self.input_bytes, self.max_growth)
        self.start_bytes = _measure(self.graph)[2]
        for self.step_index, step in enumerate(self.pipeline.steps):
            self._run_step(step)
        result = G.export_model(self.graph, model)
        problem = checker_error(result, structure_only=True)
        if problem:
            raise PassError(self._blame_checker(model) + f": {problem}")
        grown = serialized_size(result) - self.input_bytes
        if self.limit is not None and grown > self.limit:
            raise PassError(f"the optimized model is {_bytes(grown)} larger than the input "
                            f"({_bytes(self.input_bytes)}): over {self._limit_text()}")
        return result

    def _limit_text(self) -> str:
        return (f"the growth limit of {_bytes(self.limit)} (max_growth={100 * self.max_growth:g}% of the input, "
                f"at least {_bytes(GROWTH_FLOOR_BYTES)}); raise it with --max-growth (API: max_growth=)")

    def _check_growth(self, p: Pass, before: int, after: int) -> None:
        """A pass that adds tensor data past the pipeline's growth limit breaks a contract."""
        if self.limit is not None and after > before and after - self.start_bytes > self.limit:
            raise PassError(f"pass '{p.name}' grew the tensor data from {_bytes(before)} to {_bytes(after)} "
                            f"({_bytes(after - self.start_bytes)} over the input's): over {self._limit_text()}")

    def _run_step(self, step: Step) -> bool:
        if isinstance(step, Pass):
            return self._run_pass(step)
        changed_any = False
        clean_at: dict[int, int] = {}  # pass index -> graph version it last left unchanged
        for _ in range(step.max_rounds if step.fixed_point else 1):
            changed = False
            for i, p in enumerate(step.steps):
                if clean_at.get(i) == self.version:
                    continue  # nothing changed since this pass last found nothing to do
                if self._run_pass(p):
                    changed = True
                else:
                    clean_at[i] = self.version
            changed_any |= changed
            if not changed:
                break
        return changed_any

    def canonical(self) -> str:
        """The pipeline as it ran: prerequisites spelled out before the step that needed them,
        and ``prerequisites=false`` where they were off, so the text reproduces the run."""
        parts = []
        for i, step in enumerate(self.pipeline.steps):
            parts.extend(q.canonical() for q in self.inserted.get(i, []))
            if isinstance(step, Pass) and step.requires and step.prerequisites and not self.prerequisites:
                off = type(step)(step.options, prerequisites=False)
                off.resolved = step.resolved
                parts.append(off.canonical())
            else:
                parts.append(step.canonical())
        return ",".join(parts)

    def _run_prerequisites(self, p: Pass) -> None:
        if not (self.prerequisites and p.prerequisites):
            return
        for req in p.requirements():
            if any(q.name == req.provider for q in self.ran) or not req.needed(self.graph):
                continue
            provider = get_pass(req.provider)()
            self.inserted.setdefault(getattr(self, "step_index", 0), []).append(provider)
            self._run_pass(provider, auto=True, required_by=(p, req))

    def _run_pass(self, p: Pass, auto: bool = False, required_by: Optional[tuple[Pass, Requirement]] = None) -> bool:
        if not auto:
            self._run_prerequisites(p)
        # Only passes change the graph: what the last one left is what this one starts from.
        before = self.records[-1].after_sizes() if self.records else _measure(self.graph)
        # What is left of the growth limit, for passes that can grow the model.
        self.ctx.growth_allowance = (math.inf if self.limit is None
                                     else max(0, self.limit - (before[2] - self.start_bytes)))
        start = time.perf_counter()
        try:
            result = p.run(self.graph, self.ctx)
        except OnnxoptError:
            raise
        except Exception as exc:
            raise PassError(f"pass '{p.name}' failed: {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            raise PassError(f"pass '{p.name}' returned {type(result).__name__}, not a PassResult")
        check_contracts(self.graph, self.interface, self.dups, p.name)
        after = _measure(self.graph) if result.modified else before
        self._check_growth(p, before[2], after[2])
        record = PassRecord(p.name, p.canonical(), seconds, bool(result.modified), *_pairs(before, after),
                            stats=dict(result.stats), auto=auto, notes=list(result.notes))
        if required_by is not None:
            user, req = required_by
            record.required_by = user.name
            record.notes.insert(0, f"run before '{user.name}', which needs {req.description or req.name} "
                                   f"(opt out: --no-prerequisites or {user.name}(prerequisites=false))")
        self.records.append(record)
        self.ran.append(p)
        self.version += record.modified
        if self.verify is not None:
            self._verify(p, record)
        if p.leaves_dangling and result.modified and p.name != "dce":
            self._run_pass(get_pass("dce")(), auto=True)
        return record.modified

    def _verify(self, p: Pass, record: PassRecord) -> None:
        model = G.export_model(self.graph, self.template)
        problem = checker_error(model)
        if problem:
            raise PassError(f"pass '{p.name}' broke a contract: the model fails the ONNX checker: {problem}")
        comparison = self.verify(model, list(self.ran))
        record.verify = comparison.to_dict()
        if not comparison.passed:
            raise VerifyFailed(p, comparison, self.last_model)
        self.last_model = model

    def _blame_checker(self, model: onnx.ModelProto) -> str:
        """Re-run the pipeline checking after every pass to name the pass that broke the checker."""
        replay = PassManager(self.pipeline, dataclasses.replace(self.ctx))
        replay.graph, replay.template = G.import_graph(model), model
        replay.interface, replay.dups, replay.ran = interface_of(replay.graph), set(), []
        for p in list(self.ran):  # as they ran: prerequisites and automatic dce included
            p.run(replay.graph, replay.ctx)
            if checker_error(G.export_model(replay.graph, model)):
                return f"pass '{p.name}' broke a contract: the model fails the ONNX checker"
        return "the optimized model fails the ONNX checker"


class VerifyFailed(OnnxoptError):
    """--verify-each: a pass took the model out of tolerance."""

    exit_code = 1

    def __init__(self, p: Pass, comparison: Any, model_before: onnx.ModelProto) -> None:
        self.pass_ = p
        self.comparison = comparison
        self.model_before = model_before
        self.repro_dir: Optional[str] = None
        super().__init__(f"pass '{p.name}' took the model out of tolerance: {comparison.headline()}")


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _bytes(n: int) -> str:
    from .report import human_bytes  # report imports this module

    return human_bytes(n)


def _measure(graph: gs.Graph) -> tuple[int, int, int]:
    return G.sizes(graph)


def _pairs(before: tuple, after: tuple) -> list[int]:
    return [before[0], after[0], before[1], after[1], before[2], after[2]]
