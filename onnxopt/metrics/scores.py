"""Streaming figures per output kind: class agreement, per-vector cosine, next-token perplexity.

Each accumulator takes one batch of the original's and the candidate's output at a time and
keeps running sums only, so memory does not grow with the number of samples; large logits are
reduced one sample at a time.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .kinds import OutputKind


def _to_batch_first(array: np.ndarray, kind: OutputKind) -> np.ndarray:
    """[B, ..., C]: the batch axis first, the class (or vector) axis last."""
    nd = array.ndim
    ca = kind.class_axis % nd
    ba = kind.batch_axis % nd if nd > 2 else 0
    if ba == ca:
        ba = 0 if ca != 0 else 1
    return np.moveaxis(array, [ba, ca], [0, -1])


class ClassAgreement:
    """Top-1 agreement for class scores: per sample (``classes``) or per position (``sequence``,
    ``lm``, with the share of samples whose whole argmax sequence agrees); accuracy against
    per-sample class labels for ``classes``."""

    def __init__(self, kind: OutputKind) -> None:
        self.kind = kind
        self.positions = self.agree = 0
        self.samples = self.sequences_agree = 0
        self.ref_correct = self.cand_correct = self.labelled = 0

    def add(self, ref: np.ndarray, cand: np.ndarray, labels: Optional[np.ndarray]) -> None:
        if ref.ndim < 2 or ref.shape != cand.shape or ref.dtype.kind != "f":
            return
        r, c = _to_batch_first(ref, self.kind), _to_batch_first(cand, self.kind)
        keep = np.isfinite(r).all(axis=-1)  # positions the original scores with NaN/inf say nothing
        top_r, top_c = r.argmax(axis=-1), c.argmax(axis=-1)
        same = top_r == top_c
        self.positions += int(keep.sum())
        self.agree += int((same & keep).sum())
        if r.ndim > 2:
            per_sample = (same | ~keep).reshape(len(r), -1).all(axis=1)
            counted = keep.reshape(len(r), -1).any(axis=1)
            self.samples += int(counted.sum())
            self.sequences_agree += int((per_sample & counted).sum())
        elif labels is not None and np.ndim(labels) == 1 and len(labels) == len(keep):
            self.labelled += int(keep.sum())
            self.ref_correct += int(np.sum((top_r == labels) & keep))
            self.cand_correct += int(np.sum((top_c == labels) & keep))

    def top1(self) -> Optional[float]:
        return self.agree / self.positions if self.positions else None

    def sequence_match(self) -> Optional[float]:
        return self.sequences_agree / self.samples if self.samples else None

    def accuracy(self) -> tuple[Optional[float], Optional[float]]:
        if not self.labelled:
            return None, None
        return self.ref_correct / self.labelled, self.cand_correct / self.labelled


class VectorCosine:
    """Cosine of every vector (the last axis) of an embedding output: mean and worst."""

    def __init__(self, kind: OutputKind) -> None:
        self.kind = kind
        self.count, self.total, self.worst = 0, 0.0, math.inf

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        if ref.ndim < 1 or ref.shape != cand.shape or ref.dtype.kind != "f" or ref.shape[-1] == 0:
            return
        axis = self.kind.class_axis % ref.ndim
        r = np.moveaxis(ref, axis, -1).reshape(-1, ref.shape[axis]).astype(np.float64)
        c = np.moveaxis(cand, axis, -1).reshape(-1, ref.shape[axis]).astype(np.float64)
        keep = np.isfinite(r).all(axis=1) & np.isfinite(c).all(axis=1)
        r, c = r[keep], c[keep]
        if not len(r):
            return
        nr, nc = np.linalg.norm(r, axis=1), np.linalg.norm(c, axis=1)
        both_zero = (nr == 0) & (nc == 0)
        cos = np.where(both_zero, 1.0, (r * c).sum(axis=1) / np.maximum(nr * nc, 1e-300))
        cos = np.where((nr == 0) ^ (nc == 0), 0.0, cos)
        self.count += len(cos)
        self.total += float(cos.sum())
        self.worst = min(self.worst, float(cos.min()))

    def result(self) -> tuple[Optional[float], Optional[float]]:
        if not self.count:
            return None, None
        return self.total / self.count, self.worst


class Perplexity:
    """Next-token perplexity of both models: logits at position t scored against the label at
    t+1 (labels are the text ids, as ``input_ids``), positions masked out by ``attention_mask``
    (its last T columns when a cache holds earlier tokens) or labelled below 0 not counted."""

    def __init__(self, kind: OutputKind) -> None:
        self.kind = kind
        self.nll_ref = self.nll_cand = 0.0
        self.tokens = 0
        self.used = False

    def add(self, ref: np.ndarray, cand: np.ndarray, labels: Optional[np.ndarray],
            mask: Optional[np.ndarray]) -> None:
        if labels is None or ref.ndim != 3 or ref.shape != cand.shape:
            return
        r, c = _to_batch_first(ref, self.kind), _to_batch_first(cand, self.kind)
        labels = np.asarray(labels)
        if labels.shape != r.shape[:2] or labels.dtype.kind not in "iu":
            return
        self.used = True
        if mask is not None and np.ndim(mask) == 2 and mask.shape[0] == len(r) and mask.shape[1] >= r.shape[1]:
            mask = np.asarray(mask)[:, -r.shape[1]:] != 0
        else:
            mask = np.ones(labels.shape, bool)
        vocab = r.shape[-1]
        target = labels[:, 1:]
        valid = mask[:, 1:] & (target >= 0) & (target < vocab)
        for i in range(len(r)):  # one sample at a time: [T, V] in float64, not the whole batch
            pick = np.nonzero(valid[i])[0]
            if not len(pick):
                continue
            tokens = target[i, pick]
            self.nll_ref += _nll(r[i, pick], tokens)
            self.nll_cand += _nll(c[i, pick], tokens)
            self.tokens += len(pick)

    def result(self) -> tuple[Optional[float], Optional[float]]:
        if not self.tokens:
            return None, None
        return _exp(self.nll_ref / self.tokens), _exp(self.nll_cand / self.tokens)


def _nll(logits: np.ndarray, tokens: np.ndarray) -> float:
    x = logits.astype(np.float64)
    top = x.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x - top).sum(axis=1)) + top[:, 0]
    return float((lse - x[np.arange(len(tokens)), tokens]).sum())


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf
