"""Task metrics (compiler/metrics/): what each recognises, that each sees the collapse a raw-tensor
score misses, and that a user's metric file is loaded, called and refused as documented.

The arrays here are shaped like the real heads (a YOLOv8 [4+C, A] output, a CTC softmax); the same
metrics run on real third-party models in test_task_models.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeops.compiler import metrics
from edgeops.compiler.metrics import ModelInfo, detection, worst_channel
from edgeops.compiler.metrics.user import UserMetric
from edgeops.protocol.errors import EdgeopsError

RNG = np.random.default_rng(0)
INFO = ModelInfo({}, [(1, 3, 320, 320)], None)


def _yolo_head(samples: int = 6, classes: int = 18, anchors: int = 2100) -> np.ndarray:
    """A YOLOv8-style output: boxes in pixels, sigmoid class scores, a few confident objects per sample."""
    boxes = np.stack([RNG.uniform(20, 300, (samples, anchors)), RNG.uniform(20, 300, (samples, anchors)),
                      RNG.uniform(8, 60, (samples, anchors)), RNG.uniform(8, 60, (samples, anchors))], axis=1)
    scores = RNG.uniform(0, 0.1, (samples, classes, anchors))
    for s in range(samples):
        for k in range(5):
            scores[s, (s + k) % classes, 40 * k] = 0.9
    return np.concatenate([boxes, scores], axis=1).astype(np.float32)


def _flat_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def test_yolo_head_is_a_detector_and_a_score_collapse_scores_zero():
    head = _yolo_head()
    metric, warnings = metrics.choose({"output0": head}, INFO, None)
    assert metric.name == "detection" and not warnings
    assert "YOLO" in metric.reason
    collapsed = head.copy()
    collapsed[:, 4:] *= 0.2  # every class score under the confidence threshold: nothing is found
    assert metric.score({"output0": head}, {"output0": head}, {}) == 1.0
    assert metric.score({"output0": head}, {"output0": collapsed}, {}) == 0.0
    # what the old generic score said about the same collapse
    assert _flat_cosine(head, collapsed) > 0.99
    assert worst_channel.WorstChannel("test").score({"o": head}, {"o": collapsed}, {}) < 0.9


def test_detection_f1_counts_moved_and_missing_boxes():
    head = _yolo_head(samples=1)
    metric = detection.recognise({"output0": head}, INFO)
    moved = head.copy()
    moved[0, 0, 0] += 200  # the first object's box moves far away: one miss, one false detection
    assert metric.count({"output0": head}) == 5
    assert metric.score({"output0": head}, {"output0": moved}, {}) == pytest.approx(2 * 4 / 10)


def test_a_frames_by_pitches_sigmoid_map_is_no_detector():
    """basic-pitch's onset head [172 frames, 88 pitches] once passed for a YOLO head of 172 anchors."""
    onsets = RNG.uniform(0, 1, (4, 172, 88)).astype(np.float32)
    assert detection.recognise({"StatefulPartitionedCall:2": onsets}, INFO) is None


def test_a_head_where_fp32_finds_nothing_is_not_judged_as_a_detector():
    quiet = _yolo_head()
    quiet[:, 4:] *= 0.1  # F1 over no objects is 1 whatever a candidate does
    metric, warnings = metrics.choose({"output0": quiet}, INFO, None)
    assert metric.name == "worst-channel" and warnings


def test_anchors_first_head_with_objectness():
    head = np.transpose(_yolo_head(samples=2, classes=3), (0, 2, 1)).copy()  # [A, 4+3]
    head = np.concatenate([head[:, :, :4], np.ones_like(head[:, :, :1]), head[:, :, 4:]], axis=2)  # [A, 5+3]
    metric = detection.recognise({"det": head}, INFO)
    assert metric is not None and metric.layout == "anchors-first"
    no_objects = head.copy()
    no_objects[:, :, 4] = 0.01
    assert metric.score({"det": head}, {"det": no_objects}, {}) == 0.0


def test_boxes_and_softmax_scores_with_background():
    anchors = 200
    corners = RNG.uniform(0, 100, (3, anchors, 2))
    boxes = np.concatenate([corners, corners + RNG.uniform(5, 30, (3, anchors, 2))], axis=2).astype(np.float32)
    scores = np.zeros((3, anchors, 2), np.float32)
    scores[..., 0] = 1.0
    scores[:, :10] = [0.1, 0.9]
    metric, _ = metrics.choose({"boxes": boxes, "scores": scores}, INFO, None)
    assert metric.name == "detection" and metric.background and not metric.centre
    assert metric.score({"boxes": boxes, "scores": scores}, {"boxes": boxes, "scores": scores}, {}) == 1.0


def _ctc(samples: int = 8, steps: int = 40, classes: int = 30, blank: int = 0) -> np.ndarray:
    logits = RNG.normal(0, 1, (samples, steps, classes))
    logits[:, :, blank] += 3
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def test_ctc_head_decodes_and_one_flipped_step_changes_the_string():
    probs = _ctc()
    metric, _ = metrics.choose({"softmax_0.tmp_0": probs}, ModelInfo({"softmax_0.tmp_0": "Softmax"}, [], None), None)
    assert metric.name == "ctc" and metric.blank == 0
    flipped = probs.copy()
    best = probs[0].argmax(-1)
    step = int(np.flatnonzero(best != 0)[0])
    flipped[0, step] = np.roll(flipped[0, step], 1)  # one step reads another character
    assert metric.score({"softmax_0.tmp_0": probs}, {"softmax_0.tmp_0": flipped}, {}) == pytest.approx(7 / 8)


def test_ctc_blank_is_what_fp32_picks_most():
    probs = _ctc(classes=12, blank=11)
    metric = metrics.ctc.recognise({"logp": np.log(probs)}, INFO)
    assert metric is not None and metric.blank == 11
    assert metrics.ctc.greedy_decode(np.array([11, 3, 3, 11, 3, 5, 5, 11]), 11) == (3, 3, 5)


def test_segmentation_miou():
    logits = RNG.normal(0, 1, (2, 4, 32, 32)).astype(np.float32)
    info = ModelInfo({"out": "Softmax"}, [(1, 3, 32, 32)], None)
    metric, _ = metrics.choose({"out": logits}, info, None)
    assert metric.name == "segmentation"
    lost = logits.copy()
    lost[:, 3] = -10  # class 3 vanishes: its IoU is 0, the others lose the pixels it had
    assert metric.score({"out": logits}, {"out": logits}, {}) == 1.0
    assert metric.score({"out": logits}, {"out": lost}, {}) < 0.6


def test_unknown_outputs_get_the_worst_channel_default_with_a_warning():
    big = RNG.uniform(0, 300, (16, 4)).astype(np.float32)
    small = RNG.uniform(0, 1, (16, 3)).astype(np.float32)
    outputs = {"coords": big, "conf": small}
    metric, warnings = metrics.choose(outputs, INFO, None)
    assert metric.name == "worst-channel"
    assert warnings and "not a task metric" in warnings[0]
    collapsed = {"coords": big, "conf": small * 0}
    assert metric.score(outputs, outputs, {}) == 1.0
    assert metric.score(outputs, collapsed, {}) < 0.5  # the small channel collapsed; the big one is intact


def test_forcing_a_generic_metric_on_a_detector_warns():
    metric, warnings = metrics.choose({"output0": _yolo_head()}, INFO, "cosine")
    assert metric.name == "cosine"
    assert len(warnings) == 1 and "detection" in warnings[0]


def test_forced_metric_errors_are_one_line():
    with pytest.raises(EdgeopsError, match="needs `labels`"):
        metrics.choose({"logits": RNG.normal(size=(4, 10))}, INFO, "accuracy")
    with pytest.raises(EdgeopsError, match="neither a built-in metric"):
        metrics.choose({"logits": RNG.normal(size=(4, 10))}, INFO, "f1")
    with pytest.raises(EdgeopsError, match="no model output looks like"):
        metrics.choose({"logits": RNG.normal(size=(4, 10))}, INFO, "detection")


def test_non_finite_candidate_outputs_are_broken():
    head = _yolo_head(samples=1)
    metric = detection.recognise({"output0": head}, INFO)
    broken = head.copy()
    broken[0, 5, 3] = np.nan
    with pytest.raises(metrics.BrokenOutputs):
        metrics.score(metric, {"output0": head}, {"output0": broken}, {})


# --- your own metric ------------------------------------------------------------------------------------


def _user_metric(tmp_path, body: str, name: str = "m.py") -> str:
    path = tmp_path / name
    path.write_text("import numpy as np\n\n" + body)
    return f"{path}:metric"


def test_user_metric_gets_both_outputs_and_the_extra_arrays(tmp_path):
    spec = _user_metric(tmp_path, "def metric(fp32, candidate, data):\n"
                                  "    return float(np.mean(candidate['y'] == fp32['y']) + data['offset'].sum())\n")
    metric, warnings = metrics.choose({"y": np.arange(4.0)}, INFO, spec)
    assert metric.name == "m.py:metric" and not warnings
    assert metric.score({"y": np.arange(4.0)}, {"y": np.array([0.0, 1, 0, 0])}, {"offset": np.zeros(4)}) == 0.5


@pytest.mark.parametrize(("body", "message"), [
    ("def metric(fp32, candidate, data):\n    raise KeyError('boxes')\n", "raised KeyError: 'boxes'"),
    ("def metric(fp32, candidate, data):\n    return float('nan')\n", "returned nan"),
    ("def metric(fp32, candidate, data):\n    return 'good'\n", "returned 'good'"),
    ("def metric(fp32, candidate, data):\n    return np.ones(3)\n", "must return one finite number"),
    ("def metric(fp32, candidate, data):\n    while True:\n        pass\n", "ran longer than 1 s"),
    ("def metric(fp32, candidate, data):\n    while True:\n        try:\n            while True:\n                pass\n"
     "        except Exception:\n            pass\n", "ran longer than 1 s"),  # no `except Exception` swallows it
    ("def metric(fp32, candidate, data):\n    raise SystemExit(3)\n", "raised SystemExit"),
    ("def metric(fp32, candidate, data):\n    return 10 ** 400\n", "must return one finite number"),
    ("def metric(fp32, candidate, data):\n    fp32['y'] += 1\n    return 1.0\n", "read-only"),
])
def test_user_metric_failures_name_the_function(tmp_path, monkeypatch, body, message):
    monkeypatch.setenv("EDGEOPS_METRIC_TIMEOUT", "1")
    spec = _user_metric(tmp_path, body)
    metric = UserMetric.load(spec)
    with pytest.raises(metrics.MetricError) as error:
        metrics.score(metric, {"y": np.zeros(2)}, {"y": np.zeros(2)}, {})
    assert spec in str(error.value) and message in str(error.value)
    assert "\n" not in str(error.value)


def test_user_metric_that_cannot_be_loaded(tmp_path):
    with pytest.raises(EdgeopsError, match="does not exist"):
        UserMetric.load(f"{tmp_path}/missing.py:metric")
    with pytest.raises(EdgeopsError, match="has no function 'metric'"):
        UserMetric.load(_user_metric(tmp_path, "x = 1\n"))
    with pytest.raises(EdgeopsError, match="importing .* failed: ZeroDivisionError"):
        UserMetric.load(_user_metric(tmp_path, "x = 1 / 0\n", "bad.py"))


def test_user_metric_file_loads_as_python_would_run_it(tmp_path):
    """Helpers beside it import, and dataclasses under `from __future__ import annotations` work."""
    (tmp_path / "mytask.py").write_text("def agreement(a, b):\n    return float((a == b).mean())\n")
    (tmp_path / "with_helper.py").write_text(
        "from __future__ import annotations\nfrom dataclasses import dataclass\n\nfrom mytask import agreement\n\n\n"
        "@dataclass\nclass Settings:\n    threshold: float = 0.5\n\n\n"
        "def metric(fp32, candidate, data):\n    return agreement(fp32['y'], candidate['y'])\n")
    assert UserMetric.load(f"{tmp_path}/with_helper.py:metric").score({"y": np.ones(4)}, {"y": np.ones(4)}, {}) == 1.0


def test_a_collapsed_embedding_is_no_match():
    vectors = RNG.normal(size=(4, 32))
    metric = metrics.embedding.Cosine("e", "test")
    assert metric.score({"e": vectors}, {"e": vectors}, {}) == pytest.approx(1.0)
    assert metric.score({"e": vectors}, {"e": np.zeros_like(vectors)}, {}) == 0.0


def test_a_constant_channel_that_drifts_a_little_is_no_collapse():
    outputs = {"o": np.stack([RNG.uniform(0, 1, 64), np.zeros(64)], axis=1)}
    drifted = {"o": outputs["o"] + np.array([0.0, 1e-6])}
    assert worst_channel.WorstChannel("test").score(outputs, drifted, {}) > 0.99


def test_labels_that_are_no_class_are_refused_and_chance_level_warns():
    scores = RNG.normal(size=(40, 10)).astype(np.float32)
    with pytest.raises(EdgeopsError, match=r"labels run from 1 to 10, but output logits has 10 classes"):
        metrics.choose({"logits": scores}, ModelInfo({}, [], np.arange(40) % 10 + 1), None)
    wrong = (scores.argmax(1) + 1) % 10  # every label disagrees with the model
    metric, warnings = metrics.choose({"logits": scores}, ModelInfo({}, [], wrong), None)
    assert metric.name == "accuracy" and "no better than chance" in warnings[0]
