"""How much each weight matters: magnitude, Wanda (|W| times the input column norm), the OBS
saliency SparseGPT prunes by, and LAMP's layer-normalised scores for one global threshold."""

from __future__ import annotations

import numpy as np

from .units import _Unit


class Scoring:
    def scores(self, u: _Unit, w: np.ndarray) -> np.ndarray:
        s = np.abs(w)
        if self.o.score in ("wanda", "obs") and u.grams:
            o = w.shape[0]
            per = o // u.groups
            for gi in range(u.groups):
                gram = u.gram(gi)
                sl = slice(gi * per, (gi + 1) * per)
                if self.o.score == "wanda":
                    s[sl] *= _input_norms(np.diag(gram[0]))[None, :]
                else:
                    s[sl] = _obs_scores(w[sl], gram[0], self.o.damp)
        return s


def _input_norms(sq: np.ndarray) -> np.ndarray:
    """‖X_j‖₂ from the column sums of squares. An input that is zero on all the calibration data gets
    a norm far below every live one (1e-6 of the smallest), so its weights still rank below the
    live ones and, among themselves, by magnitude rather than by position: with no evidence from
    the data, magnitude decides."""
    norms = np.sqrt(np.maximum(sq, 0.0))
    live = norms > 0
    if not live.all():
        norms = np.where(live, norms, 1e-6 * float(norms[live].min()) if live.any() else 1.0)
    return norms


def _damping(gram: np.ndarray, damp: float) -> tuple[np.ndarray, float, np.ndarray]:
    """XᵀX with a unit diagonal at inputs that are zero on all the calibration data (they then touch
    nothing else), the ridge ``lam`` (``damp`` times its mean diagonal) and the mask of those dead inputs."""
    gram = gram.copy()
    dead = np.diag(gram) <= 0
    gram[dead, dead] = 1.0
    return gram, damp * float(np.mean(np.diag(gram))), dead


def _obs_scores(w: np.ndarray, gram: np.ndarray, damp: float) -> np.ndarray:
    """The OBS saliency of SparseGPT (Frantar & Alistarh 2023), ranked by its square root:
    |w_ij| / sqrt([(XᵀX + lam I)⁻¹]_jj), ``lam`` the same ridge as the refit. w_ij²/[H⁻¹]_jj is the
    increase of the layer's squared output error when w_ij alone is removed and the row's other
    weights are re-solved. With uncorrelated inputs it is |w_ij|·‖X_j‖ (Wanda); correlated inputs
    make a weight that the others can stand in for cheaper. The square root makes it scale like
    |W| (for LAMP and ``auto``); the order within any group is the same. Weights of inputs that are
    zero on all the calibration data rank below every live one, by magnitude among themselves."""
    h, lam, dead = _damping(gram, damp)
    h[np.diag_indices_from(h)] += max(lam, 1e-12)
    try:
        inv_diag = np.diag(np.linalg.inv(h))
    except np.linalg.LinAlgError:
        inv_diag = np.diag(np.linalg.pinv(h))
    inv_diag = np.maximum(inv_diag, 1e-300)
    s = np.abs(w) / np.sqrt(inv_diag)[None, :]
    if dead.any():
        live = s[:, ~dead]
        floor = float(live[live > 0].min()) if live.size and np.any(live > 0) else 1.0
        a = np.abs(w[:, dead])
        s[:, dead] = 0.5 * floor * a / max(float(a.max()), 1e-300)
    return s


def _lamp(scores: np.ndarray) -> np.ndarray:
    """Layer-adaptive magnitude (LAMP, Lee et al. 2021): s² over the sum of s² of the weights at least as large.

    Comparable across layers: the layer's largest weight scores 1, and a layer's
    scores do not depend on its size or scale.
    """
    sq = (scores.astype(np.float64) ** 2).ravel()
    order = np.argsort(sq, kind="stable")
    suffix = np.cumsum(sq[order][::-1])[::-1]
    out = np.empty_like(sq)
    out[order] = sq[order] / np.maximum(suffix, 1e-300)
    return out
