"""Real models trained on scikit-learn's bundled data, for compiler tests and benches.

Training costs seconds to a minute, so each model is built once per cache key (this file's source, examples.py's
source and the library versions), written atomically under $EDGEOPS_ZOO_CACHE (default ~/.cache/edgeops-zoo),
memoized per process, and copied into the caller's workdir so tests can't corrupt the cache.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

from edgeops import examples
from edgeops.examples import ExampleModel, split

FILES = ("model.onnx", "calib.npz", "eval.npz")
OPSET = 18  # the torch exporter's native opset: asking for 17 goes through a version converter


@dataclass(frozen=True)
class ZooModel(ExampleModel):
    """An example model plus what the tests compare against."""

    accuracy: float = 0.0  # fp32 eval accuracy in onnxruntime
    params: int = 0  # float weights in the ONNX file


def _key() -> str:
    """Source and library versions: any change retrains."""
    h = hashlib.sha256(Path(__file__).read_bytes() + Path(examples.__file__).read_bytes())
    for dist in ("torch", "scikit-learn", "skl2onnx", "onnx", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            h.update(f"{dist}={metadata.version(dist)};".encode())
    return h.hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("EDGEOPS_ZOO_CACHE") or Path.home() / ".cache" / "edgeops-zoo")


def ort_accuracy(m: ExampleModel) -> float:
    """Argmax of the first [N, C] output against `labels`, in batches of the model's fixed batch size if it has one."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(m.onnx), providers=["CPUExecutionProvider"])
    data = dict(np.load(m.eval))
    labels = data.pop("labels")
    out = next(o.name for o in sess.get_outputs() if len(o.shape) == 2)
    bs = sess.get_inputs()[0].shape[0]
    bs = bs if isinstance(bs, int) else len(labels)
    preds = [sess.run([out], {k: v[i : i + bs] for k, v in data.items()})[0].argmax(1) for i in range(0, len(labels), bs)]
    return float((np.concatenate(preds) == labels).mean())


def onnx_params(path: Path) -> int:
    import onnx

    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer if t.data_type == onnx.TensorProto.FLOAT)


@contextlib.contextmanager
def _locked(path: Path):
    """Cross-process lock, so parallel test runs wait for one build instead of each training on the same cores."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): builds may be duplicated, the atomic rename still keeps the cache sound
        fcntl = None
    with open(path, "a") as f:
        if fcntl:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when f closes
        yield


@functools.cache
def _built(name: str) -> Path:
    """The cache dir of `name`, building it into a temp dir and renaming it into place if missing."""
    final = cache_root() / f"{name}-{_key()}"
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.parent / f".{final.name}.lock"):
        if (final / "meta.json").exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            t0 = time.perf_counter()
            BUILDERS[name](tmp)
            m = ExampleModel(name, *(tmp / f for f in FILES))
            meta = {"accuracy": ort_accuracy(m), "params": onnx_params(m.onnx), "build_s": time.perf_counter() - t0}
            (tmp / "meta.json").write_text(json.dumps(meta))
            try:
                tmp.rename(final)
            except OSError:  # another process won the race; its copy is as good as ours
                if not (final / "meta.json").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _load(name: str, workdir: Path) -> ZooModel:
    src, dst = _built(name), Path(workdir)
    dst.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copyfile(src / f, dst / f)
    meta = json.loads((src / "meta.json").read_text())
    return ZooModel(name, *(dst / f for f in FILES), accuracy=meta["accuracy"], params=meta["params"])


# ---- builders: each writes model.onnx, calib.npz, eval.npz into a directory ----


@contextlib.contextmanager
def _seeded(seed: int = 0):
    """Fixed seed and deterministic kernels, without leaking either into the caller's process."""
    import torch

    prev = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(prev)


def _train(net, inputs: list, y, epochs: int, lr: float, bs: int = 64, shift: int = 0):
    """AdamW + one-cycle; `shift` rolls each image batch by up to that many pixels (cheap augmentation)."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * -(-len(y) // bs))
    for _ in range(epochs):
        net.train()
        for b in torch.randperm(len(y)).split(bs):
            xs = [x[b] for x in inputs]
            if shift:
                xs = [torch.roll(x, torch.randint(-shift, shift + 1, (2,)).tolist(), (2, 3)) for x in xs]
            loss = F.cross_entropy(net(*xs), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return net.eval()


def _export(net, example: tuple, path: Path, input_names: list[str], dynamic: bool = True) -> None:
    """torch.export-based exporter, weights inside the file (its default writes a .onnx.data sidecar)."""
    import logging

    import torch

    n = torch.export.Dim("N")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" noise
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", ".*axis name: N will not be used")  # inputs sharing one batch Dim
        torch.onnx.export(net, example, str(path), input_names=input_names, output_names=["logits"],
                          opset_version=OPSET, dynamo=True, external_data=False, verbose=False,
                          dynamic_shapes=tuple({0: n} for _ in example) if dynamic else None)


def _digits_images():
    """8x8 digits scaled to [0, 1] and upsampled to 32x32 so conv layers see realistic spatial sizes."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    img = torch.from_numpy(x.astype(np.float32) / 16).reshape(-1, 1, 8, 8)
    return F.interpolate(img, size=(32, 32), mode="bilinear", align_corners=False), torch.from_numpy(y)


def _cnn():
    """VGG-style: four conv-BN-ReLU blocks, three 2x2 pools, a 4096->256 FC head; ~1.44 M parameters."""
    from torch import nn

    def block(i: int, o: int, pool: bool) -> list:
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()] + [nn.MaxPool2d(2)] * pool

    return nn.Sequential(*block(1, 32, False), *block(32, 64, True), *block(64, 128, True), *block(128, 256, True),
                         nn.Flatten(), nn.Linear(256 * 4 * 4, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, 10))


def _write_data(out: Path, x: dict, y: np.ndarray, calib: np.ndarray, evals: np.ndarray) -> None:
    np.savez(out / "calib.npz", **{k: v[calib] for k, v in x.items()})
    np.savez(out / "eval.npz", **{k: v[evals] for k, v in x.items()}, labels=y[evals].astype(np.int64))


def _build_digits_cnn(out: Path) -> None:
    import torch

    img, y = _digits_images()
    train, calib, evals = split(len(y))
    with _seeded():
        net = _cnn()
        n = sum(p.numel() for p in net.parameters())
        assert n >= 1_000_000, f"digits CNN has only {n} parameters"
        _train(net, [img[train]], y[train], epochs=4, lr=3e-3, shift=2)
    torch.save(net.state_dict(), out / "weights.pt")  # lets fixed_batch_cnn re-export the very same weights
    _export(net, (img[:2],), out / "model.onnx", ["image"])
    _write_data(out, {"image": img.numpy()}, y.numpy(), calib, evals)


def _build_fixed_batch_cnn(out: Path) -> None:
    import torch

    img, y = _digits_images()
    _, calib, evals = split(len(y))
    net = _cnn()
    net.load_state_dict(torch.load(_built("digits-cnn") / "weights.pt"))
    _export(net.eval(), (img[:1],), out / "model.onnx", ["image"], dynamic=False)
    _write_data(out, {"image": img.numpy()}, y.numpy(), calib, evals)


def _build_digits_mlp(out: Path) -> None:
    examples.train_digits_mlp(out)


def _build_two_input(out: Path) -> None:
    """Wine: 10 chemistry features and 3 colour/optical ones, each standardised inside the model and embedded."""
    import torch
    from sklearn.datasets import load_wine
    from torch import nn

    x, y = load_wine(return_X_y=True)
    x, y = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)
    train, calib, evals = split(len(y))
    chem, color = torch.cat([x[:, :9], x[:, 12:]], 1), x[:, 9:12]  # color: intensity, hue, od280/od315

    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for name, v in (("chem", chem), ("color", color)):
                self.register_buffer(f"{name}_mu", v[train].mean(0))
                self.register_buffer(f"{name}_sd", v[train].std(0))
            self.chem, self.color = nn.Sequential(nn.Linear(10, 32), nn.ReLU()), nn.Sequential(nn.Linear(3, 16), nn.ReLU())
            self.head = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 3))

        def forward(self, chem, color):
            a = self.chem((chem - self.chem_mu) / self.chem_sd)
            b = self.color((color - self.color_mu) / self.color_sd)
            return self.head(torch.cat([a, b], 1))

    with _seeded():
        net = _train(Fused(), [chem[train], color[train]], y[train], epochs=60, lr=1e-2, bs=32)
    _export(net, (chem[:2], color[:2]), out / "model.onnx", ["chem", "color"])
    _write_data(out, {"chem": chem.numpy(), "color": color.numpy()}, y.numpy(), calib, evals)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "digits-cnn": _build_digits_cnn,
    "fixed-batch-cnn": _build_fixed_batch_cnn,
    "digits-mlp": _build_digits_mlp,
    "two-input": _build_two_input,
}


# ---- public ----


def digits_cnn(workdir: Path) -> ZooModel:
    """≥1 M-parameter CNN on 32x32 digits; input `image` [N,1,32,32], output `logits` [N,10]."""
    return _load("digits-cnn", workdir)


def fixed_batch_cnn(workdir: Path) -> ZooModel:
    """digits_cnn's weights exported with batch fixed to 1, for compilers that must handle static shapes."""
    return _load("fixed-batch-cnn", workdir)


def digits_mlp(workdir: Path) -> ZooModel:
    """The `edgeops demo` model (sklearn MLP via skl2onnx): input `pixels` [N,64], outputs label, probabilities."""
    return _load("digits-mlp", workdir)


def two_input_model(workdir: Path) -> ZooModel:
    """Two-input fused MLP on wine: inputs `chem` [N,10] and `color` [N,3], output `logits` [N,3]."""
    return _load("two-input", workdir)


if __name__ == "__main__":  # build everything and print what the tests compare against
    tmp = Path(tempfile.mkdtemp())
    for fn in (digits_cnn, fixed_batch_cnn, digits_mlp, two_input_model):
        t = time.perf_counter()
        m = fn(tmp / fn.__name__)
        print(f"{m.name:16} acc={m.accuracy:.4f} params={m.params:>9,} {time.perf_counter() - t:6.1f}s")
