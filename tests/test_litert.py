"""The agent's LiteRT adapter on real third-party .tflite models (tests/zoo_tflite.py): it computes exactly
what a bare LiteRT interpreter computes, talks float to apps even for full-integer models, resizes only
dynamic batches, and its bundles install through the A/B slots only when their self-test passes."""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zoo_tflite

from edgeops.agent import runtime
from edgeops.agent.slots import BUNDLE, InstallFailed, SlotStore
from edgeops.protocol.bundle import build_bundle, canonical_json, npz_bytes, read_bundle, sha256_bytes
from edgeops.protocol.errors import EdgeopsError

QUANTIZED = (np.int8, np.uint8)


@pytest.fixture(scope="module")
def interpreter_class(require):
    """LiteRT's own Interpreter: the oracle the adapter is compared with."""
    return require(lambda: importlib.import_module("ai_edge_litert.interpreter").Interpreter)


@pytest.fixture(scope="module")
def litert_version(interpreter_class) -> str:
    return importlib.metadata.version("ai-edge-litert")


@pytest.fixture(scope="module")
def zoo(require) -> Callable[[str], zoo_tflite.TFLiteZooModel]:
    """zoo("name"): the real model and its inputs, made once per module."""
    made: dict[str, zoo_tflite.TFLiteZooModel] = {}

    def get(name: str) -> zoo_tflite.TFLiteZooModel:
        if name not in made:
            made[name] = require(zoo_tflite.ALL[name])
        return made[name]

    return get


def manifest_for(version: str | None) -> dict:
    return {"runtime": {"name": "litert", "min_version": version}}


def bare_run(interpreter_class, data: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each sample in order (a batch of one) through a fresh LiteRT interpreter called as an app would call it
    without edgeops: the signature runner when the model has a signature, else tensor indices; quantized
    tensors are quantized and dequantized by hand with TFLite's formulas. Outputs stacked per sample."""
    interpreter = interpreter_class(model_content=data, num_threads=1)
    if interpreter.get_signature_list():
        runner = interpreter.get_signature_runner()
        in_details, out_details = runner.get_input_details(), runner.get_output_details()

        def call(feed):
            return runner(**feed)
    else:
        interpreter.allocate_tensors()
        in_details = {d["name"]: d for d in interpreter.get_input_details()}
        out_details = {d["name"]: d for d in interpreter.get_output_details()}

        def call(feed):
            for name, value in feed.items():
                interpreter.set_tensor(in_details[name]["index"], value)
            interpreter.invoke()
            return {name: interpreter.get_tensor(d["index"]) for name, d in out_details.items()}

    results = []
    for i in range(len(next(iter(inputs.values())))):
        feed = {}
        for name, values in inputs.items():
            detail, value = in_details[name], values[i : i + 1]
            scale, zero = detail["quantization"]
            if detail["dtype"] in QUANTIZED and scale:
                low, high = np.iinfo(detail["dtype"]).min, np.iinfo(detail["dtype"]).max
                value = np.clip(np.round(value / np.float32(scale)) + zero, low, high).astype(detail["dtype"])
            feed[name] = value
        outputs = {}
        for name, value in call(feed).items():
            scale, zero = out_details[name]["quantization"]
            quantized = out_details[name]["dtype"] in QUANTIZED and scale
            outputs[name] = (value.astype(np.float32) - zero) * np.float32(scale) if quantized else value
        results.append(outputs)
    return {name: np.concatenate([r[name] for r in results]) for name in results[0]}


def adapter_run(model: runtime.Model, inputs: dict[str, np.ndarray], batch: int = 1) -> dict[str, np.ndarray]:
    count = len(next(iter(inputs.values())))
    runs = [model.run({k: v[i : i + batch] for k, v in inputs.items()}) for i in range(0, count, batch)]
    return {name: np.concatenate([r[name] for r in runs]) for name in runs[0]}


# --- running real models ----------------------------------------------------------------------------------

NAMES = {  # the names apps use: signature names where the model has a signature, else tensor names
    "face-detection": ({"input"}, {"regressors", "classificators"}),
    "micro-wakeword": ({"input_audio"}, {"dense_1"}),
    "wakeword-embedding": ({"input_1"}, {"conv2d_19"}),
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_real_model_computes_what_a_bare_interpreter_computes(zoo, interpreter_class, litert_version, name):
    real = zoo(name)
    inputs, outputs = NAMES[name]
    assert set(real.inputs) == inputs
    model = runtime.load(real.data, manifest_for(litert_version))
    got = adapter_run(model, real.inputs)
    want = bare_run(interpreter_class, real.data, real.inputs)
    assert set(got) == outputs
    for output in outputs:
        np.testing.assert_array_equal(got[output], want[output], err_msg=output)
        assert got[output].dtype == np.float32


def test_full_integer_model_takes_floats_and_gives_floats(zoo, interpreter_class):
    """okay_nabu takes int8 and gives uint8; apps feed floats and read probabilities. The model is
    stateful (streaming), so every comparison runs the same sequence from a fresh load."""
    real = zoo("micro-wakeword")
    # Scaled up, over half of the steps have values past the int8 range (0..26): quantizing must clip, not wrap.
    features = real.inputs["input_audio"] * np.float32(1.5)
    got = adapter_run(runtime.load(real.data, manifest_for(None)), {"input_audio": features})["dense_1"]
    want = bare_run(interpreter_class, real.data, {"input_audio": features})["dense_1"]
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.float32 and 0.0 <= got.min() and got.max() <= 1.0
    assert np.count_nonzero(got) > 50  # many steps score above 0: dequantizing is exercised

    detail = interpreter_class(model_content=real.data).get_input_details()[0]
    scale, zero = detail["quantization"]
    quantized = np.clip(np.round(features / np.float32(scale)) + zero, -128, 127).astype(np.int8)
    passed_through = adapter_run(runtime.load(real.data, manifest_for(None)), {"input_audio": quantized})
    np.testing.assert_array_equal(passed_through["dense_1"], got)  # integer feeds are taken as they are


def test_dynamic_batch_resizes_the_input(zoo, interpreter_class):
    real = zoo("wakeword-embedding")  # input_1 is [-1, 76, 32, 1]
    windows = {"input_1": real.inputs["input_1"][:12]}
    want = bare_run(interpreter_class, real.data, windows)["conv2d_19"]
    model = runtime.load(real.data, manifest_for(None))
    for batch in (2, 4, 1, 3):  # larger than loaded, back to the loaded batch of 1, larger again
        got = adapter_run(model, windows, batch)["conv2d_19"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"batch {batch}")


def test_fixed_batch_is_refused_not_reshaped(zoo, interpreter_class):
    """BlazeFace hard-codes batch 1 in its reshapes: resized anyway, LiteRT returns [1, 1792, 16] for two
    images. The adapter refuses the feed and keeps serving batches of one."""
    real = zoo("face-detection")
    model = runtime.load(real.data, manifest_for(None))
    with pytest.raises(EdgeopsError, match="^LiteRT could not run the model: ") as refused:
        model.run({"input": real.inputs["input"][:2]})
    assert "\n" not in str(refused.value)
    want = bare_run(interpreter_class, real.data, {"input": real.inputs["input"][:1]})
    got = model.run({"input": real.inputs["input"][:1]})
    np.testing.assert_array_equal(got["classificators"], want["classificators"])


# --- bundles through the A/B slots -----------------------------------------------------------------------


def litert_bundle(interpreter_class, real: zoo_tflite.TFLiteZooModel, dest: Path, version: str,
                  edit_golden: Callable[[dict], None] | None = None) -> Path:
    """A complete LiteRT bundle, made as the compiler makes one: golden outputs and drift reference from
    the bare interpreter on the real inputs, float I/O in the manifest (int8 I/O is the adapter's job)."""
    from edgeops.compiler.data import Dataset
    from edgeops.compiler.reference import reference_summaries, selftest_arrays

    data = Dataset(real.inputs, None, 1, frozenset(), "zoo")
    outputs = bare_run(interpreter_class, real.data, real.inputs)
    arrays, selftest = selftest_arrays(data, list(outputs), list(outputs.values()))
    if edit_golden is not None:
        edit_golden(arrays)
    manifest = {
        "name": real.name, "version": version, "profile": "coral-devboard",
        "runtime": {"name": "litert", "min_version": "2.3.0"},
        "model": {"file": "model.tflite", "format": "tflite",
                  "sha256": sha256_bytes(real.data), "size": len(real.data)},
        "inputs": [{"name": k, "dtype": "float32", "shape": [1, *v.shape[1:]]} for k, v in real.inputs.items()],
        "outputs": [{"name": k, "dtype": "float32", "shape": [1, *v.shape[1:]]} for k, v in outputs.items()],
        "selftest": selftest,
    }  # fmt: skip
    members = {
        "model.tflite": real.data,
        "reference.json": canonical_json(reference_summaries(data, list(outputs), list(outputs.values()), None)),
        "selftest.npz": npz_bytes(arrays),
    }
    dest.write_bytes(build_bundle(manifest, members))
    return dest


@pytest.mark.parametrize("name", ["face-detection", "micro-wakeword"])
def test_litert_bundle_installs_only_when_its_selftest_passes(zoo, interpreter_class, tmp_path, name):
    real = zoo(name)
    good = litert_bundle(interpreter_class, real, tmp_path / "good.edgeops", "1.0.0")
    state = tmp_path / "state"
    store = SlotStore(state)
    active = store.install(good)
    assert active.slot == "a" and active.manifest["version"] == "1.0.0"
    assert sorted(p.name for p in (state / "slots" / "a").iterdir()) == [BUNDLE, "model.tflite"]
    served = runtime.load(active.model_path.read_bytes(), active.manifest)  # as the serving side loads it
    runtime.selftest(served, read_bundle(active.path))

    output = read_bundle(good).manifest["outputs"][0]["name"]

    def shift(arrays: dict) -> None:
        golden = arrays[f"output/{output}"]
        arrays[f"output/{output}"] = golden + np.float32(1.0 + 2 * np.ptp(golden))

    wrong = litert_bundle(interpreter_class, real, tmp_path / "wrong.edgeops", "1.1.0", edit_golden=shift)
    with pytest.raises(InstallFailed, match=f"'self-test'.*{output!r}") as failure:
        store.install(wrong)
    assert failure.value.step == "self-test"
    assert store.active().slot == "a" and store.active().manifest["version"] == "1.0.0"
    assert SlotStore(state).active().manifest["version"] == "1.0.0"  # what a restarted agent sees
    assert SlotStore(tmp_path / "fresh").install(good).manifest["version"] == "1.0.0"
    with pytest.raises(InstallFailed, match="'self-test'"):
        SlotStore(tmp_path / "empty").install(wrong)
    assert SlotStore(tmp_path / "empty").active() is None


# --- errors -----------------------------------------------------------------------------------------------

NO_LITERT = """
import sys
from edgeops.agent import runtime
from edgeops.protocol.errors import EdgeopsError
print(any(m in sys.modules for m in ("ai_edge_litert", "tflite_runtime")))  # imported lazily, by the adapter
sys.modules["ai_edge_litert"] = None
sys.modules["tflite_runtime"] = None
try:
    runtime.load(b"", {"runtime": {"name": "litert", "min_version": "2.3.0"}})
except EdgeopsError as exc:
    print(exc)
"""


def test_without_a_litert_runtime_the_error_names_the_extra():
    proc = subprocess.run([sys.executable, "-c", NO_LITERT], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    imported, *error = proc.stdout.splitlines()
    assert imported == "False"
    assert len(error) == 1 and "pip install 'edgeops[litert]'" in error[0], proc.stdout


def test_min_version_above_the_installed_runtime_is_refused(zoo, litert_version):
    data = zoo("micro-wakeword").data
    with pytest.raises(EdgeopsError, match=rf"needs ai-edge-litert >= 99\.0, this device has {litert_version}"):
        runtime.load(data, manifest_for("99.0"))
    runtime.load(data, manifest_for(litert_version))  # the installed version itself is enough


def test_legacy_tflite_runtime_bundles_run_on_litert(zoo, interpreter_class):
    """A bundle for the rpi4-tflite-legacy profile names tflite-runtime 2.14; a device with only
    ai-edge-litert runs it (the versions are numbered differently, so the minimum is not compared)."""
    real = zoo("face-detection")
    legacy = runtime.load(real.data, {"runtime": {"name": "tflite-runtime", "min_version": "2.14.0"}})
    current = runtime.load(real.data, manifest_for(None))
    feed = {name: value[:1] for name, value in real.inputs.items()}
    for name, value in current.run(feed).items():
        np.testing.assert_array_equal(legacy.run(feed)[name], value)


def test_bad_models_and_feeds_are_one_line_errors(zoo):
    with pytest.raises(EdgeopsError, match="^LiteRT cannot load the model: ") as bad_model:
        runtime.load(b"not a flatbuffer" * 64, manifest_for(None))
    real = zoo("face-detection")
    model = runtime.load(real.data, manifest_for(None))
    image = real.inputs["input"][:1]
    with pytest.raises(EdgeopsError, match=r"takes inputs \['input'\], the feed has \['pixels'\]") as wrong_name:
        model.run({"pixels": image})
    with pytest.raises(EdgeopsError, match="^LiteRT could not run the model: .*FLOAT64") as wrong_dtype:
        model.run({"input": image.astype(np.float64)})
    for failure in (bad_model, wrong_name, wrong_dtype):
        assert "\n" not in str(failure.value)
