"""How good a compiled model is, on one scale: higher is better, the fp32 model scores `fp32`.

- `accuracy`: eval data carries `labels`; top-1 accuracy of the classifier output.
- `top1`: no labels, a classifier; the share of samples whose top class matches the fp32 model.
- `cosine`: no labels, any other model; mean cosine similarity to the fp32 outputs.

The drop (fp32 minus compiled) is what `--max-accuracy-drop` bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from edgeops.compiler.model import TensorSpec

METRICS = ("accuracy", "top1", "cosine")
CLASSIFIER_HINTS = ("logit", "prob", "class", "score", "softmax", "label")


@dataclass(frozen=True)
class Metric:
    name: str
    output: int  # which output the class scores are in (accuracy/top1); unused for cosine


def classifier_output(model: onnx.ModelProto, outputs: list[TensorSpec], arrays: list[np.ndarray]) -> int | None:
    """Index of the output holding class scores, or None when the model does not look like a classifier.

    Shapes come from real outputs (`arrays`), since exporters often leave output shapes undeclared.
    """
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    has_label = any(np.issubdtype(a.dtype, np.integer) for a in arrays)
    for index, (spec, array) in enumerate(zip(outputs, arrays)):
        if not np.issubdtype(array.dtype, np.floating) or array.ndim < 2 or array.shape[-1] < 2:
            continue
        named = any(hint in spec.name.lower() for hint in CLASSIFIER_HINTS)
        if named or has_label or producers.get(spec.name) in ("Softmax", "LogSoftmax"):
            return index
    return None


def choose_metric(
    model: onnx.ModelProto, outputs: list[TensorSpec], arrays: list[np.ndarray], has_labels: bool, forced: str | None
) -> Metric:
    """Accuracy with labels, top-1 agreement for classifiers, cosine otherwise; `forced` overrides."""
    index = classifier_output(model, outputs, arrays)
    if index is None and (has_labels or forced in ("accuracy", "top1")):
        # labels say it is a classifier even if nothing else does: the first float output with classes
        index = next((i for i, a in enumerate(arrays) if np.issubdtype(a.dtype, np.floating) and a.shape[-1] > 1), None)
    name = forced or ("accuracy" if has_labels and index is not None else "top1" if index is not None else "cosine")
    return Metric(name, index or 0)


def _top1(scores: np.ndarray) -> np.ndarray:
    return np.asarray(scores).reshape(len(scores), -1, scores.shape[-1]).argmax(-1)[:, 0]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    if a.shape[1] < 8:  # a scalar or tiny output per sample: compare across samples instead
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = norms == 0
    cos = np.where(both_zero, 1.0, (a * b).sum(1) / np.where(both_zero, 1, norms))
    return float(np.mean(cos))


def score(metric: Metric, reference: list[np.ndarray], outputs: list[np.ndarray], labels: np.ndarray | None) -> float:
    """Quality of `outputs`, against labels or against the fp32 `reference` outputs."""
    if metric.name == "accuracy":
        return float(np.mean(_top1(outputs[metric.output]) == labels[: len(outputs[metric.output])]))
    if metric.name == "top1":
        return float(np.mean(_top1(outputs[metric.output]) == _top1(reference[metric.output])))
    floats = [i for i, r in enumerate(reference) if np.issubdtype(r.dtype, np.floating)]
    return float(np.mean([_cosine(reference[i], outputs[i]) for i in floats])) if floats else 1.0
