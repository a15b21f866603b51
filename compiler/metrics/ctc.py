"""CTC and other per-step sequence heads: the share of samples whose greedy-decoded sequence equals fp32's.

Recognised: a float output whose sample is [T, C] (size-1 axes aside) with T >= 4 steps and C >= 3
classes, holding a distribution per step: produced by Softmax or LogSoftmax, or rows summing to 1
(probabilities) or log-summing to 0 (log-probabilities). Greedy decoding takes the best class per
step, collapses repeats and drops the blank. The blank is the class fp32 picks most often over all
steps (CTC outputs are mostly blank), which finds index 0 (PaddleOCR, torch's CTCLoss default) and
the last index (TensorFlow) alike. A raw cosine misses what matters here: one step flipping between
two characters changes the string while barely moving the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeops.compiler.metrics import ModelInfo, Outputs, first_output, sample_shape

MIN_STEPS = 4
MIN_CLASSES = 3


def greedy_decode(best: np.ndarray, blank: int) -> tuple[int, ...]:
    """Best class per step -> label sequence: repeats collapsed, blanks dropped."""
    if not len(best):
        return ()
    kept = best[np.concatenate([[True], best[1:] != best[:-1]])]
    return tuple(int(c) for c in kept if c != blank)


@dataclass(frozen=True)
class CTC:
    output: str
    blank: int
    reason: str
    name: str = "ctc"

    def _decoded(self, outputs: Outputs) -> list[tuple[int, ...]]:
        array = outputs[self.output]
        steps = array.reshape(len(array), *sample_shape(array)).argmax(-1)
        return [greedy_decode(row, self.blank) for row in steps]

    def score(self, reference: Outputs, candidate: Outputs, data: dict[str, np.ndarray]) -> float:
        return float(np.mean([a == b for a, b in zip(self._decoded(reference), self._decoded(candidate))]))


def _distribution(array: np.ndarray, producer: str | None) -> bool:
    if producer in ("Softmax", "LogSoftmax"):
        return True
    sample = array[: min(len(array), 16)].astype(np.float64)
    if not np.isfinite(sample).all():
        return False
    if sample.min() >= 0 and np.allclose(sample.sum(-1), 1, atol=1e-3):
        return True
    return sample.max() <= 0 and np.allclose(np.log(np.exp(sample).sum(-1)), 0, atol=1e-3)


def _recognise(name: str, array: np.ndarray, info: ModelInfo, checked: bool) -> CTC | None:
    shape = sample_shape(array)
    if len(shape) != 2 or shape[0] < MIN_STEPS or shape[1] < MIN_CLASSES:
        return None
    steps = array.reshape(len(array), *shape)
    if checked and not _distribution(steps, info.producers.get(name)):
        return None
    blank = int(np.bincount(steps.argmax(-1).ravel(), minlength=shape[1]).argmax())
    return CTC(name, blank, f"output {name} {list(shape)} holds a distribution over {shape[1]} classes at each of "
                            f"{shape[0]} steps; blank = class {blank}, the one fp32 picks most")


def recognise(outputs: Outputs, info: ModelInfo) -> CTC | None:
    return first_output(outputs, lambda name, array: _recognise(name, array, info, True))


def forced(outputs: Outputs, info: ModelInfo) -> CTC | None:
    return first_output(outputs, lambda name, array: _recognise(name, array, info, False))
