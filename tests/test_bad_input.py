"""Bad input to `edgeops build`: one line saying what is wrong, a non-zero exit, and nothing written.

Every case here fails before the search starts, so none of them compiles anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from edgeops.compiler.model import load_model
from edgeops.protocol.errors import EdgeopsError

WEIGHTS = np.arange(8, dtype=np.float32).reshape(4, 2)


def assert_nothing_written(outdir: Path) -> None:
    assert not outdir.exists() or not any(outdir.iterdir()), sorted(outdir.iterdir())


@pytest.fixture
def build_fails(cli_error, tmp_path):
    """Run `edgeops build MODEL ARGS... -o OUT`; assert the clean one-line failure and an empty OUT."""

    def run(model, *args, outdir: Path | None = None) -> str:
        outdir = outdir if outdir is not None else tmp_path / "out"
        line = cli_error("build", model, *args, "-o", outdir)
        assert_nothing_written(outdir)
        return line

    return run


@pytest.fixture
def digits_args(digits_model):
    return ("--profile", "x86-vnni", "--calib", digits_model.calib, "--eval", digits_model.eval)


# --- the model file ------------------------------------------------------------------------------------


def test_missing_model(tmp_path, build_fails, digits_args):
    line = build_fails(tmp_path / "absent.onnx", *digits_args)
    assert "does not exist" in line


def test_truncated_onnx(tmp_path, digits_model, build_fails, digits_args):
    data = digits_model.onnx.read_bytes()
    model = tmp_path / "truncated.onnx"
    model.write_bytes(data[: len(data) // 2])
    line = build_fails(model, *digits_args)
    assert "not a valid ONNX model" in line
    assert str(model) in line


@pytest.mark.parametrize(
    "content",
    [b"this is not an onnx model\n" * 20, bytes(range(256)) * 8, b""],
    ids=["text", "binary", "empty"],
)
def test_garbage_bytes(tmp_path, build_fails, digits_args, content):
    model = tmp_path / "garbage.onnx"
    model.write_bytes(content)
    line = build_fails(model, *digits_args)
    assert "not a valid ONNX model" in line


def test_model_path_is_a_folder(tmp_path, build_fails, digits_args):
    (tmp_path / "model.onnx").mkdir()
    line = build_fails(tmp_path / "model.onnx", *digits_args)
    assert "does not exist" in line or "not a valid ONNX model" in line


def matmul_model(input_shape=("N", 4)) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [input_shape[0], 2])],
        [numpy_helper.from_array(WEIGHTS, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def save_with_external_weights(folder: Path, location: str) -> Path:
    """A MatMul model whose weights live in external data at `location` (recorded verbatim)."""
    folder.mkdir(parents=True, exist_ok=True)
    model = matmul_model()
    weights = model.graph.initializer[0]
    set_external_data(weights, location=location, offset=0, length=WEIGHTS.nbytes)
    weights.ClearField("raw_data")
    weights.data_location = TensorProto.EXTERNAL
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def matmul_data(tmp_path):
    """Valid calibration/eval data for `matmul_model`, so only the model is wrong."""
    path = tmp_path / "data.npz"
    np.savez(path, x=np.random.default_rng(0).random((16, 4), dtype=np.float32))
    return ("--profile", "x86-vnni", "--calib", path, "--eval", path)


def test_external_data_inside_the_folder_loads(tmp_path):
    # The baseline for the refusals below: the same model with its weights next to it is fine.
    model_path = save_with_external_weights(tmp_path / "m", "weights.bin")
    (tmp_path / "m" / "weights.bin").write_bytes(WEIGHTS.tobytes())
    model = load_model(model_path)
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), WEIGHTS)


def test_external_data_with_parent_path(tmp_path, build_fails, matmul_data):
    (tmp_path / "secret.bin").write_bytes(WEIGHTS.tobytes())
    model = save_with_external_weights(tmp_path / "m", "../secret.bin")
    line = build_fails(model, *matmul_data)
    assert "outside the model's folder" in line
    assert "'W'" in line


def test_external_data_with_absolute_path(tmp_path, build_fails, matmul_data):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(WEIGHTS.tobytes())
    model = save_with_external_weights(tmp_path / "m", str(secret))
    line = build_fails(model, *matmul_data)
    assert "absolute path" in line


def test_external_data_through_symlink_leading_out(tmp_path, build_fails, matmul_data):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(WEIGHTS.tobytes())
    model = save_with_external_weights(tmp_path / "m", "weights.bin")
    (tmp_path / "m" / "weights.bin").symlink_to(secret)
    line = build_fails(model, *matmul_data)
    assert "outside the model's folder" in line


def test_external_data_file_missing(tmp_path, build_fails, matmul_data):
    model = save_with_external_weights(tmp_path / "m", "weights.bin")
    line = build_fails(model, *matmul_data)
    assert "missing" in line and "weights.bin" in line


def test_external_data_shorter_than_declared(tmp_path, build_fails, matmul_data):
    model = save_with_external_weights(tmp_path / "m", "weights.bin")
    (tmp_path / "m" / "weights.bin").write_bytes(WEIGHTS.tobytes()[:10])
    build_fails(model, *matmul_data)


def test_absurd_input_dimension(tmp_path, build_fails, matmul_data):
    model = tmp_path / "huge.onnx"
    model.write_bytes(matmul_model(input_shape=(2**62, 4)).SerializeToString())
    line = build_fails(model, *matmul_data)
    assert "absurd dimension" in line
    assert str(2**62) in line


def test_absurd_initializer_dimensions(tmp_path):
    model = matmul_model()
    del model.graph.initializer[:]
    model.graph.initializer.append(TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[2**20, 2**20]))
    path = tmp_path / "huge-weights.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(EdgeopsError, match="absurd dimensions"):
        load_model(path)


# --- the profile and options ---------------------------------------------------------------------------


def test_unknown_profile(tmp_path, digits_model, build_fails):
    line = build_fails(digits_model.onnx, "--profile", "x86-vnn", "--calib", digits_model.calib)
    assert "unknown profile 'x86-vnn'" in line
    assert "did you mean 'x86-vnni'" in line


def test_profile_with_a_typo(tmp_path, digits_model, build_fails):
    from importlib import resources

    text = (resources.files("edgeops") / "firmware_profiles" / "x86-vnni.toml").read_text()
    assert "max_latency_ms" in text
    profile = tmp_path / "board.toml"
    profile.write_text(text.replace("max_latency_ms", "max_latency_msec"))
    line = build_fails(digits_model.onnx, "--profile", profile, "--calib", digits_model.calib)
    assert "'budget.max_latency_msec'" in line
    assert "did you mean 'max_latency_ms'" in line


def test_a_litert_profile_without_the_tflite_extra_names_it(digits_model, build_fails, monkeypatch, bare_python):
    monkeypatch.setenv("EDGEOPS_TFLITE_PYTHON", bare_python)
    line = build_fails(digits_model.onnx, "--profile", "coral-devboard", "--calib", digits_model.calib)
    assert "pip install 'edgeops[tflite]'" in line and "EDGEOPS_TFLITE_PYTHON" in line


@pytest.mark.parametrize("value", ["1.5", "1", "-0.1", "nan"])
def test_max_accuracy_drop_out_of_range(digits_model, build_fails, digits_args, value):
    line = build_fails(digits_model.onnx, *digits_args, "--max-accuracy-drop", value)
    assert "--max-accuracy-drop" in line


@pytest.mark.parametrize("option", [("--name", "../../evil"), ("--name", "a/b"), ("--version", "1.0/../../x"), ("--version", "")])
def test_names_that_would_escape_the_output_folder(tmp_path, digits_model, build_fails, digits_args, option):
    line = build_fails(digits_model.onnx, *digits_args, *option)
    assert "must be letters, digits" in line
    assert not (tmp_path / "evil-1.0.0-x86-vnni.edgeops").exists()


def test_no_data_at_all(digits_model, build_fails):
    line = build_fails(digits_model.onnx, "--profile", "x86-vnni")
    assert "--calib" in line


def test_output_folder_under_a_regular_file(tmp_path, digits_model, build_fails, digits_args):
    blocker = tmp_path / "somefile"
    blocker.write_text("keep me\n")
    line = build_fails(digits_model.onnx, *digits_args, outdir=blocker / "out")
    assert "cannot write to output folder" in line
    assert blocker.read_text() == "keep me\n"


def test_output_folder_is_a_regular_file(tmp_path, digits_model, cli_error, digits_args):
    blocker = tmp_path / "somefile"
    blocker.write_text("keep me\n")
    line = cli_error("build", digits_model.onnx, *digits_args, "-o", blocker)
    assert "cannot write to output folder" in line
    assert blocker.read_text() == "keep me\n"


# --- calibration and eval data -------------------------------------------------------------------------


def digits_arrays(digits_model, role: str) -> dict[str, np.ndarray]:
    with np.load(getattr(digits_model, role)) as data:
        return {key: data[key] for key in data.files}


def bad_npz(tmp_path: Path, **arrays) -> Path:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("role", ["calib", "eval"])
def test_npz_missing_input(tmp_path, digits_model, build_fails, role):
    pixels = digits_arrays(digits_model, "calib")["pixels"]
    bad = bad_npz(tmp_path, image=pixels)
    good = digits_model.calib if role == "eval" else digits_model.eval
    calib, evaluation = (bad, good) if role == "calib" else (good, bad)
    line = build_fails(digits_model.onnx, "--profile", "x86-vnni", "--calib", calib, "--eval", evaluation)
    assert "no array 'pixels'" in line
    assert str(bad) in line


def test_npz_wrong_dtype(tmp_path, digits_model, build_fails):
    pixels = digits_arrays(digits_model, "calib")["pixels"].astype(np.float64)
    line = build_fails(digits_model.onnx, "--profile", "x86-vnni", "--calib", bad_npz(tmp_path, pixels=pixels))
    assert "float64" in line and "float32" in line


@pytest.mark.parametrize("shape", [(20, 63), (20, 8, 8), (20,)])
def test_npz_wrong_shape(tmp_path, digits_model, build_fails, shape):
    pixels = np.zeros(shape, dtype=np.float32)
    line = build_fails(digits_model.onnx, "--profile", "x86-vnni", "--calib", bad_npz(tmp_path, pixels=pixels))
    assert "does not fit the model input shape" in line


def test_npz_extra_array_not_aligned(tmp_path, digits_model, build_fails):
    """Arrays that are not inputs go to the task metric, so they must index the same samples."""
    arrays = digits_arrays(digits_model, "calib")
    line = build_fails(digits_model.onnx, "--profile", "x86-vnni", "--calib",
                       bad_npz(tmp_path, **arrays, mask=arrays["pixels"][:-1]))
    n = len(arrays["pixels"])
    assert "same number of samples" in line and f"'pixels' {n}, 'mask' {n - 1}" in line


def test_npz_float_labels(tmp_path, digits_model, build_fails):
    arrays = digits_arrays(digits_model, "eval")
    bad = bad_npz(tmp_path, pixels=arrays["pixels"], labels=arrays["labels"].astype(np.float32))
    line = build_fails(digits_model.onnx, "--profile", "x86-vnni", "--calib", digits_model.calib, "--eval", bad)
    assert "'labels'" in line


def test_npz_labels_not_aligned(tmp_path, digits_model, build_fails):
    arrays = digits_arrays(digits_model, "eval")
    bad = bad_npz(tmp_path, pixels=arrays["pixels"], labels=arrays["labels"][:-1])
    line = build_fails(digits_model.onnx, "--profile", "x86-vnni", "--calib", digits_model.calib, "--eval", bad)
    assert "'labels'" in line


def test_npz_with_no_samples(tmp_path, digits_model, build_fails):
    bad = bad_npz(tmp_path, pixels=np.zeros((0, 64), dtype=np.float32))
    line = build_fails(digits_model.onnx, "--profile", "x86-vnni", "--calib", bad)
    assert "samples" in line


def test_npz_with_pickled_objects_is_not_unpickled(tmp_path, digits_model, build_fails):
    bad = bad_npz(tmp_path, pixels=np.array([{"a": 1}, None], dtype=object))
    line = build_fails(digits_model.onnx, "--profile", "x86-vnni", "--calib", bad)
    assert "not a readable .npz" in line


@pytest.mark.parametrize("content", [b"", b"not a zip\n"], ids=["empty", "text"])
def test_data_file_that_is_not_npz(tmp_path, digits_model, build_fails, content):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(content)
    line = build_fails(digits_model.onnx, "--profile", "x86-vnni", "--calib", bad)
    assert "not a readable .npz" in line


def test_data_file_missing(tmp_path, digits_model, build_fails):
    line = build_fails(digits_model.onnx, "--profile", "x86-vnni", "--calib", tmp_path / "absent.npz")
    assert "does not exist" in line
