"""Making up for what was pruned: ridge least-squares refits of the surviving weights on the
layer's input XᵀX (aimed at the dense output when sequential), bias correction by the mean output
change, and the consumer's refit after structured removal."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from .options import _FLOATS
from .scores import _damping
from .units import _Unit


class Reconstruction:
    def solve(self, u: _Unit, w: np.ndarray, keep: np.ndarray) -> np.ndarray:
        out = np.where(keep, w, 0.0)
        per = w.shape[0] // u.groups
        for gi in range(u.groups):
            gram, lam, _ = _damping(u.gram(gi)[0], self.o.damp)
            rows = np.arange(gi * per, (gi + 1) * per)
            cross = u.cross(gi)  # sequential: X_pᵀ X_dense, the refit aims at the dense output
            counts = keep[rows].sum(axis=1)
            if float(np.sum(counts.astype(np.float64) ** 3)) > _EXACT_FLOPS:
                out[rows] = _cg_solve(w[rows], keep[rows], gram, lam, gram if cross is None else cross.T)
                continue
            # row o of (G w_o + lam w_o): the ridge pulls towards the dense weights, not towards zero
            rhs_all = w[rows] @ (gram if cross is None else cross.T) + lam * w[rows]
            for s in np.unique(counts):
                if s == 0:
                    continue
                sel = rows[counts == s]
                rsel = sel - gi * per
                budget = max(1, int(2**25 // (s * s)))
                for start in range(0, len(sel), budget):
                    part, rpart = sel[start:start + budget], rsel[start:start + budget]
                    idx = np.nonzero(keep[part])[1].reshape(len(part), s)
                    a = gram[idx[:, :, None], idx[:, None, :]]
                    a[:, np.arange(s), np.arange(s)] += lam
                    b = np.take_along_axis(rhs_all[rpart], idx, axis=1)
                    try:
                        sol = np.linalg.solve(a, b[..., None])[..., 0]
                    except np.linalg.LinAlgError:
                        continue
                    vals = np.zeros((len(part), w.shape[1]))
                    np.put_along_axis(vals, idx, sol, axis=1)
                    out[part] = vals
        return out

    def correct_bias(self, u: _Unit, old: np.ndarray, new: np.ndarray) -> bool:
        if len(u.uses) != 1 or not u.grams:
            return False
        node = u.uses[0].node
        per = old.shape[0] // u.groups
        shift = np.zeros(old.shape[0])
        for gi in range(u.groups):
            mean = u.gram(gi)[2]
            dense_mean = getattr(u.grams[gi][0], "mean_dense", mean) if len(u.grams[gi]) == 1 else mean
            sl = slice(gi * per, (gi + 1) * per)
            shift[sl] = new[sl] @ mean - old[sl] @ dense_mean
        if node.op == "Conv":
            return self.add_to_bias(node, 2, -shift, (old.shape[0],))
        if node.op == "Gemm":
            beta = float(node.attrs.get("beta", 1.0))
            if beta == 0:
                return False
            return self.add_to_bias(node, 2, -shift / beta, (old.shape[0],))
        # MatMul: a following Add of a constant [N]
        y = node.outputs[0]
        if len(y.outputs) != 1 or y.outputs[0].op != "Add":
            return False
        add = y.outputs[0]
        other = [i for i, t in enumerate(add.inputs) if t is not y]
        if len(other) != 1:
            return False
        return self.add_to_bias(add, other[0], -shift, (old.shape[0],), required=True)

    def add_to_bias(self, node: gs.Node, slot: int, delta: np.ndarray, shape: tuple, required: bool = False) -> bool:
        if slot < len(node.inputs) and node.inputs[slot].name:
            b = node.inputs[slot]
            if not isinstance(b, gs.Constant) or len(b.outputs) != 1:
                return False
            vals = b.values
            if vals.size != delta.size and vals.size != 1:
                return False
            if vals.dtype not in _FLOATS:
                return False
            nv = (np.broadcast_to(vals.astype(np.float64).reshape(-1), delta.shape) + delta)
            if vals.size == 1 and vals.ndim:
                return False
            newshape = vals.shape if vals.size == delta.size else shape
            node.inputs[slot] = gs.Constant(self.fresh(b.name + "_corrected"), nv.reshape(newshape).astype(vals.dtype))
            return True
        if required:
            return False
        dtype = node.inputs[1].dtype if node.inputs[1].dtype is not None else np.float32
        const = gs.Constant(self.fresh(f"{node.name or 'layer'}_bias"), delta.astype(np.dtype(dtype)))
        while len(node.inputs) < slot:
            node.inputs.append(gs.Variable.empty())
        node.inputs.append(const)
        return True

    def refit(self, cu: _Unit, cw: np.ndarray, keep: np.ndarray, ckind: str) -> tuple[np.ndarray, np.ndarray]:
        """Least squares for the consumer on its kept input channels plus an intercept (the new bias share)."""
        gram, rows, mean = cu.gram(0)
        if ckind == "conv":
            wm = cw.reshape(cw.shape[0], -1).astype(np.float64)
            kern = int(np.prod(cw.shape[2:]))
            mask = np.zeros(cw.shape[1], bool)
            mask[keep] = True
            cols = np.flatnonzero(np.repeat(mask, kern))
        else:
            wm = (cw.T if ckind == "matmul" else cw).astype(np.float64)
            cols = np.asarray(keep)
        total = mean * rows
        n = len(cols)
        a = np.empty((n + 1, n + 1))
        a[:n, :n] = gram[np.ix_(cols, cols)]
        lam = self.o.damp * float(np.mean(np.diag(gram))) if gram.size else 0.0
        a[np.arange(n), np.arange(n)] += max(lam, 1e-12)
        a[:n, n] = a[n, :n] = total[cols]
        a[n, n] = max(rows, 1)
        rhs = np.vstack([gram[cols] @ wm.T, (total @ wm.T)[None, :]])
        sol = np.linalg.lstsq(a, rhs, rcond=None)[0]
        w_new, shift = sol[:n].T, sol[n]
        if ckind == "conv":
            new = w_new.reshape(cw.shape[0], len(keep), *cw.shape[2:])
        elif ckind == "matmul":
            new = w_new.T
        else:
            new = w_new
        return new.astype(cw.dtype), shift


def _cg_solve(w: np.ndarray, keep: np.ndarray, gram: np.ndarray, lam: float, rhs_matrix: np.ndarray,
              tol: float = 1e-5, max_iter: int = 1000) -> np.ndarray:
    """The same per-row least squares, ``(G[S,S] + lam) w_S = (M w + lam w)[S]``, for all rows at once by
    Jacobi-preconditioned conjugate gradients: each iteration is one [O,K]x[K,K] product, where
    direct solves would cost the sum of |S|³. Iterations stop at CG_FLOPS of products (at least
    CG_MIN_ITER): on an ill-conditioned XᵀX (few calibration rows for a wide layer) a thousand
    4096-wide iterations took minutes; each iteration lowers the error, so a stopped solve is
    still a refit."""
    max_iter = min(max_iter, max(CG_MIN_ITER, int(CG_FLOPS // max(2.0 * w.shape[0] * gram.shape[0] ** 2, 1.0))))
    m = keep.astype(np.float64)
    diag = np.diag(gram) + lam
    b = (w @ rhs_matrix + lam * w) * m
    x = w * m
    apply = lambda v: ((v * m) @ gram + lam * v) * m
    r = b - apply(x)
    z = r / diag
    p = z.copy()
    rz = np.sum(r * z, axis=1)
    bnorm = np.maximum(np.linalg.norm(b, axis=1), 1e-300)
    for _ in range(max_iter):
        if np.all(np.linalg.norm(r, axis=1) <= tol * bnorm):
            break
        ap = apply(p)
        den = np.sum(p * ap, axis=1)
        alpha = np.divide(rz, den, out=np.zeros_like(rz), where=den > 0)
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        z = r / diag
        rz_new = np.sum(r * z, axis=1)
        beta = np.divide(rz_new, rz, out=np.zeros_like(rz), where=rz > 0)
        p = z + beta[:, None] * p
        rz = rz_new
    return x * m


_EXACT_FLOPS = 5e8  # direct per-row solves while the sum of |S|³ stays below this, else conjugate gradients
CG_FLOPS = 4e11  # multiply-adds one conjugate-gradient solve may spend (a few seconds on one core)
CG_MIN_ITER = 10
