"""A real example model for `edgeops demo`: trained here, in seconds, on data bundled with scikit-learn."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeops.protocol.errors import EdgeopsError

SEED = 0


@dataclass(frozen=True)
class ExampleModel:
    """A trained model and the data to calibrate and evaluate it, all as files."""

    name: str
    onnx: Path
    calib: Path
    eval: Path


def split(n: int, calib: float = 0.1, eval: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed-seed disjoint train / calib / eval indices, so accuracy is measured on unseen data."""
    idx = np.random.default_rng(SEED).permutation(n)
    n_cal, n_eval = int(n * calib), int(n * eval)
    return idx[n_cal + n_eval :], idx[:n_cal], idx[n_cal : n_cal + n_eval]


def thumbnails(x: np.ndarray) -> np.ndarray:
    """8x8 digits (N, 64) as 4x4 thumbnails (N, 16): each pixel the sum of a 2x2 block."""
    return x.reshape(-1, 4, 2, 4, 2).sum(axis=(2, 4)).reshape(-1, 16)


def train_digits_mlp(workdir: Path, thumbnail: bool = False) -> ExampleModel:
    """Train an MLP on the 8x8 digits and export it with a dynamic batch axis and plain tensor outputs.

    With `thumbnail`, it is trained on 4x4 thumbnails (16 inputs instead of 64): a smaller model that
    apps sending 8x8 images cannot use, which the demo rolls out to show a health gate at work."""
    try:
        from skl2onnx import to_onnx
        from skl2onnx.common.data_types import FloatTensorType
        from sklearn.datasets import load_digits
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPClassifier
    except ImportError as e:
        raise EdgeopsError(f"the demo needs scikit-learn and skl2onnx ({e.name} is missing): "
                           "pip install 'edgeops[demo]'") from e
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    x, y = load_digits(return_X_y=True)
    x, y = x.astype(np.float32), y.astype(np.int64)
    if thumbnail:
        x = thumbnails(x)
    train, calib, evals = split(len(x))
    clf = MLPClassifier(hidden_layer_sizes=(256, 128), max_iter=300, random_state=SEED)
    scale = 64.0 if thumbnail else 16.0
    with warnings.catch_warnings():  # 300 iterations are enough here; sklearn would warn it has not converged
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x[train] / scale, y[train])
    # Fold the input scaling into the first layer, so the model takes raw pixel values.
    clf.coefs_[0] = clf.coefs_[0] / scale
    onx = to_onnx(clf, initial_types=[("pixels", FloatTensorType([None, x.shape[1]]))],
                  options={id(clf): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    for v in [*onx.graph.input, *onx.graph.output]:  # name the batch dim; skl2onnx leaves it anonymous
        v.type.tensor_type.shape.dim[0].dim_param = "N"
    out = ExampleModel("digits-mlp", workdir / "model.onnx", workdir / "calib.npz", workdir / "eval.npz")
    out.onnx.write_bytes(onx.SerializeToString())
    np.savez(out.calib, pixels=x[calib])
    np.savez(out.eval, pixels=x[evals], labels=y[evals])
    return out
