"""The test zoo's models are what the compiler is judged against, so check they are real: big enough, accurate, dynamic."""

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
ort = pytest.importorskip("onnxruntime")

sys.path.insert(0, str(Path(__file__).parent))
import zoo  # noqa: E402

from edgeops.examples import train_digits_mlp  # noqa: E402
from edgeops.protocol.errors import EdgeopsError  # noqa: E402


def _session(m: zoo.ExampleModel) -> "ort.InferenceSession":
    return ort.InferenceSession(str(m.onnx), providers=["CPUExecutionProvider"])


def test_digits_cnn_is_big_accurate_and_batch_dynamic(tmp_path):
    m = zoo.digits_cnn(tmp_path)
    assert m.params >= 1_000_000
    assert zoo.ort_accuracy(m) >= 0.95  # recomputed, not the cached number
    sess, x = _session(m), np.load(m.calib)["image"]
    assert [i.name for i in sess.get_inputs()] == ["image"]
    for n in (1, 64):
        assert sess.run(["logits"], {"image": x[:n]})[0].shape == (n, 10)


def test_fixed_batch_cnn_has_static_shapes_and_same_weights(tmp_path):
    m = zoo.fixed_batch_cnn(tmp_path / "fixed")
    assert _session(m).get_inputs()[0].shape == [1, 1, 32, 32]
    assert zoo.ort_accuracy(m) == zoo.digits_cnn(tmp_path / "dynamic").accuracy


def test_digits_mlp_outputs_plain_tensors(tmp_path):
    m = zoo.digits_mlp(tmp_path)
    assert zoo.ort_accuracy(m) >= 0.9
    sess, x = _session(m), np.load(m.eval)["pixels"]
    label, proba = sess.run(["label", "probabilities"], {"pixels": x[:64]})
    assert label.shape == (64,) and proba.shape == (64, 10)
    np.testing.assert_array_equal(label, proba.argmax(1))


def test_two_input_model(tmp_path):
    m = zoo.two_input_model(tmp_path)
    sess = _session(m)
    assert [i.name for i in sess.get_inputs()] == ["chem", "color"]
    assert set(np.load(m.calib).files) == {"chem", "color"}
    assert zoo.ort_accuracy(m) >= 0.9


def test_demo_without_sklearn_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "skl2onnx", None)
    with pytest.raises(EdgeopsError, match=r"edgeops\[demo\]"):
        train_digits_mlp(tmp_path)
