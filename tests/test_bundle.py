"""The bundle: deterministic bytes, a complete manifest, a self-test that reproduces, hostile files refused."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from edgeops.protocol import bundle as bundlemod
from edgeops.protocol.bundle import build_bundle, canonical_json, npz_bytes, read_bundle
from edgeops.protocol.errors import EdgeopsError

REGULAR = stat.S_IFREG | 0o644
SYMLINK = stat.S_IFLNK | 0o777
# Zip has no hard-link entry; the nearest thing an archiver writes for one is a second name for the same
# bytes, which "duplicate-member" covers. Device files and FIFOs are modes like links.
SPECIAL = {"char-device": stat.S_IFCHR | 0o666, "block-device": stat.S_IFBLK | 0o660, "fifo": stat.S_IFIFO | 0o644}
MB = 1024 * 1024


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_zip(path: Path, entries: list[tuple[str, bytes] | tuple[str, bytes, int]]) -> Path:
    """A zip with exactly these (name, data[, mode]) entries, in this order, names kept verbatim."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names, which one test wants
        with zipfile.ZipFile(path, "w") as archive:
            for name, data, *mode in entries:
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.create_system = 3
                info.external_attr = (mode[0] if mode else REGULAR) << 16
                archive.writestr(info, data)
    return path


def small_bundle_parts() -> tuple[dict, dict[str, bytes]]:
    manifest = {
        "name": "tiny",
        "version": "1.0.0",
        "profile": "x86-vnni",
        "runtime": {"name": "onnxruntime", "min_version": "1.20.1"},
        "model": {"file": "model.onnx", "sha256": sha256(b"not really onnx"), "size": 15},
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 2]}],
        "selftest": {"file": "selftest.npz", "samples": 2, "batch": None, "whole_inputs": [], "tolerance": {}},
    }
    members = {
        "model.onnx": b"not really onnx",
        "reference.json": canonical_json({"version": 1, "inputs": [], "outputs": []}),
        "selftest.npz": npz_bytes({"input/x": np.arange(8, dtype=np.float32).reshape(2, 4)}),
    }
    return manifest, members


# --- writing -------------------------------------------------------------------------------------------


def test_build_bundle_is_deterministic():
    manifest, members = small_bundle_parts()
    first = build_bundle(manifest, members)
    assert build_bundle(manifest, members) == first
    # Insertion order of manifest keys and members does not leak into the bytes either.
    reordered_manifest = dict(reversed(list(manifest.items())))
    reordered_members = dict(reversed(list(members.items())))
    assert build_bundle(reordered_manifest, reordered_members) == first


def test_build_bundle_bytes_change_with_content():
    manifest, members = small_bundle_parts()
    other = dict(members, **{"model.onnx": b"not really onnx!"})
    assert build_bundle(manifest, other) != build_bundle(manifest, members)


def test_npz_bytes_is_deterministic_and_readable():
    arrays = {"input/x": np.arange(12, dtype=np.float32).reshape(3, 4), "output/y": np.array([1, 2, 3])}
    data = npz_bytes(arrays)
    assert npz_bytes(arrays) == data
    with np.load(io.BytesIO(data), allow_pickle=False) as loaded:
        assert sorted(loaded.files) == sorted(arrays)
        for key, value in arrays.items():
            np.testing.assert_array_equal(loaded[key], value)
            assert loaded[key].dtype == value.dtype


def test_built_bundle_reads_back_with_hashes_and_sizes(tmp_path):
    manifest, members = small_bundle_parts()
    path = tmp_path / "tiny.edgeops"
    bundlemod.atomic_write(path, build_bundle(manifest, members))
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.edgeops"]  # no temporary file left behind
    read = read_bundle(path)
    assert read.manifest["schema"] == bundlemod.SCHEMA_VERSION
    assert read.members == members
    assert read.model_bytes == b"not really onnx"
    for name, data in members.items():
        assert read.manifest["files"][name] == {"sha256": sha256(data), "size": len(data)}
    np.testing.assert_array_equal(read.selftest()["input/x"], np.arange(8, dtype=np.float32).reshape(2, 4))


@pytest.mark.parametrize("name", ["manifest.json", "../evil", "extra.txt"])
def test_build_bundle_refuses_non_members(name):
    manifest, members = small_bundle_parts()
    with pytest.raises(ValueError, match="not a bundle member"):
        build_bundle(manifest, {**members, name: b"x"})


def test_two_real_builds_are_byte_identical(digits_bundle, digits_cli_build):
    # The second build is `edgeops build --json` (test_cli.py checks its report) with the same inputs.
    assert digits_cli_build.result.exit_code == 0, digits_cli_build.result.output
    other = Path(digits_cli_build.report["bundle"])
    assert other != digits_bundle.path
    assert other.name == digits_bundle.path.name
    chosen = (digits_bundle.report["chosen"], digits_cli_build.report["chosen"])
    if chosen[0] != chosen[1]:
        # Known product bug (compiler/search.py): Search.best() ranks by measured latency against fp32
        # with a 5% margin, and on a sub-0.1 ms model timing noise flips which candidate wins.
        pytest.xfail(f"the two builds chose different candidates on latency noise: {chosen}")
    assert other.read_bytes() == digits_bundle.path.read_bytes()


# --- reading a real bundle -----------------------------------------------------------------------------


def test_real_bundle_name_and_members(digits_bundle):
    assert digits_bundle.path.name == "model-1.0.0-x86-vnni.edgeops"
    chart = digits_bundle.path.with_suffix(".html").name
    assert sorted(p.name for p in digits_bundle.outdir.iterdir()) == sorted([digits_bundle.path.name, chart])
    with zipfile.ZipFile(digits_bundle.path) as archive:
        assert sorted(archive.namelist()) == ["manifest.json", "model.onnx", "reference.json", "selftest.npz"]


def test_inspect_text(digits_bundle, cli_ok):
    manifest = read_bundle(digits_bundle.path).manifest
    output = cli_ok("inspect", digits_bundle.path).output
    assert "model 1.0.0 for profile x86-vnni" in output
    assert manifest["model"]["sha256"] in output
    assert "input: pixels float32" in output
    assert "output: probabilities float32" in output
    assert f"compiled as: {digits_bundle.report['chosen']}" in output


def test_inspect_json_manifest(digits_bundle, digits_model, cli_ok):
    manifest = json.loads(cli_ok("inspect", "--json", digits_bundle.path).output)
    for key in ("schema", "name", "version", "profile", "model", "inputs", "outputs", "selftest", "lineage", "files"):
        assert key in manifest, key
    assert manifest["schema"] == bundlemod.SCHEMA_VERSION
    assert (manifest["name"], manifest["version"], manifest["profile"]) == ("model", "1.0.0", "x86-vnni")
    assert manifest["runtime"] == {"name": "onnxruntime", "min_version": "1.20.1"}
    with zipfile.ZipFile(digits_bundle.path) as archive:
        model_data = archive.read(manifest["model"]["file"])
    assert manifest["model"]["sha256"] == sha256(model_data)
    assert manifest["model"]["size"] == len(model_data)
    assert manifest["inputs"] == [{"name": "pixels", "dtype": "float32", "shape": ["N", 64]}]
    assert [o["name"] for o in manifest["outputs"]] == ["label", "probabilities"]
    assert manifest["outputs"][1]["shape"] == ["N", 10]
    lineage = manifest["lineage"]
    assert lineage["calib_sha256"] == sha256(digits_model.calib.read_bytes())
    assert lineage["eval_sha256"] == sha256(digits_model.eval.read_bytes())
    assert lineage["edgeops_version"] == __import__("edgeops").__version__
    assert len(lineage["source_sha256"]) == 64
    assert manifest["metrics"]["quality"] == digits_bundle.report["quality"]
    assert manifest["compiler"]["chosen"] == digits_bundle.report["chosen"]


def test_selftest_reproduces_in_onnxruntime(digits_bundle, digits_model):
    read = read_bundle(digits_bundle.path)
    spec = read.manifest["selftest"]
    arrays = read.selftest()
    assert spec["samples"] >= 1
    with np.load(digits_model.eval) as evaluation:
        np.testing.assert_array_equal(arrays["input/pixels"], evaluation["pixels"][: spec["samples"]])
    session = onnxruntime.InferenceSession(read.model_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, {"pixels": arrays["input/pixels"]})))
    assert set(spec["tolerance"]) == set(names)
    for name, tolerance in spec["tolerance"].items():
        expected = arrays[f"output/{name}"]
        assert got[name].shape == expected.shape
        if "atol" in tolerance:
            np.testing.assert_allclose(got[name], expected, atol=tolerance["atol"], rtol=tolerance["rtol"])
        else:
            assert np.mean(got[name] == expected) >= tolerance["match"]
    # The golden labels are real predictions, not a constant.
    assert len(np.unique(arrays["output/label"])) > 1


def test_reference_summaries_cover_inputs_and_outputs(digits_bundle):
    reference = read_bundle(digits_bundle.path).reference()
    assert [entry["name"] for entry in reference["inputs"]] == ["pixels"]
    assert {entry["name"] for entry in reference["outputs"]} >= {"probabilities"}
    assert reference["samples"] > 0


# --- hostile bundles -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_parts(digits_bundle):
    """The real bundle's manifest and members, to tamper with."""
    with zipfile.ZipFile(digits_bundle.path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    manifest = json.loads(members.pop("manifest.json"))
    return manifest, members


def entries_of(manifest: dict, members: dict[str, bytes]) -> list[tuple[str, bytes]]:
    return [("manifest.json", canonical_json(manifest)), *members.items()]


def test_rezipped_real_bundle_is_accepted(tmp_path, real_parts, cli_ok):
    # The baseline for every hostile case below: the helper itself makes bundles the reader accepts.
    manifest, members = real_parts
    path = write_zip(tmp_path / "ok.edgeops", entries_of(manifest, members))
    assert read_bundle(path).members == members
    cli_ok("inspect", path)


def hostile_cases(manifest: dict, members: dict[str, bytes]) -> dict[str, tuple[list, str]]:
    """name -> (zip entries, a fragment the refusal must contain)."""

    def with_manifest(**changes):
        return entries_of({**manifest, **changes}, members)

    def with_file_entry(name, **changes):
        files = {**manifest["files"], name: {**manifest["files"][name], **changes}}
        return entries_of({**manifest, "files": files}, members)

    good = entries_of(manifest, members)
    model = members["model.onnx"]
    flipped = bytes([model[len(model) // 2] ^ 0xFF])
    tampered_model = model[: len(model) // 2] + flipped + model[len(model) // 2 + 1 :]
    files_without_reference = {k: v for k, v in manifest["files"].items() if k != "reference.json"}
    return {
        "traversal": (good + [("../evil", b"pwned")], "path traversal"),
        "traversal-nested": (good + [("a/../../evil", b"pwned")], "path traversal"),
        "absolute": (good + [("/tmp/evil", b"pwned")], "path traversal"),
        "backslash": (good + [("..\\evil", b"pwned")], "path traversal"),
        "symlink": (
            [e for e in good if e[0] != "reference.json"] + [("reference.json", b"/etc/passwd", SYMLINK)],
            "not a regular file",
        ),
        **{
            name: ([e for e in good if e[0] != "selftest.npz"] + [("selftest.npz", b"", mode)], "not a regular file")
            for name, mode in SPECIAL.items()
        },
        "unexpected-member": (good + [("run.sh", b"#!/bin/sh\n")], "unexpected member"),
        "duplicate-member": (good + [("model.onnx", model)], "duplicate"),
        "declared-smaller": (with_file_entry("model.onnx", size=len(model) - 1), "larger than"),
        "declared-negative": (with_file_entry("model.onnx", size=-1), "invalid or oversize declared size"),
        "declared-huge": (with_file_entry("model.onnx", size=2**40), "invalid or oversize declared size"),
        "unknown-schema": (with_manifest(schema=2), "unknown schema version 2"),
        "no-schema": (entries_of({k: v for k, v in manifest.items() if k != "schema"}, members), "unknown schema"),
        "hash-mismatch": (
            [e if e[0] != "model.onnx" else ("model.onnx", tampered_model) for e in good],
            "does not match its sha256",
        ),
        "listed-member-missing": ([e for e in good if e[0] != "reference.json"], "missing"),
        "member-not-in-manifest": (with_manifest(files=files_without_reference), "not covered by the manifest"),
        "manifest-lists-odd-member": (
            with_manifest(files={**manifest["files"], "../evil": {"sha256": "0" * 64, "size": 1}}),
            "unexpected member",
        ),
        "model-file-not-a-model": (with_manifest(model={**manifest["model"], "file": "reference.json"}), "malformed"),
        "manifest-missing-key": (entries_of({k: v for k, v in manifest.items() if k != "outputs"}, members), "'outputs'"),
        "manifest-not-json": ([("manifest.json", b"{not json")] + good[1:], "not valid JSON"),
        "manifest-not-object": ([("manifest.json", b"[1, 2]")] + good[1:], "not an object"),
        "manifest-bomb": ([("manifest.json", b" " * (2 * MB) + b"{}")] + good[1:], "larger than"),
        "no-manifest": (good[1:], "no manifest.json"),
        "empty-zip": ([], "no manifest.json"),
    }


HOSTILE = (
    "traversal", "traversal-nested", "absolute", "backslash", "symlink", "char-device", "block-device", "fifo",
    "unexpected-member", "duplicate-member",
    "declared-smaller", "declared-negative", "declared-huge", "unknown-schema", "no-schema", "hash-mismatch",
    "listed-member-missing", "member-not-in-manifest", "manifest-lists-odd-member", "model-file-not-a-model",
    "manifest-missing-key", "manifest-not-json", "manifest-not-object", "manifest-bomb", "no-manifest", "empty-zip",
)  # fmt: skip


def test_every_hostile_case_is_parametrized(real_parts):
    assert sorted(hostile_cases(*real_parts)) == sorted(HOSTILE)


@pytest.mark.parametrize("case", HOSTILE)
def test_inspect_refuses_hostile_bundle(tmp_path, real_parts, cli_error, case):
    entries, reason = hostile_cases(*real_parts)[case]
    path = write_zip(tmp_path / f"{case}.edgeops", entries)
    line = cli_error("inspect", path)
    assert "refusing bundle" in line
    assert reason in line
    with pytest.raises(EdgeopsError):
        read_bundle(path)


def test_inspect_refuses_zip_bomb_without_inflating_it(tmp_path, real_parts, cli_error):
    manifest, members = real_parts
    bomb = bytes(50 * MB)
    files = {**manifest["files"], "selftest.npz": {"sha256": sha256(bomb[:1000]), "size": 1000}}
    path = write_zip(tmp_path / "bomb.edgeops", entries_of({**manifest, "files": files}, {**members, "selftest.npz": bomb}))
    del bomb
    assert path.stat().st_size < 1 * MB  # it is a bomb: small on disk, 50 MB inflated
    line = cli_error("inspect", path)
    assert "selftest.npz is larger than 1000 bytes" in line
    tracemalloc.start()
    try:
        with pytest.raises(EdgeopsError, match="larger than"):
            read_bundle(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MB, f"reading the bomb allocated {peak / MB:.1f} MB"


@pytest.mark.parametrize("content", [b"", b"definitely not a zip file\n" * 10, b"PK\x03\x04" + bytes(100)])
def test_inspect_refuses_non_zip(tmp_path, cli_error, content):
    path = tmp_path / "junk.edgeops"
    path.write_bytes(content)
    line = cli_error("inspect", path)
    assert "not a zip file" in line


def test_inspect_missing_file(tmp_path, cli_error):
    line = cli_error("inspect", tmp_path / "absent.edgeops")
    assert "does not exist" in line
