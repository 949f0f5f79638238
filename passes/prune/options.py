"""prune's options and the op types it prunes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

import numpy as np

from onnxopt.options import option

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_TARGETS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclass
class PruneOptions:
    sparsity: Union[float, Literal["auto"]] = option(0.5, help="fraction of all prunable weights set to zero (structured: removed), layers kept dense included; auto: per-layer ratios from sensitivity")
    pattern: Literal["unstructured", "2:4", "4:8", "structured"] = option("unstructured", help="unstructured zeroes single weights; 2:4/4:8 keep n of every m along the reduction axis; structured removes whole output channels")
    scope: Literal["auto", "layer", "row", "global"] = option("auto", help="one ratio per layer, the same ratio in every output row, or one threshold over layer-normalised (LAMP) scores; auto: row for wanda (its paper's group), layer otherwise (obs: SparseGPT shares one threshold across rows)")
    global_norm: Literal["lamp", "none"] = option("lamp", help="scope=global ranks LAMP-normalised scores, or raw ones (none: Han et al. 2015's global magnitude)")
    score: Literal["magnitude", "wanda", "obs"] = option("magnitude", help="wanda: |W| times the input column norm on calibration data; obs: the OBS/SparseGPT saliency w²/[(XᵀX+λI)⁻¹]_jj")
    norm: Literal["l1", "l2"] = option("l2", help="channel norm for structured pruning")
    reconstruct: Union[bool, Literal["auto"]] = option("auto", help="least-squares update of surviving weights; auto: when calibration data is given")
    bias_correction: bool = option(False, help="shift biases by the mean output change on calibration data")
    target: float = option(0.5, help="overall sparsity sparsity=auto reaches (over all prunable weights)")
    max_layer_sparsity: float = option(0.95, help="the most of one layer's weights (structured: channels) the budget may take; never below sparsity")
    tolerance: Optional[float] = option(None, help="sparsity=auto: largest estimated relative output error a layer may take")
    exclude: list[str] = option(factory=list, help="node or weight names (globs) left dense")
    only: list[str] = option(factory=list, help="node or weight names (globs) pruned, the others left out of the budget (empty: every layer); keep_first_last does not apply to them")
    keep_first_last: bool = option(True, help="leave the first and last weighted layers dense")
    ops: list[str] = option(factory=lambda: list(_TARGETS), help="op types whose weights are pruned")
    damp: float = option(0.01, help="ridge damping of XᵀX, relative to its mean diagonal")
    samples: int = option(512, help="calibration samples read at most (the stat calibration_samples says how many were)")
    sequential: bool = option(True, help="refit each layer on the inputs the pruned layers before it make, aiming at the dense output")
    fold_removed: bool = option(True, help="structured, no calibration data: fold the removed channels' constant output (bias through the chain) into the consumer's bias")
    storage: Literal["auto", "dense"] = option("auto", help="how pruned tensors are written; auto: a Constant with a COO sparse_value where that is smaller, else dense")

    def validate(self) -> None:
        if self.sparsity != "auto" and not 0.0 <= float(self.sparsity) < 1.0:
            raise ValueError(f"sparsity must be in [0, 1) or auto, got {self.sparsity}")
        if not 0.0 <= self.target < 1.0:
            raise ValueError(f"target must be in [0, 1), got {self.target}")
        if self.sparsity == "auto" and self.pattern != "unstructured":
            raise ValueError(f"sparsity=auto works with pattern=unstructured only, not {self.pattern}")
        if self.tolerance is not None and self.sparsity != "auto":
            raise ValueError("tolerance applies to sparsity=auto only")
        if self.tolerance is not None and self.tolerance <= 0:
            raise ValueError(f"tolerance must be positive, got {self.tolerance}")
        if not 0.0 < self.max_layer_sparsity < 1.0:
            raise ValueError(f"max_layer_sparsity must be in (0, 1), got {self.max_layer_sparsity}")
        if self.pattern in ("2:4", "4:8") and self.sparsity != "auto" and float(self.sparsity) != 0.5:
            raise ValueError(f"pattern={self.pattern} fixes the sparsity of every pruned layer at 0.5; "
                             f"sparsity={self.sparsity} does not apply (leave it out)")
        if self.pattern in ("2:4", "4:8") and self.scope not in ("auto", "layer"):
            raise ValueError(f"pattern={self.pattern} fixes the sparsity of every group; scope={self.scope} does not apply")
        if self.global_norm != "lamp" and self.scope != "global":
            raise ValueError(f"global_norm applies to scope=global only, not scope={self.scope}")
        bad = [op for op in self.ops if op not in _TARGETS]
        if bad:
            raise ValueError(f"ops: cannot prune {', '.join(bad)}; supported: {', '.join(_TARGETS)}")
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
