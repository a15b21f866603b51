"""Calibration and evaluation data: `.npz` files keyed by input name, the first axis indexing samples.

For each input, a sample either lacks the batch axis (its array has one dimension fewer than the
model input: samples stack along the model's first axis) or is a whole model input by itself (same
rank, e.g. a recurrent state whose batch axis is not the first, or a scalar). When every input
stacks, the model runs as many samples at once as its batch axis allows; when any input is whole,
it runs one sample at a time, the stacking inputs getting a batch of one. `labels` (class indices)
may ride along, and so may any other array that is not a model input (letterbox offsets, say): those
are `extras`, handed to the task metric, their first axis aligned with the samples.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from edgeops.compiler.model import TensorSpec
from edgeops.protocol.errors import EdgeopsError

LABELS = "labels"
MAX_BATCH = 64


@dataclass(frozen=True)
class Dataset:
    """Validated arrays for every model input, plus optional labels, and how to batch them."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None
    batch: int | None  # the model's fixed batch size; None when its batch axis is dynamic
    whole: frozenset[str]  # inputs whose samples are whole model inputs (no batch axis to stack on)
    digest: str
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # arrays that are not inputs, `labels` included

    @property
    def stacked(self) -> bool:
        """True when samples run many at a time, stacked on the first axis."""
        return not self.whole

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def batches(self, limit: int | None = None, uniform: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Feeds for the model, covering the first `limit` samples.

        `uniform` drops a trailing partial batch (when a full one exists): onnxruntime's histogram
        calibrators cannot merge batches of different sizes.
        """
        count = self.usable() if limit is None else min(limit, self.usable())
        if not self.stacked:
            for i in range(count):
                yield {k: np.asarray(v[i]) if k in self.whole else v[i : i + 1] for k, v in self.arrays.items()}
            return
        step = self.batch or MAX_BATCH
        if uniform and count >= step:
            count -= count % step
        for start in range(0, count, step):
            yield {k: v[start : min(start + step, count)] for k, v in self.arrays.items()}

    def take(self, indices: np.ndarray | slice) -> "Dataset":
        labels = None if self.labels is None else self.labels[indices]
        arrays = {k: v[indices] for k, v in self.arrays.items()}
        extras = {k: v[indices] for k, v in self.extras.items()}
        return Dataset(arrays, labels, self.batch, self.whole, self.digest, extras)

    def usable(self) -> int:
        """Samples the batches cover (a fixed batch size may leave a remainder out)."""
        step = self.batch if self.stacked and self.batch else 1
        return len(self) // step * step


def _fits(sample_shape: tuple[int, ...], model_shape: tuple, offset: int) -> bool:
    expected = model_shape[offset:]
    if len(sample_shape) != len(expected):
        return False
    return all(not isinstance(m, int) or m == s for s, m in zip(sample_shape, expected))


def load_npz(path: str | Path, inputs: list[TensorSpec], role: str) -> Dataset:
    """Read and validate a data file against the model's inputs; raise EdgeopsError on any mismatch."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise EdgeopsError(f"{role} data {path} does not exist") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise EdgeopsError(f"{role} data {path} is not a readable .npz file ({exc})") from None
    names = [spec.name for spec in inputs]
    for missing in [n for n in names if n not in arrays]:
        raise EdgeopsError(f"{role} data {path} has no array '{missing}' (model inputs: {', '.join(names)})")
    counts = {len(a) if a.ndim else -1 for a in arrays.values()}
    if len(counts) != 1 or -1 in counts or 0 in counts:
        sizes = ", ".join(f"'{k}' {len(a) if a.ndim else 'a scalar'}" for k, a in arrays.items())
        raise EdgeopsError(f"{role} data {path}: every array, model input or not, needs the same number of "
                           f"samples on its first axis ({sizes})")
    extras = {k: arrays.pop(k) for k in list(arrays) if k not in names}
    labels = extras.get(LABELS)
    whole = set()
    for spec in inputs:
        array = arrays[spec.name]
        if array.dtype.name != spec.dtype:
            raise EdgeopsError(
                f"{role} data {path}: '{spec.name}' is {array.dtype.name}, the model wants {spec.dtype} "
                f"(convert with .astype(np.{spec.dtype}))"
            )
        sample = array.shape[1:]
        if spec.shape and _fits(sample, spec.shape, 1):
            continue
        if _fits(sample, spec.shape, 0):
            whole.add(spec.name)
            continue
        raise EdgeopsError(
            f"{role} data {path}: '{spec.name}' samples have shape {list(sample)}, "
            f"which does not fit the model input shape {list(spec.shape)}"
        )
    if labels is not None and (labels.ndim != 1 or len(labels) != counts.pop() or labels.dtype.kind not in "iu"):
        raise EdgeopsError(f"{role} data {path}: 'labels' must be integer class indices, one per sample")
    batch = None if whole else _batch_size(inputs)
    if batch and len(next(iter(arrays.values()))) < batch:
        raise EdgeopsError(f"{role} data {path} has fewer samples than the model's fixed batch size {batch}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Dataset(arrays, labels, batch, frozenset(whole), digest, extras)


def _batch_size(inputs: list[TensorSpec]) -> int | None:
    fixed = {spec.shape[0] for spec in inputs if spec.shape and isinstance(spec.shape[0], int)}
    if len(fixed) > 1:
        raise EdgeopsError(f"model inputs disagree on the batch size: {sorted(fixed)}")
    return fixed.pop() if fixed else None


def split(data: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Hold out `fraction` of the samples (for eval when no eval data is given), reproducibly."""
    order = np.random.default_rng(seed).permutation(len(data))
    cut = max(1, int(round(len(data) * (1 - fraction))))
    return data.take(np.sort(order[:cut])), data.take(np.sort(order[cut:]))
