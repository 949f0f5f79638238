"""woq's options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from onnxopt.options import option

ALGOS = ("rtn", "hqq", "gptq")


@dataclass
class WoqOptions:
    bits: int = option(4, help="bits per weight: 4 or 8")
    block_size: int = option(32, help="weights per quantization block along K (one scale each): 16, 32, 64, 128 or 256")
    algo: Literal["rtn", "hqq", "gptq"] = option("rtn", help="rtn: round to nearest; hqq: half-quadratic zero-point fit (no data); gptq: error compensation from calibration data (rtn without it)")
    accuracy_level: int = option(0, help="MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (fastest on CPU, less exact)")
    symmetric: bool = option(False, help="no zero points (range around the default zero point 2^(bits-1)); rtn and gptq")
    embeddings: bool = option(True, help="Gather on a float table becomes GatherBlockQuantized (rtn blocks)")
    exclude: list[str] = option(factory=list, help="node names (globs) left in float")
    only: list[str] = option(factory=list, help="node names (globs) quantized, the others left in float (empty: every node)")
    samples: int = option(128, help="gptq: calibration samples read at most")
    damp: float = option(0.01, help="gptq: added to the Hessian's diagonal, times its mean")
    act_order: bool = option(False, help="gptq: quantize input channels in order of decreasing Hessian diagonal")

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"block_size must be 16, 32, 64, 128 or 256, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 0 to 4, got {self.accuracy_level}")
        if self.symmetric and self.algo == "hqq":
            raise ValueError("hqq fits the zero point: symmetric=true goes with algo=rtn or gptq")
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")
        if not 0.0 <= self.damp < 1.0:
            raise ValueError(f"damp must be in [0, 1), got {self.damp}")
