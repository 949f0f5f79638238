"""qdq's options and the op families it treats alike."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from onnxopt.options import option

# Ops with weights: weight input 1, (Conv/ConvTranspose/Gemm) bias input 2.
_WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Ops ORT runs as integer kernels only when their output is quantized too (QLinearConv, QLinearAdd, ...).
_NEEDS_OUTPUT_Q = ("Conv", "ConvTranspose", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool")
# Ops that keep their input's scale: ORT drops the Q/DQ around them and runs them on uint8/int8 data.
_SHARE_SCALE = ("MaxPool", "Resize")
_SHAPE_OPS = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather")
_FOLDED = ("Relu", "Clip")  # folded into the producer's range (ORT removes them before a Q)
_ALREADY_QUANTIZED = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger",
                      "MatMulInteger", "QLinearConv", "QLinearMatMul")
DEFAULT_OP_TYPES = ["Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Mul", "Concat", "MaxPool", "AveragePool",
                    "GlobalAveragePool", "Resize"]
_KNOWN_OPS = set(DEFAULT_OP_TYPES)
_SKIPS = ("subgraph", "excluded", "fragile", "dtype", "weight_dtype", "dynamic_weight", "weight_rank",
          "overridable_weight", "constant_input", "batchnorm_not_folded", "weight_not_folded")



@dataclass
class QdqOptions:
    mode: Literal["auto", "static", "dynamic"] = option("auto", help="static: calibrated Q/DQ pairs; dynamic: int8 weights, activations quantized at run time (MatMul/Gemm); auto: both measured, the smallest that meets the tolerance kept")
    embeddings: bool = option(True, help="Gather on a float table of at least 4096 values: int8 table, one scale per row (gathered with the rows)")
    smooth: Literal["auto", "true", "false"] = option("auto", help="static mode: SmoothQuant scales moved from MatMul activations into the weights; auto: on for transformer-like graphs")
    smooth_alpha: list[float] = option(factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8], help="SmoothQuant migration strengths tried per layer (the one with the least output error is kept)")
    method: Literal["minmax", "percentile", "entropy", "mse"] = option("percentile", help="how activation ranges are picked")
    percentile: float = option(99.99, help="for method=percentile: keep this share of values inside the range (each side)")
    per_channel: bool = option(True, help="weights: one scale per output channel (raises opset 10-12 to 13), else per tensor")
    activation_type: Literal["uint8", "int8"] = option("uint8", help="uint8 asymmetric, or int8 symmetric")
    weight_type: Literal["int8"] = option("int8", help="weight integer type: int8 symmetric (the only one)")
    rounding: Literal["auto", "nearest", "gptq"] = option("auto", help="int8 weight codes (static and dynamic modes) rounded to nearest, or by GPTQ on the calibration inputs (the layer output error kept small, same scales and size); auto: gptq when real calibration data is given")
    reduce_range: Literal["auto", "true", "false"] = option("auto", help="7-bit weights; auto: on x86 CPUs without VNNI")
    samples: int = option(512, help="calibration samples read at most")
    exclude: list[str] = option(factory=list, help="node names or globs left in float")
    only: list[str] = option(factory=list, help="node names or globs quantized, every other node left in float (empty: every node)")
    fallback: Literal["weights", "float"] = option("weights", help="what a layer the accuracy guard takes back becomes: weights (its activations float, its weights still int8, read as Cast * scale, which ONNX Runtime folds at load: no bytes kept float, float speed) or float (all of it)")
    weight_only: list[str] = option(factory=list, help="static mode: node names or globs (among those quantized) whose weights become int8 while their activations stay float, as the guard's fallback=weights leaves them")
    guard: bool = option(True, help="static/dynamic: check the result on calibration data and return layers to float when it misses the pass's tolerance; false keeps every layer quantized (for callers that measure the model themselves, as tune does)")
    op_types: list[str] = option(factory=lambda: list(DEFAULT_OP_TYPES), help="op types to quantize")

    def validate(self) -> None:
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")
        if not self.smooth_alpha or not all(0.0 <= a <= 1.0 for a in self.smooth_alpha):
            raise ValueError("smooth_alpha must list values in [0, 1]")
        unknown = [op for op in self.op_types if op not in _KNOWN_OPS]
        if unknown:
            raise ValueError(f"op_types: cannot quantize '{unknown[0]}'; quantizable: {';'.join(DEFAULT_OP_TYPES)}")
