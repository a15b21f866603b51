"""Classifiers: top-1 accuracy against `labels`, or top-1 agreement with the fp32 model.

A classifier is a float output of 2+ classes per sample that is produced by Softmax, or named like
class scores, or sits next to an integer label output. Shapes come from real outputs, since
exporters often leave output shapes undeclared.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeops.compiler.metrics import Metric, ModelInfo, Outputs, floats, sample_shape
from edgeops.protocol.errors import EdgeopsError

HINTS = ("logit", "prob", "class", "score", "softmax", "label")


def top1(scores: np.ndarray) -> np.ndarray:
    return np.asarray(scores).reshape(len(scores), -1, scores.shape[-1]).argmax(-1)[:, 0]


@dataclass(frozen=True)
class Top1:
    output: str
    reason: str
    name: str = "top1"

    def score(self, reference: Outputs, candidate: Outputs, data: dict[str, np.ndarray]) -> float:
        return float(np.mean(top1(candidate[self.output]) == top1(reference[self.output])))


@dataclass(frozen=True)
class Accuracy:
    output: str
    reason: str
    name: str = "accuracy"

    def score(self, reference: Outputs, candidate: Outputs, data: dict[str, np.ndarray]) -> float:
        predicted = top1(candidate[self.output])
        return float(np.mean(predicted == data["labels"][: len(predicted)]))


def recognise(outputs: Outputs, info: ModelInfo) -> Top1 | None:
    has_label = any(np.issubdtype(a.dtype, np.integer) for a in outputs.values())
    for name, array in floats(outputs).items():
        if len(sample_shape(array)) != 1 or array.shape[-1] < 2:
            continue
        if info.producers.get(name) in ("Softmax", "LogSoftmax"):
            return Top1(name, f"output {name} of {array.shape[-1]} classes comes from {info.producers[name]}")
        if any(hint in name.lower() for hint in HINTS):
            return Top1(name, f"output {name} of {array.shape[-1]} values is named like class scores")
        if has_label:
            return Top1(name, f"output {name} of {array.shape[-1]} values sits next to an integer label output")
    return None


def _first_scores(outputs: Outputs) -> str | None:
    return next((n for n, a in floats(outputs).items() if a.ndim >= 2 and a.shape[-1] > 1), None)


def forced_top1(outputs: Outputs, info: ModelInfo) -> Top1 | None:
    found = recognise(outputs, info)
    name = found.output if found else _first_scores(outputs)
    return Top1(name, "asked for with --metric") if name else None


def forced_accuracy(outputs: Outputs, info: ModelInfo) -> Accuracy | None:
    if not info.has_labels:
        return None
    found = recognise(outputs, info)
    name = found.output if found else _first_scores(outputs)
    return Accuracy(name, f"eval data has labels; class scores in output {name}") if name else None


def check_labels(metric: Metric, outputs: Outputs, info: ModelInfo) -> list[str]:
    """Refuse labels that are no class of the output; warn when fp32 itself scores at chance.

    Labels shifted by one or out of range make every model score about zero, so no candidate can
    drop and the most aggressive one would be chosen."""
    if metric.name != "accuracy":
        return []
    classes = outputs[metric.output].shape[-1]
    labels = info.labels
    if labels.min() < 0 or labels.max() >= classes:
        raise EdgeopsError(f"eval labels run from {labels.min()} to {labels.max()}, but output {metric.output} has "
                           f"{classes} classes (0 to {classes - 1}); fix the labels (1-based?) or drop them")
    fp32 = metric.score(outputs, outputs, {"labels": labels})
    if fp32 <= 1 / classes:
        return [f"the fp32 model's accuracy on the eval labels is {fp32:.4f}, no better than chance over "
                f"{classes} classes: check the labels match the eval samples, or the drop means nothing"]
    return []
