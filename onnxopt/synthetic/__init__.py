"""Synthetic inputs that the original model actually runs on.

Binding every symbolic dimension to 1 and feeding random numbers fails on many
real models: detectors need image sizes that are multiples of their total
stride, small-kernel CNNs a minimum spatial size, audio models a few hundred
samples and a sample rate they accept, transformers token/position/segment ids
below the row counts of their embedding tables. ``find_inputs`` reads what the
graph says (dimension names and sharing, Conv/Pool kernels and strides,
Reshape/Slice constants, the Gather tables integer inputs index, constants
scalar inputs are compared with), builds a short ladder of candidate bindings,
cheapest first, and runs the original in ONNX Runtime on one sample of each
until one runs. Everything is seeded: the same model gives the same inputs.

The graph reading lives in :mod:`onnxopt.synthetic.graph`; this module turns
its facts into candidate feeds and tries them.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import onnx

from .. import progress
from ..data import Dataset, InputSpec, input_specs
from ..errors import InputError
from ..runtime import ort_message
from .graph import GraphFacts, InputFacts, dim_key, read_graph

# Ladders of values per dimension role, cheapest first. Spatial and length
# ladders are rounded up to the model's total stride and its minimum size.
LADDERS = {
    "batch": [1],
    "spatial": [64, 128, 224, 320, 640, 1024],
    "length": [16, 64, 128, 256, 512, 1024, 16000],
    "sequence": [16, 32, 64, 128, 256, 512],
    "audio": [512, 16000, 1024, 8000, 4000, 32000, 256],
    "generic": [1, 16, 64, 128, 224, 512, 1024],
    "past": [1, 16, 0],  # cached steps of a decoder; none last (empty tensors trip some kernels)
    "total": [16],  # past + sequence, derived when both are there
}
MAX_ATTEMPTS = 24
ATTEMPT_SECONDS = 20.0  # one run of the original; past it the run is stopped
BUDGET_SECONDS = 60.0   # all attempts together
MAX_VALUES = 1 << 26    # a candidate feed of more values (256 MB of float32) is not tried


@dataclass
class Symbol:
    """One symbolic dimension: a dim_param shared by every input that names it, or one anonymous axis."""

    key: str
    named: bool
    role: str
    ladder: list[int]
    formula: Optional[str] = None  # 'past_sequence_length + 1': computed from the other dims

    def value(self, level: int) -> int:
        return self.ladder[min(level, len(self.ladder) - 1)]


@dataclass
class Candidate:
    """A full binding: a value per symbol and a value choice per scalar input compared with constants."""

    dims: dict[str, int]
    choices: dict[str, int] = field(default_factory=dict)


@dataclass
class Probe:
    """What ``find_inputs`` found: a feed the original runs on, or why none did."""

    feed: Optional[dict[str, np.ndarray]]
    dims: dict[str, int]  # named symbolic dims and their values (what a user would pass as --dim)
    attempts: int
    error: Optional[str] = None
    seconds: float = 0.0
    description: str = ""
    binding: dict[str, int] = field(default_factory=dict)  # every symbolic dim, unnamed ones as 'input[axis]'

    @property
    def found(self) -> bool:
        return self.feed is not None

    def dataset(self, seed: int, notes: tuple[str, ...] = ()) -> Dataset:
        """The found feed as validation data."""
        samples = max([v.shape[0] for v in self.feed.values() if v.ndim] + [1])
        return Dataset([self.feed], None, source=f"synthetic (seed {seed})", synthetic=True, samples=samples,
                       notes=list(notes))


# ----------------------------------------------------------------- symbols and candidates

def symbols(specs: list[InputSpec], facts: GraphFacts, fixed: dict[str, int]) -> dict[str, Symbol]:
    """Every symbolic dimension of the inputs, with its role and ladder (``fixed`` ones get one value)."""
    out: dict[str, Symbol] = {}
    for spec in specs:
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int) and dim > 0:
                continue
            key, named = dim_key(spec.name, axis, dim)
            role = facts.role_of(spec, axis, dim)
            user = fixed.get(key, fixed.get("?") if not named else None)
            sym = out.get(key)
            if sym is None:
                sym = out[key] = Symbol(key, named, role, [])
            elif role_rank(role) > role_rank(sym.role):
                sym.role = role
            if user is not None:
                sym.ladder = [int(user)]
    for sym in out.values():
        if not sym.ladder:
            sym.ladder = facts.ladder(sym.key, sym.role, LADDERS[sym.role])
            sym.formula = _formula(sym, out)
    return out


def _formula(sym: Symbol, syms: dict[str, Symbol]) -> Optional[str]:
    """A dim named by arithmetic over other dims' names, or a total of past and new steps."""
    others = {k for k, s in syms.items() if s.named and k != sym.key}
    if sym.named and re.search(r"[-+*/]", sym.key):
        names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", sym.key)) - {"floor", "ceil", "min", "max"}
        if names and names <= others:
            return sym.key
    if sym.role == "total":
        past = [k for k in others if syms[k].role == "past"]
        steps = [k for k in others if syms[k].role == "sequence"]
        if past and steps:
            return f"{past[0]} + {steps[0]}"
    return None


def evaluate(formula: str, values: dict[str, int]) -> Optional[int]:
    """Integer arithmetic (+ - * / // % floor ceil min max) over named values; None if it is anything else."""
    import ast
    import math

    funcs = {"floor": math.floor, "ceil": math.ceil, "min": min, "max": max}
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}

    def walk(n):
        if isinstance(n, ast.Expression):
            return walk(n.body)
        if isinstance(n, ast.Constant) and isinstance(n.value, (int, float)):
            return n.value
        if isinstance(n, ast.Name):
            return values[n.id]
        if isinstance(n, ast.BinOp) and type(n.op) in ops:
            return ops[type(n.op)](walk(n.left), walk(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -walk(n.operand)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in funcs:
            return funcs[n.func.id](*[walk(a) for a in n.args])
        raise ValueError(formula)

    try:
        return max(0, int(walk(ast.parse(formula, mode="eval"))))
    except Exception:
        return None


_ROLE_ORDER = ["generic", "batch", "past", "total", "sequence", "length", "audio", "spatial"]


def role_rank(role: str) -> int:
    return _ROLE_ORDER.index(role)


def candidates(syms: dict[str, Symbol], facts: GraphFacts, specs: dict[str, InputSpec]) -> list[Candidate]:
    """Levels of the ladders, cheapest first, each with every choice of the compared scalars;
    then every dimension at 1 (what a model exported with dummy size 1 inputs runs on)."""
    levels = max([len(s.ladder) for s in syms.values()] + [1])
    width = max([len(c) for c in facts.choices.values()] + [1])
    out, seen = [], set()
    for level in range(levels):
        for pick in range(width):
            dims = _derive({k: s.value(level) for k, s in syms.items()}, syms)
            choices = {name: values[min(pick, len(values) - 1)] for name, values in facts.choices.items()}
            _add(out, seen, Candidate(dims, choices))
    ones = _derive({k: (s.ladder[0] if len(s.ladder) == 1 else 1) for k, s in syms.items()}, syms)
    _add(out, seen, Candidate(ones, {n: v[0] for n, v in facts.choices.items()}))
    # Bindings the conv geometry refuses go last: the geometry is a hint, ONNX Runtime decides.
    out = [c for c in out if _values(c, specs) <= MAX_VALUES] or out[:1]
    fits = [c for c in out if facts.accepts(lambda name, axis: _size(c, name, axis, specs))]
    return (fits + [c for c in out if c not in fits])[:MAX_ATTEMPTS]


def _values(cand: Candidate, specs: dict[str, InputSpec]) -> int:
    return sum(int(np.prod([_size(cand, name, a, specs) for a in range(len(spec.shape))], dtype=np.int64))
               for name, spec in specs.items())


def _size(cand: Candidate, name: str, axis: int, specs: dict[str, InputSpec]) -> int:
    dim = specs[name].shape[axis]
    return dim if isinstance(dim, int) and dim > 0 else cand.dims[dim_key(name, axis, dim)[0]]


def _derive(dims: dict[str, int], syms: dict[str, Symbol]) -> dict[str, int]:
    for key, sym in syms.items():
        if sym.formula:  # never set on a dim the user fixed
            value = evaluate(sym.formula, dims)
            if value is not None:
                dims[key] = value
    return dims


def _add(out: list, seen: set, cand: Candidate) -> None:
    key = (tuple(sorted(cand.dims.items())), tuple(sorted(cand.choices.items())))
    if key not in seen:
        seen.add(key)
        out.append(cand)


# ----------------------------------------------------------------- feeds

def make_feed(specs: list[InputSpec], facts: GraphFacts, cand: Candidate, rng: np.random.Generator,
              ) -> dict[str, np.ndarray]:
    """One feed for a binding: values follow what each input is (index, mask, state, rate, data)."""
    feed = {}
    for spec in specs:
        shape = [d if isinstance(d, int) and d > 0 else cand.dims[dim_key(spec.name, a, d)[0]]
                 for a, d in enumerate(spec.shape)]
        feed[spec.name] = input_values(spec, facts.inputs.get(spec.name), shape, cand, rng)
    return feed


def input_values(spec: InputSpec, info: Optional[InputFacts], shape: list[int], cand: Candidate,
                 rng: np.random.Generator) -> np.ndarray:
    dtype = spec.dtype
    info = info or InputFacts(spec.name)
    if dtype.kind in "biuf" and info.mask_like:
        return np.ones(shape, dtype)
    if dtype == np.bool_:
        return np.zeros(shape, dtype) if not shape else np.asarray(rng.random(shape) < 0.5)
    if np.issubdtype(dtype, np.integer):
        return _integers(spec, info, shape, cand, rng)
    if np.issubdtype(dtype, np.floating):
        if info.state_like or not shape:
            return np.zeros(shape, dtype)
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "US" or dtype == np.object_:
        return np.array(rng.choice(["a", "b", "c"], size=shape), dtype=object)
    raise InputError(f"cannot make synthetic data of type {dtype} for input '{spec.name}'; give data with --inputs")


def _integers(spec: InputSpec, info: InputFacts, shape: list[int], cand: Candidate,
              rng: np.random.Generator) -> np.ndarray:
    dtype = spec.dtype
    if spec.name in cand.choices:
        return np.full(shape, cand.choices[spec.name], dtype)
    if info.length_like:
        longest = max([v for k, v in cand.dims.items() if v > 1] + [1])
        return np.full(shape, longest, dtype)
    low = info.low
    picture = info.high is None and dtype.itemsize == 1 and len(shape) >= 3
    high = info.high if info.high is not None else (int(np.iinfo(dtype).max) + 1 if picture else low + 8)
    if high <= low:
        high = low + 1
    if info.position_like and shape:
        row = (np.arange(shape[-1]) % (high - low)) + low
        return np.broadcast_to(row, shape).astype(dtype)
    return rng.integers(low, high, size=shape).astype(dtype)


# ----------------------------------------------------------------- running

def find_inputs(model: onnx.ModelProto, *, dims: Optional[dict[str, int]] = None, seed: int = 0,
                opt_level: str = "all", attempt_seconds: float = ATTEMPT_SECONDS,
                budget_seconds: float = BUDGET_SECONDS) -> Probe:
    """The first candidate binding (cheapest first) the original runs on in ONNX Runtime.

    ``dims`` fixes symbolic dimensions by name ('?' fixes every unnamed one).
    A session that cannot even be made raises InputError (the model itself is
    the problem); a binding that fails to run is recorded and the next one tried.
    """
    from ..validate import make_session

    start = time.perf_counter()
    specs = input_specs(model)
    facts = read_graph(model, specs)
    syms = symbols(specs, facts, dict(dims or {}))
    cands = candidates(syms, facts, {s.name: s for s in specs})
    try:
        session = make_session(model, opt_level)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"ONNX Runtime cannot load the original model: {ort_message(exc)}") from None
    first_error = None
    for i, cand in enumerate(progress.iterate(cands, "finding synthetic inputs", unit="try")):
        feed = make_feed(specs, facts, cand, np.random.default_rng(seed))
        error = run_once(session, feed, attempt_seconds)
        if error is None:
            used = {k: v for k, v in cand.dims.items() if syms[k].named}
            return Probe(feed, used, i + 1, None, time.perf_counter() - start,
                         describe(feed, used, cand.choices), dict(cand.dims))
        first_error = first_error or f"{error} (at {shapes_text(feed)})"
        if time.perf_counter() - start > budget_seconds:
            break
    tried = len(cands) if i + 1 == len(cands) else i + 1
    reason = (f"ONNX Runtime cannot run the original model on synthetic inputs "
              f"({tried} binding{'s' if tried > 1 else ''} tried): {first_error}")
    return Probe(None, {}, tried, reason, time.perf_counter() - start)


def run_once(session, feed: dict[str, np.ndarray], seconds: float) -> Optional[str]:
    """None when the session runs on ``feed``; else ONNX Runtime's error as one line."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4
    timer = threading.Timer(seconds, lambda: setattr(options, "terminate", True))
    timer.start()
    try:
        session.run(None, feed, options)
        return None
    except Exception as exc:
        if options.terminate:
            return f"a run took over {seconds:g} s"
        return ort_message(exc)
    finally:
        timer.cancel()


# ----------------------------------------------------------------- words

def shapes_text(feed: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{k}: {v.dtype}[{','.join(map(str, v.shape))}]" for k, v in feed.items())


def describe(feed: dict[str, np.ndarray], dims: dict[str, int], choices: dict[str, int]) -> str:
    """'x: float32[1,3,640,640]; dims height=640, width=640; values sr=16000'."""
    parts = [shapes_text(feed) or "no inputs"]
    if dims:
        parts.append("dims " + ", ".join(f"{k}={v}" for k, v in dims.items()))
    if choices:
        parts.append("values " + ", ".join(f"{k}={v}" for k, v in choices.items()))
    return "; ".join(parts)
