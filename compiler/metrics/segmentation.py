"""Dense per-pixel class maps (segmenters, text-region maps): mean IoU of the class map against fp32's.

Recognised: a float output whose sample is [C, H, W] with H, W >= MIN_SIDE, holding per-pixel class
scores: produced by Softmax, LogSoftmax or Sigmoid, or as large as an input's last two axes (dense
prediction at input resolution). C >= 2 gives the argmax class; C == 1 (a probability map, e.g. a
DBNet text detector) gives foreground at THRESHOLD. IoU is pooled over the whole eval set per class
and averaged over the classes present in either map, so a small class that vanishes counts fully.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeops.compiler.metrics import ModelInfo, Outputs, first_output

MIN_SIDE = 8
THRESHOLD = 0.5
MAX_CLASSES = 1024


@dataclass(frozen=True)
class Segmentation:
    output: str
    classes: int
    reason: str
    name: str = "segmentation"

    def _map(self, array: np.ndarray) -> np.ndarray:
        maps = array.reshape(len(array), self.classes, *array.shape[-2:])
        return (maps[:, 0] >= THRESHOLD).astype(np.int64) if self.classes == 1 else maps.argmax(1)

    def score(self, reference: Outputs, candidate: Outputs, data: dict[str, np.ndarray]) -> float:
        ref, cand = self._map(reference[self.output]).ravel(), self._map(candidate[self.output]).ravel()
        n = max(self.classes, 2)
        confusion = np.bincount(ref * n + cand, minlength=n * n).reshape(n, n)
        inter = np.diag(confusion)
        union = confusion.sum(0) + confusion.sum(1) - inter
        present = union > 0
        return float(np.mean(inter[present] / union[present])) if present.any() else 1.0


def _spatial(shape: tuple) -> tuple | None:
    dims = tuple(shape[-2:])
    return dims if len(shape) >= 4 and all(isinstance(d, int) for d in dims) else None


def _recognise(name: str, array: np.ndarray, info: ModelInfo, checked: bool) -> Segmentation | None:
    shape = array.shape[1:]
    while len(shape) > 3 and shape[0] == 1:  # samples run one at a time and stacked: [1, C, H, W] each
        shape = shape[1:]
    if len(shape) != 3 or min(shape[-2:]) < MIN_SIDE or not 1 <= shape[0] <= MAX_CLASSES:
        return None
    classes, side = shape[0], tuple(shape[-2:])
    producer = info.producers.get(name)
    scored = producer in ("Softmax", "LogSoftmax", "Sigmoid")
    full = side in {_spatial(s) for s in info.input_shapes}
    if checked and not (scored or full):
        return None
    if classes == 1 and not (producer == "Sigmoid" or (array.min() >= 0 and array.max() <= 1)):
        return None
    why = f"from {producer}" if scored else "as large as the input"
    kind = "a probability map" if classes == 1 else f"scores of {classes} classes"
    return Segmentation(name, classes, f"output {name} {list(shape)} holds {kind} per pixel ({why})")


def recognise(outputs: Outputs, info: ModelInfo) -> Segmentation | None:
    return first_output(outputs, lambda name, array: _recognise(name, array, info, True))


def forced(outputs: Outputs, info: ModelInfo) -> Segmentation | None:
    return first_output(outputs, lambda name, array: _recognise(name, array, info, False))
