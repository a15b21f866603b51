"""Embeddings: the mean cosine similarity of each sample's vector to fp32's.

Recognised: a float output of one vector of >= MIN_DIMS values per sample that is named like an
embedding, comes from a normalisation, or has unit-length rows. Cosine is right here because
embeddings are compared by direction; over outputs of mixed scales it is not (worst_channel.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeops.compiler.metrics import ModelInfo, Outputs, floats, sample_shape

MIN_DIMS = 16
HINTS = ("embed", "pool", "feature", "vector", "sentence", "hidden", "encod", "descriptor")


@dataclass(frozen=True)
class Cosine:
    output: str
    reason: str
    name: str = "cosine"

    def score(self, reference: Outputs, candidate: Outputs, data: dict[str, np.ndarray]) -> float:
        a = reference[self.output].reshape(len(reference[self.output]), -1).astype(np.float64)
        b = candidate[self.output].reshape(len(a), -1).astype(np.float64)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        cosine = (a * b).sum(1) / np.where(na * nb > 0, na * nb, 1)
        # both zero: the same vector; one zero: a collapse, not a match
        return float(np.mean(np.where((na == 0) & (nb == 0), 1.0, np.where(na * nb > 0, cosine, 0.0))))


def recognise(outputs: Outputs, info: ModelInfo) -> Cosine | None:
    for name, array in floats(outputs).items():
        shape = sample_shape(array)
        if len(shape) != 1 or shape[0] < MIN_DIMS:
            continue
        rows = array.reshape(len(array), -1).astype(np.float64)
        if any(hint in name.lower() for hint in HINTS):
            return Cosine(name, f"output {name} of {shape[0]} values is named like an embedding")
        if info.producers.get(name) in ("LpNormalization",) or np.allclose(np.linalg.norm(rows, axis=1), 1, atol=1e-3):
            return Cosine(name, f"output {name} of {shape[0]} values has unit-length rows")
    return None


def forced(outputs: Outputs, info: ModelInfo) -> Cosine | None:
    found = recognise(outputs, info)
    if found is not None:
        return found
    name = next(iter(floats(outputs)), None)
    return Cosine(name, "asked for with --metric") if name else None
