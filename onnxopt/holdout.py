"""Calibration samples held out of fitting, for an accuracy check that is not judged on its own data.

A lossy pass fits things to its calibration data (activation ranges, SmoothQuant strengths, GPTQ
rounding) and then checks the result on calibration samples. Checked on the very samples it was
fitted to, the result looks better than it is on others: on a sentence embedder, qdq's static
model scored output cosine 0.9912 on its calibration samples and 0.9897 on held-out text, so the
guard stopped returning layers to float one step short of its 0.99 tolerance. :func:`split` cuts
a calibration set into a fitting part and a held-out part (every k-th sample, spread over the
set), the same way on every read, so fitting reads one and the check the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from .batching import leading_axis
from .calibrate import CalibrationSet

MIN_SAMPLES = 32   # below this, both parts would be too small: fit and check on all samples
MAX_HELD = 96      # the most a check reads (passes/qdq/guard.py, Guard.SAMPLES)
SHARE = 3          # one sample in SHARE is held out (at least MIN_HELD, at most MAX_HELD)
MIN_HELD = 16


@dataclass
class Part(CalibrationSet):
    """The samples of a calibration set whose index is in (``held``) or out of the held-out set.

    ``rows``: feeds are cut along their leading axis (a symbolic batch axis), one sample per row;
    otherwise each feed the data gives is one unit (a fixed batch axis)."""

    held_ids: frozenset = frozenset()
    held: bool = False
    rows: bool = True
    held_out: Optional["Part"] = None  # on the fitting part: its held-out complement
    total: int = 0  # samples (feeds, for a fixed batch axis) in the whole set

    def expected_samples(self) -> Optional[int]:
        whole = CalibrationSet.expected_samples(self)
        if not self.rows or whole is None or whole != self.total:
            return None  # not counted in samples: the bar counts without a total
        return len(self.held_ids) if self.held else self.total - len(self.held_ids)

    @property
    def part(self) -> str:
        return "held-out" if self.held else "fit"

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        index = 0
        for feed in CalibrationSet.__iter__(self):
            n = leading_axis(feed) if self.rows else None
            if n is None:
                if (index in self.held_ids) == self.held:
                    yield feed
                index += 1
                continue
            pick = [i for i in range(n) if ((index + i) in self.held_ids) == self.held]
            index += n
            if len(pick) == n:
                yield feed
            elif pick:
                yield {k: np.asarray(v)[pick] for k, v in feed.items()}


def split(data: CalibrationSet, rows: bool) -> Optional[Part]:
    """The fitting part of ``data`` (its ``held_out`` the rest), or None when ``data`` is synthetic,
    already split, or holds fewer than MIN_SAMPLES samples (feeds, for a fixed batch axis)."""
    if data.synthetic or isinstance(data, Part):
        return None
    total = _count(data, rows)
    if total < MIN_SAMPLES:
        return None
    held = min(MAX_HELD, max(MIN_HELD, total // SHARE))
    # evenly spread: sample i is held out where i * held // total steps up
    ids = frozenset(i for i in range(total) if (i + 1) * held // total > i * held // total)
    common = dict(source=data.source, model=data.model, samples=data.samples, batch_size=data.batch_size,
                  dims=dict(data.dims), seed=data.seed, held_ids=ids, rows=rows, total=total)
    fit = Part(**common)
    fit.held_out = Part(**common, held=True)
    return fit


def _count(data: CalibrationSet, rows: bool) -> int:
    if rows:
        known = data.expected_samples()
        if known:
            return int(known)
    return sum((leading_axis(feed) or 1) if rows else 1 for feed in data)

