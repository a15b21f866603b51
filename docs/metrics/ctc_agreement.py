"""Sequence agreement of a candidate CTC recogniser (OCR, speech) with the fp32 model.

What it measures: both models' per-step class scores [N, T, C] (softmax or logits) are decoded
greedily, as PaddleOCR / rapidocr and most CTC deployments do: argmax per time step, collapse repeated
classes, drop the blank (class 0). The score is the share of samples whose decoded sequences are
identical, so one wrong, missing or extra character in a line counts that line as lost. A flattened
cosine of the [N, T, C] tensor stays near 1 while argmaxes flip at a few steps; this does not.
No `labels` are needed: fp32's own reading is the reference. For [N, C, T] outputs set TIME_AXIS = 2.

Use it with:

    edgeops build model.onnx --metric docs/metrics/ctc_agreement.py:sequence_agreement ...

Only numpy is needed.
"""

from __future__ import annotations

import numpy as np

BLANK = 0  # PaddleOCR, rapidocr, wav2vec2 (pad) and most CTC heads put the blank first
TIME_AXIS = 1  # [N, T, C]
OUTPUT: str | None = None  # name of the CTC output; None: the only (or first) output


def _pick(outputs: dict[str, np.ndarray]) -> np.ndarray:
    if OUTPUT is not None and OUTPUT in outputs:
        out = np.asarray(outputs[OUTPUT])
    else:
        out = np.asarray(next(iter(outputs.values())))
    if out.ndim != 3:
        raise ValueError(f"expected a CTC output [N, T, C], got {out.shape}")
    return out if TIME_AXIS == 1 else np.moveaxis(out, TIME_AXIS, 1)


def greedy_decode(scores: np.ndarray) -> list[tuple[int, ...]]:
    """[N, T, C] -> per sample the tuple of classes: argmax, repeats collapsed, blanks dropped."""
    best = scores.argmax(axis=2)
    out = []
    for row in best:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != BLANK
        out.append(tuple(int(c) for c in row[keep]))
    return out


def sequence_agreement(fp32: dict[str, np.ndarray], candidate: dict[str, np.ndarray], data: dict) -> float:
    """Share of samples the candidate decodes exactly as fp32 does (higher is better, 1.0 = all)."""
    ref = greedy_decode(_pick(fp32))
    cand = greedy_decode(_pick(candidate))
    if len(ref) != len(cand):
        raise ValueError(f"fp32 has {len(ref)} samples, the candidate {len(cand)}")
    if not ref:
        return 1.0
    return sum(r == c for r, c in zip(ref, cand)) / len(ref)
