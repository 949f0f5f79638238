"""The layers ``tune`` chooses a setting for, the settings each may take, and the pipeline string
that writes a choice of settings.

A *setting* is one layer's treatment, written with an existing pass and its ``only=`` option:
``int8`` (qdq, static or dynamic), ``int4`` (woq, weight-only, MatMul/Gemm and embedding tables),
``int8w`` (qdq, static mode: int8 weights, float activations; size targets only),
``prune(s)`` (prune: a share s of the layer's output channels removed, the rest refitted by least
squares on calibration data), ``prune(s)+int8``, ``svd(r)`` (svd: MatMul/Gemm into two factors of
rank ratio r). ``float`` leaves the layer as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import numpy as np
import onnx

from .. import graph as G
from .. import layers as L

PRUNE_LEVELS = (0.25, 0.5)
SVD_RATIOS = (0.25, 0.5)
WOQ_BLOCK = 32
_UNSAFE = ",;()=[]*? \t\n"  # characters a pipeline string or a glob would read as syntax


@dataclass
class Layer:
    """One weighted node (or embedding table) of the cleaned model."""

    name: str
    op: str
    params: int
    bytes: int
    kind: str  # conv | matmul | gemm | convtranspose | embedding
    shape: tuple = ()
    index: int = 0
    macs: float = 0.0  # per sample, for the latency estimate
    prunable: bool = False
    settings: list[str] = field(default_factory=list)


def find(model: onnx.ModelProto) -> list[Layer]:
    """The layers of a (cleaned) model that some setting applies to, in graph order."""
    graph = G.import_graph(model)
    out: list[Layer] = []
    for layer in L.find_layers(graph, check_input=True).layers:
        if not layer.top or not layer.node.name:
            continue
        values = int(np.prod(layer.weight.shape))
        out.append(Layer(layer.node.name, layer.node.op, values, values * np.dtype(layer.weight.dtype).itemsize,
                         layer.kind, tuple(int(d) for d in layer.weight.shape), len(out)))
    embeddings, _ = L.find_embeddings(graph, top_only=True)
    for emb in embeddings:
        values = int(np.prod(emb.shape))
        if not emb.node.name or emb.dtype != np.float32 or values < 4096 or emb.axis != 0:
            continue
        out.append(Layer(emb.node.name, "Gather", values, values * 4, "embedding", emb.shape, len(out)))
    return out


def safe_glob(name: str) -> str:
    """A glob matching ``name`` that a pipeline string carries: syntax characters become ``?``."""
    return "".join("?" if c in _UNSAFE else c for c in name)


def settings_for(layer: Layer, target_kind: str, int8_mode: str) -> list[str]:
    """The settings worth measuring for a layer, cheapest in accuracy first."""
    out: list[str] = []
    dense = layer.kind in ("matmul", "gemm")
    if layer.kind == "embedding":
        return ["int8", "int4"] if target_kind == "size" else []
    if int8_mode == "static" or dense:
        out.append("int8")
    if int8_mode == "static" and target_kind == "size":
        out.append("int8w")  # the bytes of int8 for the error of the weights alone: no time saved
    if dense and layer.shape and layer.shape[-1 if layer.kind == "matmul" else 0] >= WOQ_BLOCK // 2:
        out.append("int4")
    if layer.prunable:
        for s in PRUNE_LEVELS:
            out.append(f"prune({s:g})")
            if "int8" in out:
                out.append(f"prune({s:g})+int8")
    if dense and len(layer.shape) == 2:
        k, n = layer.shape
        for r in SVD_RATIOS:
            rank = int(np.ceil(r * min(k, n) / 8) * 8)
            if rank * (k + n) < 0.8 * k * n:
                out.append(f"svd({r:g})")
    return out


def tier(setting: str) -> int:
    """When a setting is measured: 1 int8 (every layer, first); 2 int4, light pruning, rank 1/2;
    3 heavy pruning, rank 1/4. A tier is measured only when the ones before cannot reach the target."""
    if setting in ("int8", "int8w"):
        return 1
    if setting in ("int4", "svd(0.5)") or setting.startswith(f"prune({PRUNE_LEVELS[0]:g})"):
        return 2
    return 3


def parts(setting: str) -> dict[str, float]:
    """``prune(0.5)+int8`` -> {"prune": 0.5, "int8": 1}."""
    out: dict[str, float] = {}
    for piece in setting.split("+"):
        name, _, rest = piece.partition("(")
        out[name] = float(rest.rstrip(")")) if rest else 1.0
    return out


@dataclass(frozen=True)
class Passes:
    """How settings become passes: the options every pass of a tuned pipeline is written with."""

    int8_mode: str = "static"
    samples: int = 128
    # the search measures qdq with round-to-nearest weights (GPTQ's codes depend on the passes before
    # qdq, so every evaluation that prunes first would collect every layer's statistics again); the
    # final pipeline is written with "auto" (GPTQ with calibration data) and measured as written
    rounding: str = "nearest"

    def pipeline(self, choice: dict[str, str], layers: list[Layer]) -> str:
        """The passes (after ``cleanup``) writing ``choice`` (layer name -> setting); "" when all float."""
        prune: dict[float, list[str]] = {}
        svd: dict[float, list[str]] = {}
        int4: list[str] = []
        int8: list[str] = []
        int8w: list[str] = []
        for layer in layers:  # graph order: the same choice always prints the same string
            setting = choice.get(layer.name, "float")
            if setting == "float":
                continue
            glob = safe_glob(layer.name)
            for name, value in parts(setting).items():
                {"prune": prune.setdefault(value, []) if name == "prune" else None,
                 "svd": svd.setdefault(value, []) if name == "svd" else None,
                 "int4": int4, "int8": int8, "int8w": int8w}[name].append(glob)
        s = self.samples
        steps = [f"prune(sparsity={v:g},pattern=structured,samples={s},only={';'.join(n)})"
                 for v, n in sorted(prune.items())]
        steps += [f"svd(rank_ratio={v:g},latency_gate=false,samples={s},only={';'.join(n)})"
                  for v, n in sorted(svd.items())]
        if int4:
            steps.append(f"woq(bits=4,block_size={WOQ_BLOCK},only={';'.join(int4)})")
        if int8 or int8w:
            # static: no SmoothQuant, so one layer's activation ranges are those of every choice (shared)
            smooth = ",smooth=false" if self.int8_mode == "static" else ""
            weights = f",weight_only={';'.join(int8w)}" if int8w else ""
            rounding = f",rounding={self.rounding}" if self.rounding != "auto" else ""
            steps.append(f"qdq(mode={self.int8_mode},samples={s}{smooth}{rounding},guard=false,"
                         f"only={';'.join(int8 + int8w)}{weights})")
        return ",".join(steps)


def prunable_layers(model: onnx.ModelProto, layers: list[Layer], calibration, samples: int) -> set[str]:
    """The layers structured pruning can shrink (their channels traced to the next layer): one run
    of prune over every layer, without calibration (its stats say which were pruned)."""
    from ..pipeline import PassContext, PassManager, Pipeline

    names = [safe_glob(x.name) for x in layers if x.kind != "embedding"]
    if not names:
        return set()
    spec = f"prune(sparsity=0.25,pattern=structured,reconstruct=false,samples={samples},only={';'.join(names)})"
    manager = PassManager(Pipeline.parse(spec), PassContext(calibration=calibration), max_growth=None,
                          prerequisites=False)
    try:
        manager.run(model)
    except Exception:  # noqa: BLE001 - a model prune cannot take: no layer is prunable
        return set()
    record = next((r for r in manager.records if r.name == "prune"), None)
    rows = (record.stats.get("layers") or []) if record else []
    return {row["layer"] for row in rows if not row.get("dense")}
