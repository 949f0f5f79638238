"""svd's options: one rank mode at most, whitening, rounding and the latency gate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from onnxopt.options import option

_MODES = ("rank", "rank_ratio", "energy", "tolerance", "param_ratio")


DEFAULT_ENERGY = 0.99


@dataclass
class SvdOptions:
    rank: Optional[int] = option(None, help="keep this many singular values in every layer")
    rank_ratio: Optional[float] = option(None, help="keep ceil(rank_ratio * min(K, N)) singular values")
    energy: Optional[float] = option(None, help="keep the fewest singular values holding this fraction of sum(s^2); 0.99 when no mode is set")
    tolerance: Optional[float] = option(None, help="per layer: the smallest rank whose relative output error |X(W-W')|^2/|XW|^2 stays under this (calibration)")
    param_ratio: Optional[float] = option(None, help="whole model: per-layer ranks that minimise summed -log(1 - output error) at this ratio of the factorable layers' parameters (calibration)")
    aware: Union[bool, Literal["auto"]] = option("auto", help="whiten by the Cholesky factor of X^T X before truncating (SVD-LLM style; calibration); auto: when calibration data gives every layer at least as many rows as input channels")
    round_to: int = option(8, help="ranks rounded up to a multiple of this")
    latency_gate: bool = option(True, help="time each factorized layer against the original in ORT; keep it only when faster")
    latency_margin: float = option(0.05, help="latency_gate keeps a layer only when faster by at least this fraction")
    damp: float = option(0.01, help="added to the diagonal of X^T X, times its mean, before the Cholesky factorization")
    samples: int = option(512, help="calibration samples read at most")
    exclude: list[str] = option(factory=list, help="node names (globs) left alone")
    only: list[str] = option(factory=list, help="node names (globs) factorized, the others left alone (empty: every layer)")

    def validate(self) -> None:
        chosen = [m for m in _MODES if getattr(self, m) is not None]
        if len(chosen) > 1:
            raise ValueError(f"give at most one of {', '.join(_MODES)}; got {', '.join(chosen)}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")
        for name in ("rank_ratio", "energy", "param_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.tolerance is not None and not 0.0 < self.tolerance < 1.0:
            raise ValueError(f"tolerance must be in (0, 1), got {self.tolerance}")
        if self.round_to < 1:
            raise ValueError(f"round_to must be at least 1, got {self.round_to}")
        if not 0.0 <= self.latency_margin < 1.0:
            raise ValueError(f"latency_margin must be in [0, 1), got {self.latency_margin}")
        if self.damp < 0.0:
            raise ValueError(f"damp must be non-negative, got {self.damp}")
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")

    @property
    def mode(self) -> str:
        return next((m for m in _MODES if getattr(self, m) is not None), "energy")

    @property
    def needs_calibration(self) -> bool:
        return self.aware is True or self.mode in ("tolerance", "param_ratio")
