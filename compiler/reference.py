"""The drift baseline and the self-test, both computed from real data at build time.

Reference summaries reduce every input and output to a few scalar features per sample, then keep,
per feature, bin edges at the reference deciles and the reference counts in those bins. Binned
counts merge exactly (they add up across devices and windows), and a two-sample test on counts over
reference-derived bins holds its false-alarm rate where sketch-based KS tests do not.

Reductions (recorded in the file so the device computes the same features):
- `elements`: a sample with at most MAX_ELEMENT_FEATURES values, each value its own feature;
- `channel_mean`: a sample shaped (C, ...) with C <= MAX_ELEMENT_FEATURES: the mean of each channel;
- `moments`: anything else: the sample's mean and standard deviation.
Classifier outputs are summarized as the predicted class and the top-class confidence.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeops.compiler.data import Dataset
from edgeops.protocol.drift import features

REFERENCE_VERSION = 1
BINS = 10
MAX_ELEMENT_FEATURES = 64
SELFTEST_SAMPLES = 8


def _reduction(sample_shape: tuple[int, ...]) -> str:
    size = int(np.prod(sample_shape)) if sample_shape else 1
    if size <= MAX_ELEMENT_FEATURES:
        return "elements"
    if len(sample_shape) >= 2 and sample_shape[0] <= MAX_ELEMENT_FEATURES:
        return "channel_mean"
    return "moments"


def _summary(values: np.ndarray) -> dict[str, Any]:
    values = values[np.isfinite(values)]
    edges = np.unique(np.quantile(values, np.linspace(0, 1, BINS + 1)[1:-1])) if len(values) else np.array([])
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return {
        "edges": [float(e) for e in edges],
        "counts": [int(c) for c in counts],
        "mean": float(values.mean()) if len(values) else 0.0,
        "std": float(values.std()) if len(values) else 0.0,
        "min": float(values.min()) if len(values) else 0.0,
        "max": float(values.max()) if len(values) else 0.0,
    }


def _tensor_entry(name: str, samples: np.ndarray) -> dict[str, Any]:
    reduction = _reduction(samples.shape[1:])
    feats = features(samples, reduction)
    return {"name": name, "reduction": reduction, "features": [_summary(feats[:, i]) for i in range(feats.shape[1])]}


def _classifier_entry(name: str, scores: np.ndarray) -> dict[str, Any]:
    scores = scores.reshape(len(scores), -1, scores.shape[-1])[:, 0].astype(np.float64)
    classes = np.bincount(scores.argmax(1), minlength=scores.shape[1])
    return {
        "name": name,
        "reduction": "classifier",
        "classes": [int(c) for c in classes],
        "confidence": _summary(scores.max(1)),
    }


def reference_summaries(
    data: Dataset, output_names: list[str], outputs: list[np.ndarray], classifier: int | None
) -> dict[str, Any]:
    """The drift baseline: binned features of every input and output over the reference data."""
    out_entries = []
    for index, (name, values) in enumerate(zip(output_names, outputs)):
        if not np.issubdtype(values.dtype, np.number):
            continue
        out_entries.append(_classifier_entry(name, values) if index == classifier else _tensor_entry(name, values))
    return {
        "version": REFERENCE_VERSION,
        "samples": data.usable(),
        "bins": BINS,
        "inputs": [_tensor_entry(name, array[: data.usable()]) for name, array in data.arrays.items()],
        "outputs": out_entries,
    }


def selftest_arrays(data: Dataset, output_names: list[str], outputs: list[np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Golden inputs and the compiled model's outputs for them, with the tolerance the device must meet.

    The tolerance allows for int8 kernels that round differently on another CPU (ARM vs x86): a few
    quantization steps of the output's range, not bit-exactness.
    """
    count = min(SELFTEST_SAMPLES, data.usable())
    arrays = {f"input/{name}": array[:count] for name, array in data.arrays.items()}
    tolerances = {}
    for name, values in zip(output_names, outputs):
        arrays[f"output/{name}"] = values[:count]
        if np.issubdtype(values.dtype, np.floating):
            span = float(np.ptp(values[:count])) if values.size else 0.0
            tolerances[name] = {"atol": max(1e-4, 0.05 * span), "rtol": 0.0}
        else:
            tolerances[name] = {"match": 0.75}
    return arrays, {
        "file": "selftest.npz",
        "samples": count,
        "batch": data.batch,
        "whole_inputs": sorted(data.whole),
        "tolerance": tolerances,
    }
