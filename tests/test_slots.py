"""A/B slots and the runtime adapter: installs switch only to models that passed their self-test, and
a kill -9 at any step converges, on restart, to exactly one complete, verified model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgeops.agent import runtime
from edgeops.agent.slots import BUNDLE, FAILPOINT_ENV, JOURNAL, POINTER, STEPS, InstallFailed, SlotStore
from edgeops.protocol.bundle import Bundle, build_bundle, npz_bytes, read_bundle, sha256_file
from edgeops.protocol.errors import EdgeopsError


def variant(source: Path, dest: Path, edit_arrays: Callable[[dict], None] | None = None,
            edit_manifest: Callable[[dict], None] | None = None) -> Path:
    """A coherent copy of `source` (hashes recomputed by build_bundle) with its self-test data or manifest edited."""
    original = read_bundle(source)
    manifest = json.loads(json.dumps(original.manifest))
    members = dict(original.members)
    if edit_arrays is not None:
        arrays = original.selftest()
        edit_arrays(arrays)
        members["selftest.npz"] = npz_bytes(arrays)
    if edit_manifest is not None:
        edit_manifest(manifest)
    dest.write_bytes(build_bundle(manifest, members))
    return dest


def shift_probabilities(delta: float, sample: int = 0) -> Callable[[dict], None]:
    def edit(arrays: dict) -> None:
        arrays["output/probabilities"] = arrays["output/probabilities"].copy()
        arrays["output/probabilities"][sample, 0] += delta

    return edit


def assert_single_verified_model(state: Path, version: str) -> None:
    """What recover() promises: no journal, no stray temporaries, and the pointer's model is whole and passes."""
    store = SlotStore(state)  # a fresh store reads everything from disk
    active = store.active()
    assert active is not None and active.manifest["version"] == version
    assert (state / POINTER).read_text().strip() == active.slot
    assert not (state / JOURNAL).exists()
    assert not list(state.glob(".*.part"))
    bundle = read_bundle(active.path)
    runtime.selftest(runtime.load(active.model_path.read_bytes(), active.manifest), bundle)


# --- installing ------------------------------------------------------------------------------------------


def test_first_install_becomes_active(slot_releases, tmp_path):
    store = SlotStore(tmp_path)
    assert store.active() is None
    steps: list[str] = []
    active = store.install(slot_releases.v1, on_step=steps.append, expected_sha256=sha256_file(slot_releases.v1))
    assert steps == list(STEPS)
    assert active.slot == "a" and active.manifest["version"] == "1.0.0"
    assert active.target == slot_releases.v1.name
    assert sorted(p.name for p in (tmp_path / "slots" / "a").iterdir()) == [BUNDLE, "model.onnx"]
    assert store.active() == active
    assert_single_verified_model(tmp_path, "1.0.0")


def test_second_install_switches_slots_and_keeps_the_previous_one(slot_releases, tmp_path):
    store = SlotStore(tmp_path)
    store.install(slot_releases.v1)
    second = store.install(slot_releases.v2)
    assert second.slot == "b" and second.manifest["version"] == "1.1.0"
    assert read_bundle(tmp_path / "slots" / "a" / BUNDLE).manifest["version"] == "1.0.0"
    assert_single_verified_model(tmp_path, "1.1.0")
    assert store.install(slot_releases.v1).slot == "a"  # the next install reuses the inactive slot


def test_bundle_failing_its_selftest_is_refused(slot_releases, tmp_path):
    bad = variant(slot_releases.v2, tmp_path / "bad.edgeops", edit_arrays=shift_probabilities(0.5))
    state = tmp_path / "state"
    store = SlotStore(state)
    store.install(slot_releases.v1)
    steps: list[str] = []
    with pytest.raises(InstallFailed, match="'self-test'.*'probabilities'") as failure:
        store.install(bad, on_step=steps.append)
    assert failure.value.step == "self-test" and steps == ["writing", "loading", "self-test"]
    assert store.active().slot == "a" and store.active().manifest["version"] == "1.0.0"
    assert not (state / "slots" / "b").exists()  # the unverified content is gone
    assert_single_verified_model(state, "1.0.0")


def test_staged_file_changed_before_switching_is_refused(slot_releases, tmp_path):
    store = SlotStore(tmp_path)
    store.install(slot_releases.v1)

    def corrupt_staged(step: str) -> None:
        if step == "self-test":  # after read_bundle verified it, before activation
            staged = tmp_path / "slots" / "b" / BUNDLE
            data = bytearray(staged.read_bytes())
            data[len(data) // 2] ^= 0xFF
            staged.write_bytes(bytes(data))

    with pytest.raises(InstallFailed, match="'switching'.*changed since it was verified"):
        store.install(slot_releases.v2, on_step=corrupt_staged, expected_sha256=sha256_file(slot_releases.v2))
    assert_single_verified_model(tmp_path, "1.0.0")


def test_bundle_other_than_the_verified_one_is_refused(slot_releases, tmp_path):
    store = SlotStore(tmp_path)
    store.install(slot_releases.v1)
    with pytest.raises(InstallFailed, match="'writing'.*not the verified"):
        store.install(slot_releases.v2, expected_sha256=sha256_file(slot_releases.v1))
    assert_single_verified_model(tmp_path, "1.0.0")


def test_unreadable_bundle_is_refused_at_loading(slot_releases, tmp_path):
    store = SlotStore(tmp_path / "state")
    store.install(slot_releases.v1)
    junk = tmp_path / "junk.edgeops"
    junk.write_bytes(b"not a zip")
    with pytest.raises(InstallFailed, match="'loading'.*not a zip"):
        store.install(junk)
    assert_single_verified_model(tmp_path / "state", "1.0.0")


# --- crashes ---------------------------------------------------------------------------------------------

INSTALL = "import sys; from edgeops.agent.slots import SlotStore; SlotStore(sys.argv[1]).install(sys.argv[2])"
FAILPOINTS = [f"{when}:{step}" for step in STEPS[:-1] for when in ("before", "after")]


def install_killed_at(point: str, state: Path, bundle: Path) -> None:
    env = {**os.environ, FAILPOINT_ENV: point}
    proc = subprocess.run([sys.executable, "-c", INSTALL, str(state), str(bundle)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (state / JOURNAL).exists()  # the crash left an install in flight


@pytest.mark.parametrize("point", FAILPOINTS)
def test_kill_at_failpoint_recovers_to_one_verified_model(slot_releases, tmp_path, point):
    SlotStore(tmp_path).install(slot_releases.v1)
    install_killed_at(point, tmp_path, slot_releases.v2)
    switched = point == "after:switching"
    active = SlotStore(tmp_path).recover()
    assert active is not None and active.slot == ("b" if switched else "a")
    assert_single_verified_model(tmp_path, "1.1.0" if switched else "1.0.0")
    if switched:  # the previous model stays in the other slot
        assert read_bundle(tmp_path / "slots" / "a" / BUNDLE).manifest["version"] == "1.0.0"
    else:  # the partial or unswitched new model was discarded
        assert not (tmp_path / "slots" / "b").exists()


def test_kill_during_first_install_recovers_to_nothing_active(slot_releases, tmp_path):
    install_killed_at("before:switching", tmp_path, slot_releases.v1)
    store = SlotStore(tmp_path)
    assert store.recover() is None and store.active() is None
    assert not (tmp_path / JOURNAL).exists() and not (tmp_path / "slots" / "a").exists()
    assert store.install(slot_releases.v1).slot == "a"


def test_recover_drops_a_corrupted_active_slot(slot_releases, tmp_path):
    SlotStore(tmp_path).install(slot_releases.v1)
    model = tmp_path / "slots" / "a" / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1])
    store = SlotStore(tmp_path)
    assert store.recover() is None and not (tmp_path / POINTER).exists()
    assert store.install(slot_releases.v2).manifest["version"] == "1.1.0"
    assert_single_verified_model(tmp_path, "1.1.0")


# --- runtime adapter --------------------------------------------------------------------------------------


def test_selftest_passes_on_the_real_bundle_and_honours_tolerances(slot_releases, tmp_path):
    real = read_bundle(slot_releases.v1)
    model = runtime.load(real.model_bytes, real.manifest)
    runtime.selftest(model, real)
    assert set(model.run({"pixels": real.selftest()["input/pixels"]})) == {"label", "probabilities"}

    # A change within the bundle's atol passes; the same change with the tolerance tightened to zero fails.
    nudged = variant(slot_releases.v1, tmp_path / "nudged.edgeops", edit_arrays=shift_probabilities(1e-3, 3))
    runtime.selftest(model, read_bundle(nudged))

    def zero_tolerance(manifest: dict) -> None:
        manifest["selftest"]["tolerance"]["probabilities"] = {"atol": 0.0, "rtol": 0.0}

    strict = variant(nudged, tmp_path / "strict.edgeops", edit_manifest=zero_tolerance)
    with pytest.raises(runtime.SelfTestFailed, match="first at sample 3") as failure:
        runtime.selftest(model, read_bundle(strict))
    assert failure.value.output == "probabilities"


@pytest.mark.parametrize("changed, passes", [(2, True), (3, False)])
def test_selftest_integer_outputs_need_the_matching_share(slot_releases, tmp_path, changed, passes):
    def relabel(arrays: dict) -> None:
        arrays["output/label"] = arrays["output/label"].copy()
        arrays["output/label"][:changed] = (arrays["output/label"][:changed] + 1) % 10

    bundle = read_bundle(variant(slot_releases.v1, tmp_path / "relabelled.edgeops", edit_arrays=relabel))
    model = runtime.load(bundle.model_bytes, bundle.manifest)
    assert bundle.manifest["selftest"]["tolerance"]["label"] == {"match": 0.75}
    if passes:  # 6 of 8 samples is exactly the 75 % required
        runtime.selftest(model, bundle)
    else:
        with pytest.raises(runtime.SelfTestFailed, match="5 of 8 samples match") as failure:
            runtime.selftest(model, bundle)
        assert failure.value.output == "label"


class Recording:
    """A real model that remembers the shapes it was fed."""

    def __init__(self, model: runtime.Model):
        self.model, self.feeds = model, []

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds.append({name: value.shape for name, value in feed.items()})
        return self.model.run(feed)


def add_model(x_shape: list, s_shape: list) -> bytes:
    """y = x + s in real ONNX (the test side may use onnx; the agent does not)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "s"], ["y"])], "add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape),
         helper.make_tensor_value_info("s", TensorProto.FLOAT, s_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x_shape)],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


@pytest.mark.parametrize("x_shape, s_shape, batch, whole, feeds", [
    (["N", 3], ["N", 3], None, [], [{"x": (8, 3), "s": (8, 3)}]),  # dynamic batch: one run
    ([2, 3], [2, 3], 2, [], [{"x": (2, 3), "s": (2, 3)}] * 4),  # fixed batch of 2
    ([1, 3], [3], None, ["s"], [{"x": (1, 3), "s": (3,)}] * 8),  # s whole: one sample per run
])  # fmt: skip
def test_selftest_feeds_golden_inputs_as_the_manifest_says(x_shape, s_shape, batch, whole, feeds):
    rng = np.random.default_rng(0)
    x, s = rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8, 3)).astype(np.float32)
    y = (x + s)[:, None, :] if whole else x + s  # per-sample runs stack outputs that have a batch of one
    manifest = {"runtime": {"name": "onnxruntime", "min_version": "1.16.0"}, "model": {"file": "model.onnx"},
                "selftest": {"samples": 8, "batch": batch, "whole_inputs": whole,
                             "tolerance": {"y": {"atol": 1e-6, "rtol": 0.0}}}}
    bundle = Bundle(Path("golden"), manifest, {"selftest.npz": npz_bytes({"input/x": x, "input/s": s, "output/y": y})})
    model = Recording(runtime.load(add_model(x_shape, s_shape), manifest))
    runtime.selftest(model, bundle)
    assert model.feeds == feeds


def test_load_refuses_runtimes_it_does_not_have(slot_releases):
    real = read_bundle(slot_releases.v1)
    with pytest.raises(EdgeopsError, match="runtime 'tensorrt'.*it has: litert, onnxruntime, tflite-runtime"):
        runtime.load(real.model_bytes, dict(real.manifest, runtime={"name": "tensorrt"}))
    with pytest.raises(EdgeopsError, match="needs onnxruntime >= 99.0"):
        runtime.load(real.model_bytes, dict(real.manifest, runtime={"name": "onnxruntime", "min_version": "99.0"}))
    with pytest.raises(EdgeopsError, match="onnxruntime cannot load"):
        runtime.load(b"not a model", real.manifest)


def test_agent_modules_stay_off_the_heavy_stack(slot_releases, tmp_path):
    """The agent runs on 512 MB devices: installing must not pull in the compiler, fleet, onnx or TF."""
    code = INSTALL + ("\nheavy = [m for m in sys.modules if m.split('.')[0] in ('onnx', 'tensorflow', 'flask', "
                      "'fastapi', 'starlette', 'aiohttp') or m.startswith(('edgeops.compiler', 'edgeops.fleet'))]"
                      "\nassert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(slot_releases.v1)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
