"""`edgeops build --engine inc`: Intel Neural Compressor's accuracy-aware tuning (onnx-neural-compressor).

INC lives in its own venv (it pins numpy<2), named by EDGEOPS_INC_PYTHON, and runs in a subprocess
(compiler/inc_worker.py). The heavy tests build real models with it end to end: the bundle's report and
manifest say engine inc, the quality is within the tolerance by edgeops' own measure, the model is
smaller than fp32, and the agent's A/B slots install it (load + self-test). Without a usable
EDGEOPS_INC_PYTHON they skip locally and fail under CI=true (tests/realparts.py). The tests for a
missing INC and for bad requests need no INC and run in the default suite.

    EDGEOPS_INC_PYTHON=/path/to/inc-venv/bin/python .venv/bin/python -m pytest -m heavy tests/test_inc.py
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import zoo
from realparts import missing

from edgeops.agent.slots import SlotStore
from edgeops.compiler.build import BuildRequest, build
from edgeops.compiler.data import load_npz
from edgeops.compiler.model import inputs_of, load_model
from edgeops.compiler.passes import PassContext, PassError
from edgeops.compiler.passes.inc_tune import PYTHON_ENV, WORKER, IncTune, check_available, read_trials
from edgeops.compiler.passes.optimize import Optimize
from edgeops.compiler.search import Search
from edgeops.protocol.bundle import read_bundle
from edgeops.protocol.errors import EdgeopsError
from edgeops.protocol.profiles import load_profile

PROFILE = "x86-vnni"
INSTALL = "pip install onnx-neural-compressor prettytable scipy"
heavy = pytest.mark.heavy


@pytest.fixture(scope="module")
def inc_python() -> str:
    """The Python with onnx-neural-compressor, from EDGEOPS_INC_PYTHON; skip (fail under CI=true) if unusable."""
    python = os.environ.get(PYTHON_ENV)
    if not python:
        missing(f"{PYTHON_ENV} is not set: point it at a venv with `{INSTALL}`")
    try:
        return check_available(python)
    except PassError as exc:
        missing(str(exc))


def build_inc(cli_ok, model: Path, calib: Path, evaluation: Path, outdir: Path, *extra: str) -> dict:
    result = cli_ok("build", model, "--profile", PROFILE, "--calib", calib, "--eval", evaluation,
                    "--engine", "inc", "-o", outdir, "--json", *extra)
    return json.loads(result.stdout)


def check_inc_bundle(report: dict, tmp_path: Path, max_drop: float = 0.01) -> None:
    """What every successful INC build must show: engine, INC's model chosen, tolerance, size, installable."""
    assert report["engine"] == "inc"
    assert report["chosen"].startswith("INC trial "), report["chosen"]
    assert [p["pass"] for p in report["passes"]] == ["optimize", "inc-tune"]
    q = report["quality"]
    assert q["max_drop"] == max_drop and q["drop"] <= max_drop, q
    assert report["size_bytes"] < 0.5 * report["fp32_size_bytes"], (report["size_bytes"], report["fp32_size_bytes"])
    assert not any("fp32 model" in note for note in report["notes"]), report["notes"]
    manifest = read_bundle(report["bundle"]).manifest
    assert manifest["compiler"]["engine"] == "inc"
    assert manifest["compiler"]["chosen"] == report["chosen"]
    assert manifest["metrics"]["quality"]["drop"] == q["drop"]
    store = SlotStore(tmp_path / "agent-state")
    active = store.install(report["bundle"])  # loads the model in onnxruntime and runs the bundle's self-test
    assert active.manifest["compiler"]["engine"] == "inc"
    assert SlotStore(tmp_path / "agent-state").active().manifest["version"] == "1.0.0"


@heavy
def test_inc_builds_the_digits_mlp(inc_python, digits_model, cli_ok, tmp_path):
    report = build_inc(cli_ok, digits_model.onnx, digits_model.calib, digits_model.eval, tmp_path / "out")
    check_inc_bundle(report, tmp_path)
    assert report["quality"]["metric"] == "accuracy"
    ops = {n.op_type for n in load_model_bytes(read_bundle(report["bundle"]).model_bytes).graph.node}
    assert "DequantizeLinear" in ops, ops  # the profile's format: QDQ


@heavy
def test_inc_builds_a_real_cnn(inc_python, require, cli_ok, tmp_path):
    cnn = require(zoo.digits_cnn, tmp_path / "cnn")
    report = build_inc(cli_ok, cnn.onnx, cnn.calib, cnn.eval, tmp_path / "out")
    check_inc_bundle(report, tmp_path)
    assert abs(report["quality"]["fp32"] - cnn.accuracy) < 1e-6
    assert report["size_bytes"] < 0.3 * report["fp32_size_bytes"]  # 1.44 M float weights to int8
    # The bundle is stamped for the device's onnxruntime (1.20: IR <= 10), whatever INC wrote.
    manifest = read_bundle(report["bundle"]).manifest
    assert manifest["model"]["ir_version"] <= 10


@heavy
def test_inc_finding_nothing_within_tolerance_keeps_fp32_and_says_why(inc_python, digits_model, cli_ok, tmp_path):
    # Cosine with no drop allowed: every int8 configuration misses, INC calls exit(0), the worker turns that
    # into a reason, and the build keeps the fp32 model, as the built-in search does.
    report = build_inc(cli_ok, digits_model.onnx, digits_model.calib, digits_model.eval, tmp_path / "out",
                       "--metric", "cosine", "--max-accuracy-drop", "0")
    assert report["engine"] == "inc"
    assert report["chosen"] == "fp32, optimized (fallback)"
    inc = report["candidates"][0]
    assert inc["label"] == "INC accuracy-aware tuning" and not inc["ok"]
    assert "INC found no configuration within the tolerance" in inc["error"], inc["error"]
    assert any("bundle holds the fp32 model" in note and "INC found no configuration" in note for note in report["notes"])
    assert SlotStore(tmp_path / "state").install(report["bundle"]).manifest["compiler"]["engine"] == "inc"


@heavy
def test_inc_last_trial_that_misses_is_measured_again_and_rejected(inc_python, digits_model, tmp_path):
    # On max_trials INC returns its last trial even when it missed the goal: edgeops' own measurement must catch it.
    model = load_model(digits_model.onnx)
    inputs = inputs_of(model)
    calib = load_npz(digits_model.calib, inputs, "calibration")
    evaluation = load_npz(digits_model.eval, inputs, "eval")
    ctx = PassContext(load_profile(PROFILE), calib, tmp_path, evaluation=evaluation)
    search = Search(Optimize().apply(model, ctx), ctx, evaluation, 0.0, "cosine")
    result = search.evaluate("inc", (IncTune("cosine", 0, 0.0, max_trials=1),))
    trials = read_trials(ctx)
    assert trials["ok"] and len(trials["trials"]) == 1 and not trials["trials"][0]["meets"]
    assert "returned its last trial" in trials["warning"]
    assert result.error is None and result.misses and result.misses[0].startswith("drop "), result.misses
    assert result.quality < search.fp32_quality


@heavy
def test_inc_worker_reports_a_broken_model_and_exits_non_zero(inc_python, digits_model, tmp_path):
    (tmp_path / "broken.onnx").write_bytes(b"not an onnx model")
    request = {"model": str(tmp_path / "broken.onnx"), "inputs": ["pixels"], "calib": None, "eval": str(digits_model.eval),
               "eval_feeds": 0, "metric": {"name": "cosine", "output": 0}, "max_drop": 0.01,
               "output": str(tmp_path / "out.onnx"), "report": str(tmp_path / "report.json")}
    (tmp_path / "request.json").write_text(json.dumps(request))
    proc = subprocess.run([inc_python, str(WORKER), str(tmp_path / "request.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["ok"] and report["reason"], report
    assert proc.stderr.strip().splitlines()[-1].startswith("inc_worker: ")
    assert not (tmp_path / "out.onnx").exists()


# ---- no INC needed ----


def test_missing_inc_names_what_to_install(digits_model, cli_error, tmp_path, monkeypatch, bare_python):
    monkeypatch.setenv(PYTHON_ENV, bare_python)
    line = cli_error("build", digits_model.onnx, "-p", PROFILE, "--calib", digits_model.calib, "--eval", digits_model.eval,
                     "--engine", "inc", "-o", tmp_path)
    assert "onnx-neural-compressor is not installed for" in line and bare_python in line, line
    assert INSTALL in line and PYTHON_ENV in line, line
    assert not list(tmp_path.glob("*.edgeops"))


def test_inc_python_that_does_not_exist(digits_model, cli_error, tmp_path, monkeypatch):
    monkeypatch.setenv(PYTHON_ENV, str(tmp_path / "no-venv" / "bin" / "python"))
    line = cli_error("build", digits_model.onnx, "-p", PROFILE, "--calib", digits_model.calib, "--engine", "inc", "-o", tmp_path)
    assert "is not an executable Python" in line and INSTALL in line, line


def test_inc_needs_an_int8_profile(digits_model, tmp_path):
    with pytest.raises(EdgeopsError, match="--engine inc tunes int8 quantization, but profile jetson-orin-nano-fp16 asks for fp16"):
        build(BuildRequest(digits_model.onnx, "jetson-orin-nano-fp16", digits_model.calib, outdir=tmp_path, engine="inc"))


def test_unknown_engine(digits_model, tmp_path):
    with pytest.raises(EdgeopsError, match="unknown engine 'tvm': pick one of edgeops, inc"):
        build(BuildRequest(digits_model.onnx, PROFILE, digits_model.calib, outdir=tmp_path, engine="tvm"))


def test_inc_on_a_litert_profile_is_refused_before_any_work(digits_model, tmp_path):
    with pytest.raises(EdgeopsError, match="--engine inc quantizes ONNX for onnxruntime, and profile coral-devboard runs litert"):
        build(BuildRequest(digits_model.onnx, "coral-devboard", digits_model.calib, outdir=tmp_path, engine="inc"))


def test_build_help_shows_the_engine_option(cli_ok):
    out = cli_ok("build", "--help").output
    assert "--engine [edgeops|inc]" in out and "EDGEOPS_INC_PYTHON" in out and "--engine inc" in out


def load_model_bytes(data: bytes):
    import onnx

    return onnx.ModelProto.FromString(data)
