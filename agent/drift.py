"""The device's drift monitor: window counts of every input and output feature on the bundle's
reference bins, tested against the reference when a window fills (edgeops.protocol.drift does the math).

What `observe` takes: arrays with the sample axis first, except inputs named in `whole_inputs`, which
are one sample by themselves (the model takes them whole); a run with whole inputs is one sample, and
its outputs are that sample's outputs, without a sample axis (the compiler stacked them the same way
when it built the reference). Inputs and outputs the reference does not list are ignored.

Record body of a completed window (JSON; `kind` is the telemetry record kind):
    {"kind": "drift",
     "window": int,                   # index of the window since this monitor started (0, 1, ...)
     "samples": int,                  # samples in the window (= `window`)
     "reference": str,                # protocol.drift.reference_digest of the bundle's reference
     "counts": {key: [int]},          # this window's counts per reference bin
     "reference_counts": {key: [int]},# the reference's counts on the same bins
     "p": {key: float}, "p_adj": {key: float}, "psi": {key: float},
     "drifted": [key], "alarm": bool}
Keys are `input/NAME/I` and `output/NAME/I` (feature I of the reduction), `output/NAME/class` and
`output/NAME/confidence` for the classifier output. Every window carries the reference counts, so the
fleet can merge and test windows without the bundle, and a record lost from a full outbox costs
nothing but its own window. Captured samples travel as `sample_record` bodies:
    {"kind": "sample", "npz": base64 .npz, one array per input holding one sample}

Invariants:
- fixed memory per model: one int64 count vector (features x bins of every input and output),
  reset when its window closes, plus a reservoir of at most `capture` input samples;
- a window holds exactly `window` samples (their finite feature values, binned): a batch that
  crosses a window's end is split there, so the windows' counts add up to the whole stream's;
- vectorized per batch: one comparison against all edges per input or output, one bincount per
  window segment; the only per-sample Python work is storing the (few) samples the reservoir keeps;
- numpy, math and edgeops.protocol only: never scipy, the compiler or the fleet.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edgeops.protocol.drift import (
    ALPHA, PSI_FLOOR, REFERENCE_VERSIONS, bin_index, encode_sample, feature_key, features, padded,
    reference_counts, reference_digest, window_test,
)
from edgeops.protocol.errors import EdgeopsError

Sample = dict[str, np.ndarray]


def _classifier_scores(samples: np.ndarray) -> np.ndarray:
    """The first score vector of each sample, as compiler/reference.py `_classifier_entry` takes it."""
    return samples.reshape(len(samples), -1, samples.shape[-1])[:, 0].astype(np.float64)


class _Features:
    """The F features of one input or output: how a batch of its samples is binned, and where their
    counts live in the monitor's count vector (F rows of `width` from `offset`; row f uses its first
    sizes[f] entries, the rest stay zero)."""

    def __init__(self, side: str, name: str, labels: list[int | str], sizes: list[int],
                 binner: Callable[[np.ndarray], np.ndarray], offset: int):
        self.side, self.name = side, name
        self.keys = [feature_key(side, name, label) for label in labels]
        self.sizes = sizes
        self.width = max(sizes)
        self.offset, self.end = offset, offset + len(labels) * self.width
        self._binner = binner  # samples -> (n, F) bin per feature, -1 to drop
        self._bases = offset + np.arange(len(labels)) * self.width

    def flat_bins(self, samples: np.ndarray) -> np.ndarray:
        """(n, F) indices into the count vector, -1 for values the reference would have dropped."""
        bins = self._binner(samples)
        return np.where(bins >= 0, bins + self._bases, -1)

    def counts(self, vector: np.ndarray) -> dict[str, list[int]]:
        rows = vector[self.offset:self.end].reshape(len(self.keys), self.width)
        return {key: row[:size].tolist() for key, row, size in zip(self.keys, rows, self.sizes)}


def _tensor_features(side: str, entry: Mapping[str, Any], offset: int) -> list[_Features]:
    edge_lists = [summary["edges"] for summary in entry["features"]]
    edges, reduction, name = padded(edge_lists, np.inf), entry["reduction"], entry["name"]

    def binner(samples: np.ndarray) -> np.ndarray:
        values = features(samples, reduction)
        if values.shape[1] != len(edges):
            raise EdgeopsError(f"{side} {name}: samples give {values.shape[1]} drift features, "
                               f"the reference has {len(edges)}")
        return bin_index(edges, values)

    return [_Features(side, name, list(range(len(edge_lists))), [len(e) + 1 for e in edge_lists], binner, offset)]


def _classifier_features(side: str, entry: Mapping[str, Any], offset: int) -> list[_Features]:
    name, classes = entry["name"], len(entry["classes"])
    edges = padded([entry["confidence"]["edges"]], np.inf)
    predicted = _Features(side, name, ["class"], [classes], lambda s: _classifier_scores(s).argmax(1)[:, None], offset)
    confidence = _Features(side, name, ["confidence"], [edges.shape[1] + 1],
                           lambda s: bin_index(edges, _classifier_scores(s).max(1)[:, None]), predicted.end)
    return [predicted, confidence]


def _layout(reference: Mapping[str, Any]) -> list[_Features]:
    parts: list[_Features] = []
    for side, entries in (("input", reference["inputs"]), ("output", reference["outputs"])):
        for entry in entries:
            build = _classifier_features if entry["reduction"] == "classifier" else _tensor_features
            parts += build(side, entry, parts[-1].end if parts else 0)
    return parts


class DriftMonitor:
    """Streaming drift summaries of one model against its bundle's reference (see the module docstring)."""

    def __init__(self, reference: dict[str, Any], whole_inputs: frozenset[str] = frozenset(), window: int = 500,
                 alpha: float = ALPHA, psi_floor: float = PSI_FLOOR, capture: int = 0, seed: int | None = None):
        if reference.get("version") not in REFERENCE_VERSIONS:
            raise EdgeopsError(f"drift reference version {reference.get('version')!r} is not one this agent reads "
                               f"({', '.join(map(str, REFERENCE_VERSIONS))}); upgrade edgeops on the device")
        if window < 1 or capture < 0 or not 0 < alpha < 1 or psi_floor < 0:
            raise EdgeopsError("drift monitor needs window >= 1, capture >= 0, 0 < alpha < 1 and psi_floor >= 0")
        try:
            self._parts = _layout(reference)
            self._reference_counts = reference_counts(reference)
        except (KeyError, TypeError, ValueError) as exc:
            raise EdgeopsError(f"the bundle's drift reference is malformed ({exc!r})") from None
        self.digest = reference_digest(reference)
        self.whole = frozenset(whole_inputs)
        self.window, self.alpha, self.psi_floor, self.capture = window, alpha, psi_floor, capture
        self._input_names = [entry["name"] for entry in reference["inputs"]]
        self._counts = np.zeros(self._parts[-1].end if self._parts else 0, dtype=np.int64)  # the open window's
        self._filled = 0  # samples in the open window
        self._index = 0  # index of the open window
        self._seen = 0  # samples offered to the reservoir since it was last emptied
        self._reservoir: list[Sample] = []
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    def observe(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
        """Count one run's samples; returns a drift record body for each window this run completed.
        Raises EdgeopsError when the run's arrays do not fit the reference (feature counts, sample counts)."""
        with self._lock:
            columns = []
            for part in self._parts:
                given = inputs if part.side == "input" else outputs
                if part.name in given:
                    columns.append(part.flat_bins(self._with_sample_axis(part.side, part.name, given[part.name])))
            if not columns:
                return []
            if len({len(c) for c in columns}) > 1:
                raise EdgeopsError("drift monitor: the inputs and outputs of one run have different numbers of samples")
            index = np.concatenate(columns, axis=1)
            n = len(index)
            self._keep(inputs, n)
            records = []
            start = 0
            while start < n:
                stop = min(n, start + self.window - self._filled)
                segment = index[start:stop].ravel()
                self._counts += np.bincount(segment[segment >= 0], minlength=len(self._counts))
                self._filled += stop - start
                start = stop
                if self._filled == self.window:
                    records.append(self._close())
            return records

    def captured(self) -> list[Sample]:
        """The reservoir: a uniform sample (Algorithm R) of at most `capture` inputs seen since the
        monitor started or since the last `take_captured`."""
        with self._lock:
            return list(self._reservoir)

    def take_captured(self) -> list[Sample]:
        """The reservoir, emptied: the next one samples only inputs seen after this call, so samples
        sent at every window are a fresh uniform sample each time and none is sent twice."""
        with self._lock:
            taken, self._reservoir, self._seen = self._reservoir, [], 0
            return taken

    def _with_sample_axis(self, side: str, name: str, array: np.ndarray) -> np.ndarray:
        array = np.asarray(array)
        whole = name in self.whole if side == "input" else bool(self.whole)
        return array[None] if whole else array

    def _one(self, inputs: Mapping[str, np.ndarray], name: str, i: int) -> np.ndarray:
        array = np.asarray(inputs[name])
        return np.array(array if name in self.whole else array[i])

    def _keep(self, inputs: Mapping[str, np.ndarray], n: int) -> None:
        """Algorithm R over this run's n samples: sample t (0-based) fills slot t while the reservoir is
        short, then replaces slot j ~ U{0..t} when j < capture (j = floor(u * (t + 1)), u ~ U[0, 1))."""
        if not self.capture:
            return
        positions = np.arange(self._seen, self._seen + n)
        slots = np.where(positions < self.capture, positions,
                         (self._rng.random(n) * (positions + 1)).astype(np.int64))
        for i in np.flatnonzero(slots < self.capture):
            sample = {name: self._one(inputs, name, i) for name in self._input_names if name in inputs}
            if slots[i] < len(self._reservoir):
                self._reservoir[slots[i]] = sample
            else:
                self._reservoir.append(sample)
        self._seen += n

    def _close(self) -> dict[str, Any]:
        counts: dict[str, list[int]] = {}
        for part in self._parts:
            counts.update(part.counts(self._counts))
        self._counts[:] = 0
        result = window_test(self._reference_counts, counts, self.alpha, self.psi_floor)
        body = {"kind": "drift", "window": self._index, "samples": self._filled, "reference": self.digest,
                "counts": counts, "reference_counts": self._reference_counts, **result}
        self._index += 1
        self._filled = 0
        return body


def sample_record(sample: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """A captured sample as a telemetry record body: {"kind": "sample", "npz": base64 .npz}."""
    return {"kind": "sample", "npz": encode_sample(sample)}
