"""Mean IoU of a candidate segmentation model's label map against the fp32 model's label map.

What it measures: per pixel, the class is the argmax over the channel axis of the [N, C, H, W] output
(for C == 1, a binary mask: score >= 0.5; pass probabilities, or set BINARY_THRESHOLD = 0.0 for
logits). For each class, intersection and union of the candidate's and fp32's pixels of that class are
pooled over the whole data set; the score is the mean IoU over the classes present in either map (for a
binary mask: over background and foreground). 1.0 when the maps agree everywhere. Boundary pixels and
small classes, which a flattened cosine of the logits barely sees, weigh as much as large areas here.

The output is the one named in OUTPUT if present, otherwise the only (or first) output; set
CHANNEL_AXIS = 3 for [N, H, W, C] (NHWC) exports.

Use it with:

    edgeops build model.onnx --metric docs/metrics/segmentation_miou.py:miou ...

Only numpy is needed.
"""

from __future__ import annotations

import numpy as np

BINARY_THRESHOLD = 0.5
CHANNEL_AXIS = 1  # [N, C, H, W]
OUTPUT: str | None = None


def _label_map(outputs: dict[str, np.ndarray]) -> tuple[np.ndarray, int]:
    if OUTPUT is not None and OUTPUT in outputs:
        out = np.asarray(outputs[OUTPUT])
    else:
        out = np.asarray(next(iter(outputs.values())))
    if out.ndim != 4:
        raise ValueError(f"expected a segmentation output [N, C, H, W], got {out.shape}")
    out = np.moveaxis(out, CHANNEL_AXIS, 1)
    if out.shape[1] == 1:
        return (out[:, 0] >= BINARY_THRESHOLD).astype(np.int64), 2
    return out.argmax(axis=1), out.shape[1]


def miou(fp32: dict[str, np.ndarray], candidate: dict[str, np.ndarray], data: dict) -> float:
    """Dataset-pooled mean IoU over classes of the candidate's label map vs fp32's (1.0 = identical)."""
    ref, n_classes = _label_map(fp32)
    cand, n_cand = _label_map(candidate)
    if ref.shape != cand.shape or n_classes != n_cand:
        raise ValueError(f"fp32 map {ref.shape} x {n_classes} and candidate map {cand.shape} x {n_cand} differ")
    # Confusion matrix in one bincount: rows fp32 class, columns candidate class.
    conf = np.bincount((ref.ravel() * n_classes + cand.ravel()), minlength=n_classes * n_classes)
    conf = conf.reshape(n_classes, n_classes).astype(np.float64)
    inter = np.diag(conf)
    union = conf.sum(axis=0) + conf.sum(axis=1) - inter
    present = union > 0
    if not present.any():
        return 1.0
    return float((inter[present] / union[present]).mean())
