"""Detection F1 of a candidate YOLOv8-style detector against the fp32 model's own detections.

What it measures: both models' raw outputs are decoded the way Ultralytics YOLOv8 exports are decoded
(no objectness; per-anchor class scores; boxes as centre x, centre y, width, height), kept above a
confidence of 0.25, then thinned with class-wise non-maximum suppression at IoU 0.45. The fp32 model's
detections are taken as ground truth; each candidate detection, best score first, is matched to the
unmatched fp32 detection of the same class with the highest IoU, if that IoU is at least 0.5. True
positives, false positives and misses are pooled over all samples and the F1 is returned (1.0 when
neither model finds anything anywhere). It catches what an output-cosine misses: a few boxes moved or
scores pushed under the threshold change the F1 a lot and the flattened tensor hardly at all.

Output layout: [N, 4 + C, A] (YOLOv8 / v11 ONNX export, e.g. nudenet's 320n.onnx: [N, 22, 2100]) or
[N, A, 4 + C]; the class axis is told apart from the anchor axis by size (anchors outnumber classes).
The output is the one named in OUTPUT if present, otherwise the only (or first) output.

Use it with:

    edgeops build model.onnx --metric docs/metrics/yolo_f1.py:detection_f1 ...

Only numpy is needed. Constants below can be edited in a copy of this file.
"""

from __future__ import annotations

import numpy as np

CONF = 0.25  # nudenet / Ultralytics default confidence threshold
NMS_IOU = 0.45  # nudenet's and Ultralytics' NMS IoU
MATCH_IOU = 0.5  # a candidate box counts when it overlaps an fp32 box of its class this much
OUTPUT: str | None = None  # name of the detection output; None: the only (or first) output


def _pick(outputs: dict[str, np.ndarray]) -> np.ndarray:
    if OUTPUT is not None and OUTPUT in outputs:
        return np.asarray(outputs[OUTPUT])
    return np.asarray(next(iter(outputs.values())))


def _anchors_last(out: np.ndarray) -> np.ndarray:
    """[N, 4 + C, A] whatever the export's layout (the longer of the two last axes is the anchors)."""
    if out.ndim == 2:
        out = out[None]
    if out.ndim != 3:
        raise ValueError(f"expected a [N, 4 + C, A] or [N, A, 4 + C] detection output, got {out.shape}")
    return out if out.shape[2] >= out.shape[1] else out.transpose(0, 2, 1)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x1, y1, x2, y2 box with many."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def decode(sample: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One sample's [4 + C, A] output -> (boxes x1y1x2y2 [K, 4], scores [K], classes [K]) after NMS."""
    sample = np.asarray(sample, np.float64)
    scores_all = sample[4:]
    cls = scores_all.argmax(axis=0)
    score = scores_all.max(axis=0)
    keep = score >= CONF
    cx, cy, w, h = sample[:4, keep]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    score, cls = score[keep], cls[keep]
    out_b, out_s, out_c = [], [], []
    for c in np.unique(cls):  # class-wise greedy NMS
        idx = np.where(cls == c)[0]
        idx = idx[np.argsort(-score[idx], kind="stable")]
        while len(idx):
            best, idx = idx[0], idx[1:]
            out_b.append(boxes[best])
            out_s.append(score[best])
            out_c.append(c)
            if len(idx):
                idx = idx[_iou(boxes[best], boxes[idx]) < NMS_IOU]
    if not out_b:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64)
    return np.array(out_b), np.array(out_s), np.array(out_c, np.int64)


def match(ref: tuple, cand: tuple) -> tuple[int, int, int]:
    """(true positives, false positives, misses) of candidate detections against reference ones."""
    rb, _, rc = ref
    cb, cs, cc = cand
    used = np.zeros(len(rb), bool)
    tp = 0
    for j in np.argsort(-cs, kind="stable"):
        same = np.where((rc == cc[j]) & ~used)[0]
        if not len(same):
            continue
        ious = _iou(cb[j], rb[same])
        k = int(np.argmax(ious))
        if ious[k] >= MATCH_IOU:
            used[same[k]] = True
            tp += 1
    return tp, len(cb) - tp, len(rb) - tp


def detection_f1(fp32: dict[str, np.ndarray], candidate: dict[str, np.ndarray], data: dict) -> float:
    """Pooled detection F1 of the candidate against fp32 (higher is better, 1.0 = same detections)."""
    ref_out = _anchors_last(_pick(fp32))
    cand_out = _anchors_last(_pick(candidate))
    if ref_out.shape != cand_out.shape:
        raise ValueError(f"fp32 output {ref_out.shape} and candidate output {cand_out.shape} differ")
    tp = fp = fn = 0
    for i in range(len(ref_out)):
        t, p, n = match(decode(ref_out[i]), decode(cand_out[i]))
        tp, fp, fn = tp + t, fp + p, fn + n
    if tp + fp + fn == 0:
        return 1.0
    return 2 * tp / (2 * tp + fp + fn)
