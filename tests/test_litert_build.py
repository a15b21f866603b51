"""`edgeops build` for LiteRT profiles, on real models: ONNX -> onnx2tf/TensorFlow -> TFLite variants
measured in LiteRT, checked against the profile's runtime version (tflite-runtime 2.14 refuses
FULLY_CONNECTED v12), packed with layouts and ONNX output names, and run by the agent end to end.

Heavy: needs the `tflite` extra (TensorFlow, onnx2tf) in EDGEOPS_TFLITE_PYTHON (default: this Python)
and, for the real 2.14 load, a Python with tflite-runtime 2.14 in EDGEOPS_TFLITE_RUNTIME_PYTHON.
`make test-heavy` sets both up; under CI=true a missing part fails the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import zoo
from edgeops.agent.service import Agent
from edgeops.agent.slots import SlotStore
from edgeops.compiler import litert
from edgeops.compiler.build import BuildRequest, build
from edgeops.fleet import registry
from edgeops.fleet.home import enroll_device, push
from edgeops.fleet.server import FleetServer
from edgeops.protocol.bundle import read_bundle
from edgeops.protocol.errors import EdgeopsError
from realparts import missing

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import AT_ONCE, fleet_home, wait_for  # noqa: E402,F401  (fixture)

pytestmark = pytest.mark.heavy


def _python_with(module: str, env: str | None) -> str:
    python = os.environ.get(env) if env else None
    python = python or sys.executable
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True)
    if probe.returncode != 0:
        missing(f"{python} cannot import {module} ({env or 'this Python'}); run `make test-heavy`")
    return python


@pytest.fixture(scope="module")
def converter():
    return _python_with("onnx2tf", litert.CONVERTER_PYTHON)


@pytest.fixture(scope="module")
def legacy_python():
    python = os.environ.get(litert.LEGACY_PYTHON)
    if not python:
        missing(f"{litert.LEGACY_PYTHON} is not set (a Python with tflite-runtime 2.14); run `make test-heavy`")
    return _python_with("tflite_runtime.interpreter", litert.LEGACY_PYTHON)


def _built_for_coral(tmp_path_factory, make, name: str):
    model = make(tmp_path_factory.mktemp(f"{name}-model"))
    return model, build(BuildRequest(model.onnx, "coral-devboard", model.calib, model.eval, name=name,
                                     outdir=tmp_path_factory.mktemp(f"{name}-bundle")))


@pytest.fixture(scope="module")
def mlp(tmp_path_factory, converter):
    """The demo's digits MLP (skl2onnx: its `label` output comes from ArrayFeatureExtractor) for a LiteRT board."""
    return _built_for_coral(tmp_path_factory, zoo.digits_mlp, "digits")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory, converter):
    return _built_for_coral(tmp_path_factory, zoo.digits_cnn, "digits-cnn")


def test_an_mlp_becomes_a_tflite_bundle_within_the_tolerance(mlp, tmp_path):
    model, report = mlp
    bundle = read_bundle(report["bundle"])
    manifest = bundle.manifest
    assert (manifest["runtime"]["name"], manifest["model"]["format"], manifest["model"]["file"]) == ("litert", "tflite", "model.tflite")
    assert report["quality"]["drop"] <= report["quality"]["max_drop"]
    assert report["size_bytes"] < 0.35 * report["fp32_size_bytes"]  # an int8 variant was chosen
    assert report["chosen"] != "tflite fp32" and all(c["passes"][0]["pass"] == "tflite" for c in report["candidates"])
    assert [o["name"] for o in manifest["outputs"]] == ["probabilities"]  # ONNX names, not TF's output_0
    assert any("output label is not in the TFLite model" in n and "ArrayFeatureExtractor" in n for n in report["notes"])
    assert manifest["inputs"] == [{"name": "pixels", "dtype": "float32", "shape": ["N", 64]}]
    assert all(isinstance(op, list) and len(op) == 2 for op in manifest["model"]["ops"])
    # the agent installs it: load and self-test in its LiteRT adapter, then serve it
    store = SlotStore(tmp_path)
    active = store.install(report["bundle"])
    assert active.manifest["version"] == "1.0.0"


def test_a_cnn_gets_nhwc_inputs_recorded_in_the_manifest(cnn, tmp_path):
    model, report = cnn
    manifest = read_bundle(report["bundle"]).manifest
    [image] = manifest["inputs"]
    assert image == {"name": "image", "dtype": "float32", "shape": ["N", 32, 32, 1], "layout": "NHWC", "source_layout": "NCHW"}
    assert [o["name"] for o in manifest["outputs"]] == ["logits"]
    assert report["quality"]["drop"] <= report["quality"]["max_drop"]
    assert report["size_bytes"] < 0.35 * report["fp32_size_bytes"]
    SlotStore(tmp_path).install(report["bundle"])  # its self-test runs NHWC golden inputs in LiteRT


def test_a_third_party_cnn_builds_and_installs(tmp_path, converter, require):
    """PaddleOCR's text-direction classifier (rapidocr-onnxruntime's wheel): dynamic H and W, NCHW."""
    import zoo_thirdparty

    real = require(zoo_thirdparty.ocr_cls_model, tmp_path / "ocr")
    report = build(BuildRequest(real.onnx, "coral-devboard", real.calib, real.eval, name="ocr-cls", outdir=tmp_path / "out"))
    assert report["quality"]["drop"] <= report["quality"]["max_drop"]
    [image] = read_bundle(report["bundle"]).manifest["inputs"]
    assert (image["shape"], image["layout"], image["source_layout"]) == (["N", None, None, 3], "NHWC", "NCHW")
    SlotStore(tmp_path / "device").install(report["bundle"])


def test_a_tflite_runtime_2_14_profile_gets_a_model_it_can_load(tmp_path, converter, legacy_python):
    """TF 2.21's per-channel dynamic range uses FULLY_CONNECTED v12, which tflite-runtime 2.14 lacks:
    that candidate is refused at build time with the reason, and the chosen one loads there for real."""
    model = zoo.digits_mlp(tmp_path / "model")
    report = build(BuildRequest(model.onnx, "rpi4-tflite-legacy", None, model.eval, name="digits", outdir=tmp_path / "out"))
    candidates = {c["label"]: c for c in report["candidates"]}
    refused = candidates["tflite dynamic"]
    assert not refused["ok"] and "FULLY_CONNECTED v12" in refused["misses"][0] and "2.14.0 cannot load it" in refused["misses"][0]
    assert report["chosen"] == "tflite dynamic-per-tensor"
    data = read_bundle(report["bundle"]).model_bytes
    assert litert.runtime_misses(data, "tflite-runtime", "2.14.0") == []  # static check and, with the env, a real load
    load = subprocess.run([legacy_python, "-c", litert._LOAD, _write(tmp_path / "chosen.tflite", data)], capture_output=True, text=True)
    assert load.returncode == 0, load.stderr


def test_the_real_2_14_runtime_refuses_fully_connected_v12(tmp_path, converter, legacy_python, monkeypatch):
    model = zoo.digits_mlp(tmp_path / "model")
    base = onnx.load(model.onnx)
    from edgeops.compiler.data import load_npz
    from edgeops.compiler.model import inputs_of

    converted = litert.convert(base, load_npz(model.calib, inputs_of(base), "calibration"), ["dynamic"], tmp_path / "work")
    data = converted.models["dynamic"]
    assert ("FULLY_CONNECTED", 12) in litert.ops(data) and litert.min_runtime_version(data) == "2.17.0"
    [reason] = litert._legacy_load(legacy_python, data, "2.14.0")
    assert "Didn't find op for builtin opcode 'FULLY_CONNECTED' version '12'" in reason


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_an_op_tflite_lacks_fails_naming_the_op_and_the_node(tmp_path, converter):
    """LpPool: standard ONNX that onnxruntime runs and onnx2tf has no converter for."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 1, 8, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1, 4, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["h"], name="relu"),
                               helper.make_node("LpPool", ["h"], ["y"], name="the_pool", kernel_shape=[2, 2], strides=[2, 2])],
                              "lppool", [x], [y])
    path = tmp_path / "lppool.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).normal(size=(32, 1, 8, 8)).astype(np.float32))
    with pytest.raises(EdgeopsError) as info:
        build(BuildRequest(path, "coral-devboard", tmp_path / "calib.npz", name="lppool", outdir=tmp_path / "out"))
    message = str(info.value)
    assert message == "TFLite has no conversion for op LpPool (node 'the_pool')"
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.edgeops"))


def test_a_real_model_onnx2tf_cannot_convert_fails_in_one_line(tmp_path, converter, require):
    import zoo_thirdparty

    real = require(zoo_thirdparty.silero_vad_model, tmp_path / "silero")
    with pytest.raises(EdgeopsError) as info:
        build(BuildRequest(real.onnx, "coral-devboard", real.calib, real.eval, name="vad", outdir=tmp_path / "out"))
    assert "\n" not in str(info.value) and ("onnx2tf could not convert" in str(info.value) or "TFLite has no" in str(info.value))


def test_without_the_tflite_extra_the_error_names_it(tmp_path, monkeypatch, mlp, bare_python):
    model, _ = mlp
    monkeypatch.setenv(litert.CONVERTER_PYTHON, bare_python)
    with pytest.raises(EdgeopsError) as info:
        build(BuildRequest(model.onnx, "coral-devboard", model.calib, model.eval, name="digits", outdir=tmp_path / "out"))
    assert "pip install 'edgeops[tflite]'" in str(info.value) and litert.CONVERTER_PYTHON in str(info.value)


def test_nothing_is_downloaded(tmp_path, converter):
    """The CLI build of the CNN in a network namespace with no interfaces up: it cannot reach anything."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        missing("unshare as root is needed to cut the network")
    model = zoo.digits_cnn(tmp_path / "model")
    proc = subprocess.run(["unshare", "-n", sys.executable, "-m", "edgeops", "build", str(model.onnx), "--profile",
                           "coral-devboard", "--calib", str(model.calib), "--eval", str(model.eval), "-o", str(tmp_path / "out"),
                           "--json"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["quality"]["drop"] <= 0.01


def test_an_agent_with_a_litert_profile_runs_a_pushed_bundle(mlp, fleet_home, tmp_path):
    model, report = mlp
    home = fleet_home()
    url = home.broker_url
    enroll_device(home, "coral-1", "coral-devboard", {}, tmp_path / "coral-1")
    server = FleetServer(home, url).start()
    stop = threading.Event()
    agent = Agent(tmp_path / "coral-1")
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        release = push(home, [Path(report["bundle"])], {}, plan=AT_ONCE)
        db = registry.open_db(home.db_path)
        wait_for(lambda: (registry.device(db, "coral-1") or {}).get("installed_version") == "1.0.0", "coral-1 to run 1.0.0")
        assert db.execute("select state from executions where release_id = ?", [release]).fetchone()[0] == "active"
        with np.load(model.eval) as data:
            pixels, labels = data["pixels"][:50], data["labels"][:50]
        out = agent.infer({"pixels": pixels})
        assert (out["probabilities"].argmax(1) == labels).mean() > 0.9
    finally:
        stop.set()
        thread.join(timeout=10)
        server.stop()
