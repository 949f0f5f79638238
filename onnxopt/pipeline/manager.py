"""The pass manager: imports the model once, runs every pass on the same graph (prerequisites first),
checks the contracts and the growth allowance after each, and exports once at the end."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import onnx
import onnx_graphsurgeon as gs

from .. import graph as G
from ..errors import OnnxoptError, PassError
from ..serialize import serialized_size
from .contracts import (
    GROWTH_FLOOR_BYTES,
    MAX_GROWTH,
    check_contracts,
    checker_error,
    duplicate_names,
    growth_limit,
    interface_of,
)
from .parse import Pipeline, Step
from .registry import Pass, PassContext, PassResult, Requirement, get_pass


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
    from ..report import human_bytes  # report imports this module

    return human_bytes(n)


def _measure(graph: gs.Graph) -> tuple[int, int, int]:
    return G.sizes(graph)


def _pairs(before: tuple, after: tuple) -> list[int]:
    return [before[0], after[0], before[1], after[1], before[2], after[2]]
