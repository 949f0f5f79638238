"""Passes and their registry: PassResult, PassContext, Requirement (what a pass needs run first), the
Pass base class, and registration of built-in passes, presets and plugins (entry points)."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Union

import onnx
import onnx_graphsurgeon as gs

from .. import graph as G
from ..errors import InputError
from ..options import build_options, format_value, option_items
from .tolerance import EXACT, Tolerance

log = logging.getLogger("onnxopt")


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
    from .. import _builtin_passes  # noqa: F401


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
