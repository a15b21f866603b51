"""Hostile models given to `edgeops build` (issue 7): each ends in exactly one line on stderr, a
non-zero exit, nothing in the output folder, and the caller alive.

The build runs in a child process under --max-memory and --max-cpu-time (compiler/sandbox.py), so
the cases that defeat the model checks (a graph that allocates 64 GiB when onnxruntime folds it, a
Loop of 2**62 iterations) are stopped by the kernel's limits. The cases run the `edgeops` CLI in
this process (CliRunner), so the pytest process itself is the caller that must survive; one runs
the real `edgeops` in a subprocess, and one calls the library entry point.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgeops.compiler.model import load_model
from edgeops.compiler.sandbox import Limits, _failure, parse_seconds, parse_size, run_build
from edgeops.protocol.errors import EdgeopsError

from test_bad_input import WEIGHTS, matmul_model, save_with_external_weights  # tests/ is on sys.path (conftest)

# Tight enough that the bombs below hit them at once, ample for a real build of these small models.
LIMITS = ("--max-memory", "1GiB", "--max-cpu-time", "60s")
DEPTH_THAT_PARSES = 31  # protobuf (upb) stops at 100 message levels: 31 levels of If or Loop parse, 32 do not


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Calibration data for every model here: input `x`, float32 [N, 4]."""
    path = tmp_path_factory.mktemp("hostile-data") / "x.npz"
    np.savez(path, x=np.random.default_rng(0).random((16, 4), dtype=np.float32))
    return path


@pytest.fixture
def refused(tmp_path, data):
    """Run `edgeops build MODEL` in this process (its child is forked from the forkserver, so each
    case costs the build, not the imports); assert one line on stderr, exit 1, no output."""
    from edgeops.cli import cli

    def run(model: Path, *options: str) -> str:
        outdir = tmp_path / "out"
        args = ["build", str(model), "--profile", "x86-vnni", "--calib", str(data), "-o", str(outdir), *LIMITS, *options]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
        assert not outdir.exists() or os.listdir(outdir) == []
        return lines[0]

    return run


def save(tmp_path: Path, model: onnx.ModelProto | bytes, name: str = "model.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return path


def graph_model(nodes: list[onnx.NodeProto], initializers=(), domains: dict[str, int] | None = None) -> onnx.ModelProto:
    """x: float [N, 4] -> y: float [N, 4] through `nodes`."""
    graph = helper.make_graph(nodes, "hostile", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], list(initializers))
    opsets = [helper.make_opsetid(domain, version) for domain, version in {"": 17, **(domains or {})}.items()]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


# --- nesting, serialized by hand: protobuf refuses to build messages as deep as a file can hold -------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _node(op: str, inputs: list[str], outputs: list[str], **graphs: bytes) -> bytes:
    """A NodeProto with GRAPH attributes (field 5; in each, name 1, g 6, type 20 = GRAPH)."""
    attrs = b"".join(_field(5, _field(1, key.encode()) + _field(6, g) + _varint(20 << 3) + _varint(5)) for key, g in graphs.items())
    return helper.make_node(op, inputs, outputs).SerializeToString() + attrs


def _graph(nodes: list[bytes], name: str, inputs: list, outputs: list, initializers=()) -> bytes:
    """A GraphProto: node 1, name 2, initializer 5, input 11, output 12."""
    return (b"".join(_field(1, n) for n in nodes) + _field(2, name.encode())
            + b"".join(_field(5, t.SerializeToString()) for t in initializers)
            + b"".join(_field(11, v.SerializeToString()) for v in inputs)
            + b"".join(_field(12, v.SerializeToString()) for v in outputs))


def _tensor(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4])


def _scalar(name: str, kind: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, kind, [])


def nested_model(op: str, depth: int) -> bytes:
    """x -> y through `depth` If or Loop nodes, each inside the subgraph of the one above."""
    if op == "If":
        inner = _graph([_node("Identity", ["x"], ["y0"])], "leaf", [], [_tensor("y0")])
        for level in range(1, depth + 1):
            out = "y" if level == depth else f"y{level}"
            leaf = _graph([_node("Identity", ["x"], [f"e{level}"])], "else", [], [_tensor(f"e{level}")])
            top = _node("If", ["go"], [out], then_branch=inner, else_branch=leaf)
            inner = _graph([top], f"then{level}", [], [_tensor(out)])
    else:
        def body(level: int, nodes: list[bytes]) -> bytes:
            return _graph([_node("Identity", [f"c{level}"], [f"co{level}"]), *nodes], f"body{level}",
                          [_scalar(f"i{level}", TensorProto.INT64), _scalar(f"c{level}", TensorProto.BOOL), _tensor(f"v{level}")],
                          [_scalar(f"co{level}", TensorProto.BOOL), _tensor(f"vo{level}")])

        inner = body(0, [_node("Identity", ["v0"], ["vo0"])])
        for level in range(1, depth):
            inner = body(level, [_node("Loop", ["trip", f"c{level}", f"v{level}"], [f"vo{level}"], body=inner)])
        top = _node("Loop", ["trip", "go", "x"], ["y"], body=inner)
    flags = [numpy_helper.from_array(np.array(True), "go"), numpy_helper.from_array(np.array(1, dtype=np.int64), "trip")]
    main = _graph([top], "main", [_tensor("x")], [_tensor("y")], flags)
    shell = graph_model([])
    shell.ClearField("graph")
    return shell.SerializeToString() + _field(7, main)


# --- the model file ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["../secret.bin", "absolute", "symlink"])
def test_external_data_leading_out_of_the_models_folder(tmp_path, refused, where):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(WEIGHTS.tobytes())
    location = {"absolute": str(secret), "symlink": "weights.bin"}.get(where, where)
    model = save_with_external_weights(tmp_path / "m", location)
    if where == "symlink":
        (tmp_path / "m" / "weights.bin").symlink_to(secret)
    line = refused(model)
    assert ("absolute path" if where == "absolute" else "outside the model's folder") in line


def test_input_dimension_of_2_62(tmp_path, refused):
    line = refused(save(tmp_path, matmul_model(input_shape=(2**62, 4))))
    assert "absurd dimension" in line and str(2**62) in line


def test_initializer_claiming_2_62_elements(tmp_path, refused):
    model = matmul_model()
    del model.graph.initializer[:]
    # Each dimension is plausible; their product (2**62 floats, 16 EiB) is not, and no data backs it.
    model.graph.initializer.append(TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[2**21, 2**21, 2**20]))
    line = refused(save(tmp_path, model))
    assert "absurd dimensions" in line and "'W'" in line


@pytest.mark.parametrize("op", ["If", "Loop"])
def test_subgraphs_nested_hundreds_deep(tmp_path, refused, op):
    line = refused(save(tmp_path, nested_model(op, 300)))
    assert "nests subgraphs deeper than protobuf's nesting limit" in line


@pytest.mark.parametrize("op", ["If", "Loop"])
def test_subgraphs_nested_as_deep_as_protobuf_parses_load(tmp_path, op):
    model = load_model(save(tmp_path, nested_model(op, DEPTH_THAT_PARSES)))
    assert model.graph.node[0].op_type == op


@pytest.mark.parametrize("cut", [0.5, 0.999], ids=["half", "last-byte"])
def test_truncated_protobuf(tmp_path, refused, cut):
    data = nested_model("If", 3)
    line = refused(save(tmp_path, data[: int(len(data) * cut)]))
    assert "not a valid ONNX model" in line


def test_custom_op_in_an_unknown_domain(tmp_path, refused):
    model = graph_model([helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example.evil")],
                        domains={"com.example.evil": 1})
    line = refused(save(tmp_path, model))
    assert "custom op 'Frobnicate' of domain 'com.example.evil'" in line


def test_unknown_op_in_onnxruntimes_own_domain(tmp_path, refused):
    model = graph_model([helper.make_node("Frobnicate", ["x"], ["y"], domain="com.microsoft")], domains={"com.microsoft": 1})
    line = refused(save(tmp_path, model))
    assert "onnxruntime cannot load the model" in line and "Frobnicate" in line


# --- what only the limits stop -------------------------------------------------------------------------


def memory_bomb() -> onnx.ModelProto:
    """y = x + sum(ones(2**17, 2**17)): 64 GiB of float32, allocated when onnxruntime folds or runs it."""
    shape = numpy_helper.from_array(np.array([2**17, 2**17], dtype=np.int64), "shape")
    return graph_model([
        helper.make_node("ConstantOfShape", ["shape"], ["big"], value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])),
        helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
        helper.make_node("Add", ["x", "total"], ["y"]),
    ], [shape])  # fmt: skip


def cpu_spin() -> onnx.ModelProto:
    """A Loop of 2**62 iterations, each adding 1 to x: runs until something stops it, in constant memory."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Add", ["v", "one"], ["v_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), helper.make_tensor_value_info("v_out", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one")],
    )  # fmt: skip
    trips = numpy_helper.from_array(np.array(2**62, dtype=np.int64), "trips")
    return graph_model([helper.make_node("Loop", ["trips", "go", "x"], ["y"], body=body)],
                       [trips, numpy_helper.from_array(np.array(True), "go")])


def test_a_model_that_allocates_64_gib_is_stopped_by_the_memory_limit(tmp_path, refused):
    line = refused(save(tmp_path, memory_bomb()))
    assert "ran out of memory under its limit of 1 GiB" in line and "--max-memory" in line


def test_a_model_that_spins_is_stopped_by_the_cpu_limit(tmp_path, refused):
    line = refused(save(tmp_path, cpu_spin()), "--max-cpu-time", "3s")
    assert "limit of 3 s of CPU time" in line and "--max-cpu-time" in line


def test_the_library_caller_survives_a_bomb_and_builds_next(tmp_path, data):
    outdir = tmp_path / "out"
    request = {"model": save(tmp_path, memory_bomb(), "bomb.onnx"), "profile": "x86-vnni", "calib": data, "outdir": outdir}
    with pytest.raises(EdgeopsError, match="ran out of memory"):
        run_build(request, Limits(memory_bytes=2**30, cpu_seconds=60))
    assert os.listdir(outdir) == []
    # The same caller then builds a model nested as deep as protobuf parses, and hears its progress.
    steps: list[str] = []
    nested = save(tmp_path, nested_model("If", DEPTH_THAT_PARSES), "nested.onnx")
    report = run_build({**request, "model": nested}, Limits(memory_bytes=2**30, cpu_seconds=60), steps.append)
    assert Path(report["bundle"]).is_file() and report["bundle"].startswith(str(outdir))
    assert steps[0] == f"loading {nested}" and len(steps) > 2


def test_the_child_logs_reach_the_caller(tmp_path, data):
    model = save(tmp_path, graph_model([helper.make_node("Frobnicate", ["x"], ["y"], domain="x.y")], domains={"x.y": 1}))
    proc = subprocess.run([sys.executable, "-m", "edgeops", "-v", "build", str(model), "-p", "x86-vnni", "--calib", str(data),
                           "-o", str(tmp_path / "out"), "--max-memory", "3GiB", "--max-cpu-time", "2h", "--json"],
                          check=False, capture_output=True, text=True, timeout=600)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and proc.stdout == ""
    assert "INFO edgeops.compiler.sandbox: building in process" in lines[0] and "3 GiB of memory and 7200 s" in lines[0]
    assert lines[-1].startswith("Error: node 'Frobnicate' is a custom op")


# --- the options and the one-line verdicts -------------------------------------------------------------


@pytest.mark.parametrize("text, size", [("8GiB", 8 * 2**30), ("512M", 512 * 2**20), ("1.5g", 3 * 2**29), ("4096", 4096)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("10m", 600), ("1.5h", 5400), ("1d", 86400)])
def test_cpu_times(text, seconds):
    assert parse_seconds(text) == seconds


@pytest.mark.parametrize("option, value", [("--max-memory", "lots"), ("--max-memory", "0"), ("--max-memory", "-1G"),
                                           ("--max-memory", "9" * 400 + "T"), ("--max-cpu-time", "forever"),
                                           ("--max-cpu-time", "0.5s"), ("--max-cpu-time", "1e9d")])
def test_bad_limits_are_refused_before_building(tmp_path, cli_error, option, value):
    line = cli_error("build", tmp_path / "absent.onnx", "-p", "x86-vnni", option, value)
    assert option in line and repr(value) in line


@pytest.mark.parametrize("code, stderr, expected", [
    (-signal.SIGXCPU, [], "limit of 60 s of CPU time"),
    (-signal.SIGABRT, ["terminate called after throwing an instance of 'std::bad_alloc'"], "ran out of memory"),
    (-signal.SIGKILL, [], "out-of-memory killer"),
    (-signal.SIGSEGV, [], "crashed (Segmentation fault)"),
    (3, ["something odd"], "exit status 3): something odd"),
])  # fmt: skip
def test_how_a_child_that_died_is_reported(code, stderr, expected):
    line = _failure(code, {}, stderr, Limits(memory_bytes=2**30, cpu_seconds=60))
    assert expected in line and "\n" not in line

