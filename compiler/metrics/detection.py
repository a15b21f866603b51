"""Detectors: F1 of the candidate's detections matched to the fp32 model's, after decoding and NMS.

Recognised heads (all on real fp32 outputs, class scores within [0, 1]):
- YOLO: one output per sample of [4+C, A] (YOLOv8 and later: boxes cx, cy, w, h then C class
  scores, no objectness) or [A, 5+C] (YOLOv5/YOLOX: boxes, objectness, C class scores), with at
  least ANCHORS_PER_FEATURE times more anchors A than features (a 160-pixel YOLOv8 of 80 classes
  has 525 anchors for 84 features; a [frames, pitches] sigmoid map has as many of each);
- box + score pairs: [A, 4] boxes next to [A, C] scores (SSD-style); corner boxes when every
  confident box has x2 >= x1 and y2 >= y1, centre boxes otherwise; softmax scores lose column 0
  (background).

A head is only taken for a detector when fp32 finds at least one object in the eval data: F1 over
no objects is 1 whatever the candidate does, which would hide any collapse.

Decoding keeps scores >= CONFIDENCE, then class-wise NMS at NMS_IOU, at most MAX_DETECTIONS per
sample (Ultralytics' defaults). A candidate detection is a hit when it matches an unmatched fp32
detection of the same class at IoU >= MATCH_IOU (greedily, by score); F1 is pooled over all samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeops.compiler.metrics import ModelInfo, Outputs, floats, sample_shape

CONFIDENCE = 0.25
NMS_IOU = 0.45
MATCH_IOU = 0.5
MAX_DETECTIONS = 300
MIN_ANCHORS = 64
ANCHORS_PER_FEATURE = 4


def _corners(boxes: np.ndarray, centre: bool) -> np.ndarray:
    if not centre:
        return boxes
    cx, cy, w, h = boxes.T
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in `a` [n, 4] with every box in `b` [m, 4], corner format."""
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(br - tl, 0, None), axis=2)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Indices kept by class-wise greedy NMS, best score first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while len(order) and len(keep) < MAX_DETECTIONS:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        overlap = iou(boxes[best : best + 1], boxes[rest])[0]
        order = rest[(overlap <= NMS_IOU) | (classes[rest] != classes[best])]
    return np.asarray(keep, dtype=int)


def matches(ref: tuple[np.ndarray, np.ndarray], cand: tuple[np.ndarray, np.ndarray, np.ndarray]) -> int:
    """Candidate detections that hit an unmatched reference detection of the same class."""
    ref_boxes, ref_classes = ref
    boxes, classes, scores = cand
    if not len(ref_boxes) or not len(boxes):
        return 0
    overlaps = iou(boxes, ref_boxes)
    overlaps[classes[:, None] != ref_classes[None, :]] = 0
    taken = np.zeros(len(ref_boxes), bool)
    hits = 0
    for i in np.argsort(-scores, kind="stable"):
        row = np.where(taken, 0, overlaps[i])
        j = int(row.argmax())
        if row[j] >= MATCH_IOU:
            taken[j] = True
            hits += 1
    return hits


@dataclass(frozen=True)
class Detection:
    """F1 of matched detections against fp32; `layout` says how to read the head (see the module doc)."""

    output: str
    layout: str  # "features-first" [4+C, A], "anchors-first" [A, 5+C], or "pair"
    reason: str
    scores: str | None = None  # the score output of a box + score pair
    centre: bool = True
    background: bool = False
    name: str = "detection"

    def decode(self, outputs: Outputs, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes (corners), classes and scores of sample i after thresholding and NMS."""
        head = outputs[self.output][i].astype(np.float64).reshape(sample_shape(outputs[self.output]))
        if self.layout == "features-first":
            boxes, cls = head[:4].T, head[4:].T
        elif self.layout == "anchors-first":
            boxes, cls = head[:, :4], head[:, 5:] * head[:, 4:5]
        else:
            boxes = head
            cls = outputs[self.scores][i].astype(np.float64).reshape(len(head), -1)
            cls = cls[:, 1:] if self.background else cls
        classes, conf = cls.argmax(1), cls.max(1)
        keep = conf >= CONFIDENCE
        boxes, classes, conf = _corners(boxes[keep], self.centre), classes[keep], conf[keep]
        kept = nms(boxes, conf, classes)
        return boxes[kept], classes[kept], conf[kept]

    def score(self, reference: Outputs, candidate: Outputs, data: dict[str, np.ndarray]) -> float:
        hits = found_ref = found_cand = 0
        for i in range(len(reference[self.output])):
            ref_boxes, ref_classes, _ = self.decode(reference, i)
            cand = self.decode(candidate, i)
            hits += matches((ref_boxes, ref_classes), cand)
            found_ref += len(ref_boxes)
            found_cand += len(cand[0])
        return 1.0 if found_ref + found_cand == 0 else 2 * hits / (found_ref + found_cand)

    def count(self, outputs: Outputs) -> int:
        """Detections over all samples: the report warns when fp32 finds too few to judge by."""
        return sum(len(self.decode(outputs, i)[0]) for i in range(len(outputs[self.output])))


def _probabilities(array: np.ndarray) -> bool:
    finite = array[np.isfinite(array)]
    return finite.size > 0 and finite.min() >= 0 and finite.max() <= 1


def _distribution(head: np.ndarray) -> bool:
    """Rows that sum to 1 are a per-step softmax (a CTC head), not sigmoid class scores."""
    sample = head[: min(len(head), 16)].astype(np.float64)
    return bool(np.allclose(sample.sum(-1), 1, atol=1e-3))


def _yolo(name: str, array: np.ndarray, info: ModelInfo) -> Detection | None:
    shape = sample_shape(array)
    if len(shape) != 2 or max(shape) < MIN_ANCHORS or min(shape) < 5 or max(shape) < ANCHORS_PER_FEATURE * min(shape):
        return None
    head = array.reshape(len(array), *shape)
    if info.producers.get(name) in ("Softmax", "LogSoftmax") or _distribution(head):
        return None
    sizes = head[:, 2:4] if shape[0] < shape[1] else head[:, :, 2:4]
    if np.nanmin(sizes) < 0:  # box widths and heights (or corners) are not negative
        return None
    if shape[0] < shape[1]:  # [4+C, A]
        if _probabilities(head[:, 4:]):
            return Detection(name, "features-first", f"output {name} {list(shape)} reads as a YOLO head: "
                                                     f"4 box values and {shape[0] - 4} class scores for {shape[1]} anchors")
    elif _probabilities(head[:, :, 4:]):  # [A, 5+C]
        return Detection(name, "anchors-first", f"output {name} {list(shape)} reads as a YOLO head: {shape[0]} anchors "
                                                f"of 4 box values, objectness and {shape[1] - 5} class scores")
    return None


def _pair(outputs: Outputs) -> Detection | None:
    arrays = floats(outputs)
    for box_name, boxes in arrays.items():
        shape = sample_shape(boxes)
        if len(shape) != 2 or shape[1] != 4 or shape[0] < MIN_ANCHORS:
            continue
        for score_name, scores in arrays.items():
            s = sample_shape(scores)
            if score_name == box_name or not _probabilities(scores):
                continue
            if s == (shape[0],) or (len(s) == 2 and s[0] == shape[0]):
                per_class = scores.reshape(len(scores), shape[0], -1)
                background = per_class.shape[2] > 1 and np.allclose(per_class.sum(-1), 1, atol=1e-3)
                confident = per_class[..., int(background):].max(-1) >= CONFIDENCE
                b = boxes.reshape(len(boxes), *shape)[confident]
                centre = bool(len(b)) and not ((b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all())
                return Detection(box_name, "pair", f"outputs {box_name} {list(shape)} and {score_name} {list(s)} read as "
                                                   "boxes and their class scores", score_name, centre, background)
    return None


def recognise(outputs: Outputs, info: ModelInfo) -> Detection | None:
    heads = [_yolo(name, array, info) for name, array in floats(outputs).items()] + [_pair(outputs)]
    return next((head for head in heads if head is not None and head.count(outputs) > 0), None)


def forced(outputs: Outputs, info: ModelInfo) -> Detection | None:
    return recognise(outputs, info)
