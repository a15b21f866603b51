"""Task metrics: how good a candidate's outputs are for what the model is used for.

One scale for all: higher is better, and the drop that `--max-accuracy-drop` bounds is the fp32
model's score minus the candidate's, on the same eval samples. A metric compares the candidate's
outputs with the fp32 model's (or with `labels`) the way the task uses them: a detector by its
boxes after decoding and NMS, a CTC head by its decoded strings. A generic score over raw tensors
hides collapses (a flattened cosine of a detector's [4+C, anchors] output stayed at 0.99 while it
found none of the objects), so the generic default here is the worst case over channels.

Each metric is a small frozen dataclass in its own module with:
- `name`, `reason` (why it was chosen, for the report), `output` (the output it reads, or None);
- `score(reference, candidate, data) -> float`: outputs as dicts from output name to an array whose
  first axis is the sample; `data` holds the eval file's arrays that are not model inputs.
Each task module has a `recognise(outputs, info)` that returns its metric when the fp32 outputs look
like that task, or None.

`choose` picks one; invariants: the metric is fixed before any candidate is measured, and a forced
generic metric over outputs that look like a known task is always named in a warning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import onnx

from edgeops.protocol.errors import EdgeopsError

Outputs = dict[str, np.ndarray]


class MetricError(EdgeopsError):
    """The metric itself failed (a user's function raised, hung or returned no number): the build stops."""


class BrokenOutputs(Exception):
    """A candidate's outputs are not finite where fp32's are: the candidate is dropped, whatever the metric."""


class Metric(Protocol):
    name: str
    reason: str
    output: str | None

    def score(self, reference: Outputs, candidate: Outputs, data: dict[str, np.ndarray]) -> float: ...


@dataclass(frozen=True)
class ModelInfo:
    """What recognisers may look at besides the outputs' values: producing ops and input shapes."""

    producers: dict[str, str]  # output name -> op type of the node that produces it
    input_shapes: list[tuple]  # declared shapes of the runtime inputs (ints, names or None)
    labels: np.ndarray | None = None  # the eval data's class indices, if it has them

    @property
    def has_labels(self) -> bool:
        return self.labels is not None

    @classmethod
    def of(cls, model: onnx.ModelProto, input_shapes: list[tuple], labels: np.ndarray | None) -> "ModelInfo":
        producers = {out: node.op_type for node in model.graph.node for out in node.output}
        return cls(producers, input_shapes, labels)


def floats(outputs: Outputs) -> dict[str, np.ndarray]:
    return {name: a for name, a in outputs.items() if np.issubdtype(a.dtype, np.floating)}


def first_output(outputs: Outputs, find: Callable[[str, np.ndarray], Metric | None]) -> Metric | None:
    """The metric `find` makes of the first float output it recognises."""
    return next((m for name, array in floats(outputs).items() if (m := find(name, array)) is not None), None)


def sample_shape(array: np.ndarray) -> tuple[int, ...]:
    """A sample's shape without size-1 axes (a batch of one stacked, a [T, 1, C] sequence)."""
    return tuple(d for d in array.shape[1:] if d != 1)


from edgeops.compiler.metrics import classification, ctc, detection, embedding, segmentation, worst_channel  # noqa: E402
from edgeops.compiler.metrics.user import UserMetric, is_user_metric  # noqa: E402

# Recognised in this order: a detector's "scores" or a CTC head's softmax would pass for a classifier.
RECOGNISERS = (detection.recognise, ctc.recognise, segmentation.recognise, classification.recognise, embedding.recognise)
BUILT_IN = ("accuracy", "top1", "detection", "ctc", "segmentation", "cosine", "worst-channel")
GENERIC = ("cosine", "worst-channel")


def _recognised(outputs: Outputs, info: ModelInfo) -> Metric | None:
    for recognise in RECOGNISERS:
        found = recognise(outputs, info)
        if found is not None:
            return found
    return None


def _forced(name: str, outputs: Outputs, info: ModelInfo, found: Metric | None) -> Metric:
    if name == "accuracy" and not info.has_labels:
        raise EdgeopsError("--metric accuracy needs `labels` (class indices) in the eval data; "
                           "add them, or use --metric top1 to compare with the fp32 model")
    if name == "worst-channel":
        return worst_channel.WorstChannel(reason="asked for with --metric")
    if found is not None and found.name == name:
        return found
    make = {"accuracy": classification.forced_accuracy, "top1": classification.forced_top1,
            "detection": detection.forced, "ctc": ctc.forced, "segmentation": segmentation.forced,
            "cosine": embedding.forced}[name]
    metric = make(outputs, info)
    if metric is None:
        raise EdgeopsError(f"--metric {name}: no model output looks like what it measures "
                           f"({', '.join(f'{k} {list(v.shape[1:])}' for k, v in outputs.items())}); "
                           "pick another, or pass your own as --metric FILE.py:FUNCTION")
    return metric


def parse(spec: str | None) -> str | Metric | None:
    """--metric as written: None, a built-in metric's name, or the user's function, loaded. Checked
    before any slow work, so a typo costs no model optimisation."""
    if not spec:
        return None
    if is_user_metric(spec):
        return UserMetric.load(spec)
    if spec not in BUILT_IN:
        raise EdgeopsError(f"--metric {spec!r} is neither a built-in metric ({', '.join(BUILT_IN)}) "
                           "nor a file and function written as PATH.py:FUNCTION")
    return spec


def choose(outputs: Outputs, info: ModelInfo, forced: str | Metric | None) -> tuple[Metric, list[str]]:
    """The metric for these fp32 outputs, and the warnings the report must show.

    `forced` is what `parse` made of --metric. Without it: labels and a classifier give accuracy;
    otherwise the first task recognised; otherwise the conservative worst-channel score.
    """
    if isinstance(forced, str):
        forced = parse(forced)
    if forced is not None and not isinstance(forced, str):
        return forced, []
    found = _recognised(outputs, info)
    if found is not None and found.name == "top1" and info.has_labels:
        found = classification.Accuracy(found.output, "eval data has labels, and " + found.reason)
    if forced:
        metric = _forced(forced, outputs, info, found)
        if forced in GENERIC and found is not None and found.name not in GENERIC:
            return metric, [f"the outputs look like a {found.name} task ({found.reason}), but --metric {forced} "
                            f"compares raw tensors, which can miss a collapse of the task; drop --metric to use "
                            f"{found.name}, or pass your own as --metric FILE.py:FUNCTION"]
        return metric, classification.check_labels(metric, outputs, info)
    if found is None and info.has_labels:
        found = classification.forced_accuracy(outputs, info)
    if found is not None:
        return found, classification.check_labels(found, outputs, info)
    metric = worst_channel.WorstChannel(reason="no output looks like a task edgeops knows "
                                               "(classifier, detector, CTC, segmenter, embedding)")
    return metric, ["quality is the generic worst-channel score, not a task metric: no output looks like a task "
                    "edgeops knows; pass your task's metric as --metric FILE.py:FUNCTION (docs/compiler.md)"]


def score(metric: Metric, reference: Outputs, candidate: Outputs, data: dict[str, np.ndarray]) -> float:
    """The metric's score; BrokenOutputs when the candidate's outputs are not finite where fp32's are.

    The arrays are handed over read-only: a metric that edits them in place would otherwise change
    the reference every later candidate is compared with."""
    for name, ref in floats(reference).items():
        if name in candidate and not np.isfinite(candidate[name][np.isfinite(ref)]).all():
            raise BrokenOutputs(f"output {name} has NaN or Inf where fp32's is finite")
    return metric.score(_read_only(reference), _read_only(candidate), _read_only(data))


def _read_only(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    views = {name: array.view() for name, array in arrays.items()}
    for view in views.values():
        view.flags.writeable = False
    return views
