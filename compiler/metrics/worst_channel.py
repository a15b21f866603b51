"""The conservative default for outputs of no known task: the worst channel's error, scaled by its range.

Each float output is compared per channel (axis 1) and, for outputs of three or more axes, per
trailing feature too; each group's RMS error against fp32 is divided by that group's fp32 range
(max - min over the eval set), and the score is 1 minus the worst such relative error (at least 0).
So a channel of small values that collapses cannot hide behind a channel of large ones, which is how
a flattened cosine of a detector's [4 box + C class, anchors] output stayed at 0.99 while every class
score went to zero. Integer outputs count by the share of equal values. fp32 scores 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeops.compiler.metrics import Outputs


def _worst_relative_error(ref: np.ndarray, cand: np.ndarray, axis: int) -> float:
    r = np.moveaxis(ref.astype(np.float64), axis, 0).reshape(ref.shape[axis], -1)
    c = np.moveaxis(cand.astype(np.float64), axis, 0).reshape(ref.shape[axis], -1)
    finite = np.isfinite(r)
    r, c = np.where(finite, r, 0), np.where(finite, c, 0)
    span = r.max(1) - r.min(1)
    # A constant channel (padding, a dead unit) has no range of its own: judge it against its value,
    # or a thousandth of the whole output's range, so a drift of 1e-6 on zeros is no collapse.
    floor = max(float(r.max() - r.min()) * 1e-3, 1e-12)
    scale = np.where(span > 0, span, np.maximum(np.abs(r).max(1), floor))
    rms = np.sqrt(np.mean((c - r) ** 2, axis=1))
    return float(np.max(np.where(rms == 0, 0, rms / scale)))


def output_error(ref: np.ndarray, cand: np.ndarray) -> float:
    """Worst relative error of one output over its channel axis and, where there is one, its last axis."""
    if not np.issubdtype(ref.dtype, np.floating):
        return float(np.mean(ref != cand))
    if ref.ndim < 2:
        return _worst_relative_error(ref[:, None], cand[:, None], 1)
    axes = {1, ref.ndim - 1} if ref.ndim >= 3 else {1}
    return max(_worst_relative_error(ref, cand, axis) for axis in axes)


@dataclass(frozen=True)
class WorstChannel:
    reason: str
    output: str | None = None
    name: str = "worst-channel"

    def score(self, reference: Outputs, candidate: Outputs, data: dict[str, np.ndarray]) -> float:
        errors = [output_error(ref, candidate[name]) for name, ref in reference.items() if ref.size]
        return max(0.0, 1.0 - max(errors, default=0.0))
